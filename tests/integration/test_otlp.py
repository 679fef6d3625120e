"""OTLP export: the same snapshot as /metrics, in the OTLP data types, checked at a real receiver process.

The receiver is oteltap (PyPI), an OTLP/HTTP-protobuf receiver that prints what arrives as NDJSON, one
metric a line (the OTLP JSON mapping): the collector's own exporter sends to it over loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum

from grokwatch.collector.otlp import otlp_exporters_from_env
from helpers import free_port, scrape, send_all, start_collector
from wire_factories import make_hello, make_routing

ROOT = Path(__file__).parents[2]

GROUP = frozenset(dict(run="run-a", source="train", group="math").items())


def _load(collector, n=4):
    rng = np.random.default_rng(3)
    send_all(collector, [make_hello()] + [make_routing(rng=rng, seq=i + 1, n=n, step=5 * i, concentration=0.3)
                                          for i in range(3)])


def test_the_otlp_batch_is_the_prometheus_view_in_otlp_types(tmp_path):
    c = start_collector(tmp_path)
    try:
        _load(c)
        prom = scrape(c.metrics_port)
        from grokwatch.collector.otlp import OtelView, instance_id

        data = OtelView(c.state, [], c.ingest.queue_stats).collect()
        metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
        dist = metrics["grokwatch_pathway_distance"].data
        assert isinstance(dist, Histogram) and dist.aggregation_temporality == 2  # cumulative
        point = next(p for p in dist.data_points if frozenset(p.attributes.items()) == GROUP)
        assert point.count == prom["grokwatch_pathway_distance_count"][GROUP]
        assert point.sum == pytest.approx(prom["grokwatch_pathway_distance_sum"][GROUP])
        cumulative = np.cumsum(point.bucket_counts)
        for bound, c_le in zip(list(point.explicit_bounds) + [float("inf")], cumulative):
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            assert prom["grokwatch_pathway_distance_bucket"][GROUP | {("le", le)}] == c_le
        # A histogram of signed values: no sum in the point, the sum beside it as a gauge (it may fall).
        cos = metrics["grokwatch_pathway_adjacent_cosine"].data
        assert isinstance(cos, Histogram) and all(p.sum is None for p in cos.data_points)
        cos_sum = metrics["grokwatch_pathway_adjacent_cosine_sum_signed"].data
        assert isinstance(cos_sum, Gauge)
        assert {frozenset(p.attributes.items()): p.value for p in cos_sum.data_points}[GROUP] == pytest.approx(
            prom["grokwatch_pathway_adjacent_cosine_sum_signed"][GROUP])
        received = metrics["grokwatch_collector_messages_received_total"].data
        assert isinstance(received, Sum) and received.is_monotonic and received.data_points[0].value == 4
        assert isinstance(metrics["grokwatch_collector_queue_size"].data, Gauge)
        assert "grokwatch_pathway_distance_bucket" not in metrics  # no Prometheus-shaped counters any more
        # a family with no series yet is not sent as a metric without data points (a strict receiver refuses it)
        assert all(m.data.data_points for m in metrics.values()) and "grokwatch_eval_score" not in metrics
        # who sent it (issue 32): several collectors' cumulative sums must not collide in a backend
        resource = dict(data.resource_metrics[0].resource.attributes)
        from grokwatch._version import __version__

        assert resource["service.name"] == "grokwatch-collector" and resource["service.version"] == __version__
        assert resource["service.instance.id"].endswith(f":{os.getpid()}")  # a view with no /metrics port
        other = OtelView(c.state, []).collect().resource_metrics[0].resource.attributes
        assert other["service.instance.id"] == resource["service.instance.id"]  # one per process
        import socket

        named = OtelView(c.state, [], instance=instance_id(c.metrics_port)).collect()
        assert named.resource_metrics[0].resource.attributes["service.instance.id"] == \
            f"{socket.gethostname()}:{c.metrics_port}"
        assert metrics["grokwatch_collector_processing_seconds_sum"].unit == "s"
        assert metrics["grokwatch_collector_processing_seconds_count"].unit == "1"
        assert metrics["grokwatch_pathway_distance"].unit == "1"
        assert metrics["grokwatch_collector_messages_received_total"].unit == "{message}"
        assert metrics["grokwatch_collector_queue_bytes"].unit == "By"
        assert metrics["grokwatch_pathway_samples_total"].unit == "{sample}"
    finally:
        c.stop()


def _receiver(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "oteltap", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert "Listening" in line, line
    return proc


def test_a_real_otlp_receiver_reads_histograms_monotonic_sums_and_gauges(tmp_path, monkeypatch):
    import threading

    port = free_port()
    receiver = _receiver(port)
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(iter(receiver.stdout.readline, "")), daemon=True)
    reader.start()
    wanted = ("grokwatch_pathway_distance", "grokwatch_pathway_adjacent_cosine",
              "grokwatch_pathway_adjacent_cosine_sum_signed",
              "grokwatch_collector_messages_received_total", "grokwatch_collector_queue_capacity",
              "grokwatch_collector_processing_seconds_count")
    arrived: dict = {}
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        c = start_collector(tmp_path, otel_exporters=otlp_exporters_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "x"}))
        try:
            _load(c)
            prom = scrape(c.metrics_port)
            assert c.otel.export_once()
        finally:
            c.stop()  # and its final export
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the receiver has printed every metric we read, twice
            arrived = {}
            seen: dict = {}
            for line in list(lines):
                if line.startswith("{") and line.endswith("\n"):
                    m = json.loads(line)
                    arrived[m["name"]] = m  # the last export of each
                    seen[m["name"]] = seen.get(m["name"], 0) + 1
            if all(seen.get(name, 0) >= 2 for name in wanted):
                break
            time.sleep(0.1)
    finally:
        receiver.terminate()
        receiver.wait(10)
    dist = arrived["grokwatch_pathway_distance"]["histogram"]
    assert dist["aggregationTemporality"] == 2  # AGGREGATION_TEMPORALITY_CUMULATIVE
    point = next(p for p in dist["dataPoints"]
                 if {a["key"]: a["value"]["stringValue"] for a in p["attributes"]} == dict(GROUP))
    assert int(point["count"]) == prom["grokwatch_pathway_distance_count"][GROUP]
    assert point["sum"] == pytest.approx(prom["grokwatch_pathway_distance_sum"][GROUP])
    assert len(point["bucketCounts"]) == len(point["explicitBounds"]) + 1
    assert sum(int(b) for b in point["bucketCounts"]) == int(point["count"])
    cos = arrived["grokwatch_pathway_adjacent_cosine"]["histogram"]["dataPoints"]
    assert all(p.get("sum") is None for p in cos)  # signed values: the sum is not in the histogram
    assert "gauge" in arrived["grokwatch_pathway_adjacent_cosine_sum_signed"]
    received = arrived["grokwatch_collector_messages_received_total"]["sum"]
    assert received["isMonotonic"] is True and received["aggregationTemporality"] == 2
    assert received["dataPoints"][0]["asDouble"] == 4
    assert "gauge" in arrived["grokwatch_collector_queue_capacity"]
    assert "sum" in arrived["grokwatch_collector_processing_seconds_count"]
    assert arrived["grokwatch_collector_processing_seconds_count"].get("unit") == "1"
    assert arrived["grokwatch_pathway_distance"].get("unit") == "1"


@pytest.mark.parametrize("env, says", [
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "http/protobuf or grpc"),
    ({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "gprc"}, "http/protobuf or grpc"),
    ({"OTEL_METRIC_EXPORT_INTERVAL": "soon"}, "milliseconds"),
])
def test_an_otlp_setting_it_cannot_honour_stops_the_start_with_one_line(tmp_path, env, says):
    import os

    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}", **env}
    result = subprocess.run([sys.executable, "-m", "grokwatch.cli", "collector", "--listen",
                             f"tcp://127.0.0.1:{free_port()}", "--metrics-port", "0"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in lines[0], lines


def test_grpc_is_used_when_its_extra_is_installed_and_refused_in_one_line_otherwise():
    from grokwatch.collector.config import ConfigError

    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"grokwatch\[otlp-grpc\]"):
            otlp_exporters_from_env(env)
    else:
        (exporter,) = otlp_exporters_from_env(env)
        assert "grpc" in type(exporter).__module__
        exporter.shutdown()


@pytest.mark.slow
def test_two_collectors_pushing_at_once_stay_apart_at_a_real_receiver(tmp_path):
    """Issue 32: each collector's resource names it (service.instance.id: host and /metrics port by default, the
    pod's name where OTEL_RESOURCE_ATTRIBUTES says so, as the shipped manifests do), so the receiver keeps their
    cumulative sums apart: each instance's messages_received_total is its own collector's count."""
    import signal
    import socket
    import threading

    from grokwatch.wire import encode
    from helpers import Pusher

    port = free_port()
    receiver = subprocess.Popen([sys.executable, str(ROOT / "tests" / "otlp_receiver.py"), str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert receiver.stdout.readline().strip() == "listening"
    lines: list = []
    threading.Thread(target=lambda: lines.extend(iter(receiver.stdout.readline, "")), daemon=True).start()
    collectors, endpoints, pushers = [], [], []
    try:
        for extra in ({}, {"OTEL_RESOURCE_ATTRIBUTES": "service.instance.id=pod-b,k8s.pod.name=pod-b"}):
            endpoint = f"tcp://127.0.0.1:{free_port()}"
            env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                   "OTEL_METRIC_EXPORT_INTERVAL": "300", **extra}
            if not extra:
                env.pop("OTEL_RESOURCE_ATTRIBUTES", None)
            collectors.append(subprocess.Popen(
                [sys.executable, "-m", "grokwatch.cli", "collector", "--listen", endpoint, "--metrics-port", "0",
                 "--metrics-addr", "127.0.0.1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True))
            endpoints.append(endpoint)
        ports = []
        for proc in collectors:  # listening
            while "/metrics on port" not in (line := proc.stdout.readline()):
                assert line, "a collector exited"
            ports.append(int(line.rsplit("port", 1)[1]))
        for endpoint, n in zip(endpoints, (2, 4)):
            pusher = Pusher(endpoint)  # open until the end: closed with linger 0, it would drop what is queued
            pushers.append(pusher)
            pusher.send(encode(make_hello()))
            for seq in range(1, n + 1):
                pusher.send(encode(make_routing(seq=seq, step=seq, sender="s0")))
        want = {f"{socket.gethostname()}:{ports[0]}": 3, "pod-b": 5}
        got: dict = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and got != want:
            for line in list(lines):
                if line.startswith("{"):
                    m = json.loads(line)
                    received = m["metrics"].get("grokwatch_collector_messages_received_total")
                    if received is not None:
                        got[m["resource"]["service.instance.id"]] = int(received)
            time.sleep(0.2)
        assert got == want
        resources = {json.loads(line)["resource"]["service.instance.id"]: json.loads(line)["resource"]
                     for line in list(lines) if line.startswith("{")}
        assert resources["pod-b"]["k8s.pod.name"] == "pod-b"
        assert all(r["service.name"] == "grokwatch-collector" and r["service.version"] for r in resources.values())
    finally:
        for pusher in pushers:
            pusher.close()
        for proc in collectors:
            proc.send_signal(signal.SIGTERM)
        for proc in collectors:
            proc.wait(30)
        receiver.terminate()
        receiver.wait(10)


def test_every_counter_says_what_it_counts():
    """Issue 32: units on every instrument. A counter counts something (messages, samples, tokens, errors...):
    its OTLP unit is a UCUM count annotation ({message}) or seconds/bytes, never the bare "1" a new counter
    would fall back to if its name ended in a word the table does not know."""
    from grokwatch.collector.otlp import unit
    from grokwatch.collector.view import SPECS

    for spec in SPECS:
        name = "grokwatch_" + spec.name
        if spec.kind == "counter":
            assert unit(name) in ("s", "By") or unit(name).startswith("{"), name
    assert unit("grokwatch_collector_ingest_lag_seconds") == "s"
    assert unit("grokwatch_dead_experts") == "{expert}" and unit("grokwatch_expert_load_share") == "1"
