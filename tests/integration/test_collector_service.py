"""The collector on real loopback sockets: ingest, /metrics, restart (OTLP: test_otlp.py)."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from grokwatch.collector import reference
from grokwatch.wire import encode
from helpers import Pusher, prometheus_tool, scrape, scrape_after, scrape_text, send_all, start_collector, value, wait_until
from wire_factories import make_eval, make_heartbeat, make_hello, make_routing


@pytest.fixture
def collector(tmp_path):
    c = start_collector(tmp_path, comparisons_per_sample=64)
    yield c
    c.stop()


def test_metrics_equal_reference_of_what_was_sent(collector):
    rng = np.random.default_rng(1)
    msgs = [make_hello()] + [make_routing(rng=rng, seq=i + 1, n=3, step=i * 5, concentration=0.3,
                                          sample_ids=[f"m{i}-{k}" for k in range(3)]) for i in range(4)]  # new samples
    send_all(collector, msgs + [make_eval(seq=9, step=15), make_heartbeat(seq=10)])
    s = scrape(collector.metrics_port)
    paths = []
    for m in msgs[1:]:
        for i in range(m.num_samples):
            paths.append(reference.pathway_symbols(reference.pathway_layers(m.mean_probs_NLE[i], 0.7), 8))
    dists = [reference.levenshtein(paths[i], paths[j]) for j in range(len(paths)) for i in range(j)]
    g = dict(run="run-a", source="train", group="math")
    assert value(s, "grokwatch_pathway_distance_count", **g) == len(dists)
    assert value(s, "grokwatch_pathway_distance_sum", **g) == pytest.approx(sum(dists))
    le = {float(dict(k)["le"]): v for k, v in s["grokwatch_pathway_distance_bucket"].items() if dict(k)["group"] == "math"}
    for bound, count in le.items():
        assert count == sum(1 for d in dists if d <= bound)
    assert value(s, "grokwatch_train_step", run="run-a") == 15
    assert value(s, "grokwatch_eval_score", run="run-a", group="math") == 0.4
    assert value(s, "grokwatch_collector_messages_received_total") == 7
    assert value(s, "grokwatch_collector_messages_lost_total") == 4  # seq 5..8 never sent
    assert value(s, "grokwatch_agent_messages_dropped_total", run="run-a", rank=0, reason="queue_full") == 2
    assert value(s, "grokwatch_distinct_pathways", **g) == len({tuple(p) for p in paths})
    assert value(s, "grokwatch_collector_queue_capacity") == collector.config.queue_capacity


def test_invalid_messages_are_counted_by_reason_and_the_collector_keeps_going(collector):
    good = make_routing(seq=1)
    send_all(collector, [good], raw=[b"\x00garbage", b"\x81\xa1v\x02", encode(make_routing(seq=1))])
    send_all(collector, [make_routing(seq=2)])
    s = scrape(collector.metrics_port)
    assert value(s, "grokwatch_collector_messages_rejected_total", reason="malformed") == 1
    assert value(s, "grokwatch_collector_messages_rejected_total", reason="version") == 1
    assert value(s, "grokwatch_collector_messages_rejected_total", reason="duplicate") == 1
    assert value(s, "grokwatch_pathway_samples_total", run="run-a", source="train", group="math") == 6


def test_exposition_passes_promtool_check_metrics(collector):
    send_all(collector, [make_hello(), make_routing(seq=1), make_heartbeat(seq=2)])
    promtool = prometheus_tool("promtool")
    result = subprocess.run([promtool, "check", "metrics"], input=scrape_text(collector.metrics_port),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_snapshot_and_restart_resume_counters(tmp_path):
    c = start_collector(tmp_path)
    send_all(c, [make_hello(), make_routing(seq=1), make_routing(seq=2)])
    before = scrape(c.metrics_port)
    c.stop()
    assert os.path.exists(tmp_path / "state" / "snapshot.msgpack")
    c2 = start_collector(tmp_path)
    try:
        after = scrape(c2.metrics_port)
        for name in ("grokwatch_collector_messages_received_total", "grokwatch_pathway_distance_count",
                     "grokwatch_pathway_samples_total"):
            assert after[name] == before[name], name
        send_all(c2, [make_routing(seq=2), make_routing(seq=3)])  # seq 2 was processed before the restart
        s = scrape_after(c2.metrics_port, lambda s: value(s, "grokwatch_collector_messages_received_total")
                         == value(after, "grokwatch_collector_messages_received_total") + 2)
        assert value(s, "grokwatch_collector_messages_rejected_total", reason="duplicate") == 1
        assert value(s, "grokwatch_pathway_samples_total", run="run-a", source="train", group="math") == 9
    finally:
        c2.stop()


def test_metrics_served_over_tls(tmp_path):
    import shutil
    import ssl
    import urllib.request

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True, timeout=60)
    c = start_collector(tmp_path, tls_certfile=str(cert), tls_keyfile=str(key))
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        with urllib.request.urlopen(f"https://127.0.0.1:{c.metrics_port}/metrics", context=ctx, timeout=5) as r:
            assert "grokwatch_collector_messages_received_total" in r.read().decode()
        with pytest.raises(Exception):
            urllib.request.urlopen(f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=5).read()
    finally:
        c.stop()


def test_readyz_says_ready_once_ingest_is_bound_and_healthz_while_it_answers(tmp_path):
    import urllib.error
    import urllib.request

    c = start_collector(tmp_path)
    try:
        base = f"http://127.0.0.1:{c.metrics_port}"
        assert urllib.request.urlopen(base + "/readyz", timeout=5).read() == b"ok\n"
        assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
        c.ready = False  # as during start-up (restore, replay) and shutdown
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + "/readyz", timeout=5)
        assert info.value.code == 503
        assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
        assert b"grokwatch_collector_messages_received_total" in urllib.request.urlopen(base + "/metrics").read()
    finally:
        c.stop()


def test_the_openmetrics_exposition_parses_strictly_and_carries_the_same_numbers(collector):
    """Prometheus asks for OpenMetrics first. Before, the consistency histogram's negative _sum made
    prometheus-client's strict OpenMetrics parser reject the whole exposition; signed histograms now have
    no _sum, and their sum is the gauge <name>_sum_signed in both formats."""
    import urllib.request

    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

    send_all(collector, [make_hello(), make_routing(seq=1, n=6), make_routing(seq=2, n=6), make_heartbeat(seq=3)])
    request = urllib.request.Request(f"http://127.0.0.1:{collector.metrics_port}/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        text = resp.read().decode()
    families = {f.name: f for f in openmetrics_families(text)}  # raises on any violation
    g = {"run": "run-a", "source": "train", "group": "math"}
    cons = families["grokwatch_pathway_consistency"]
    assert cons.type == "histogram" and not [s for s in cons.samples if s.name.endswith(("_sum", "_count"))]
    signed = [s.value for s in families["grokwatch_pathway_consistency_sum_signed"].samples if s.labels == g]
    text_format = scrape(collector.metrics_port)
    assert signed == [pytest.approx(value(text_format, "grokwatch_pathway_consistency_sum_signed", **g))]
    assert (value(text_format, "grokwatch_pathway_consistency_bucket", le="+Inf", **g)
            + value(text_format, "grokwatch_pathway_consistency_undefined_total", **g)) == 12
    received = [s.value for s in families["grokwatch_collector_messages_received"].samples
                if s.name.endswith("_total")]
    assert received == [value(text_format, "grokwatch_collector_messages_received_total")]
