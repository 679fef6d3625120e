"""A real Prometheus (Debian's package) scrapes the collector on loopback."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request

import pytest

from grokwatch.wire import encode
from helpers import Pusher, start_collector, wait_until
from wire_factories import make_hello, make_routing

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port: int, promql: str):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_and_computes_the_group_mean_distance(tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (make prometheus)")
    collector = start_collector(tmp_path, comparisons_per_sample=64)
    pusher = Pusher(collector.endpoints[0])
    prom = None
    try:
        pusher.send(encode(make_hello()))
        for seq in range(1, 4):
            pusher.send(encode(make_routing(seq=seq, n=4)))
        wait_until(lambda: collector.state.samples_total == 12)
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: grokwatch\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{collector.metrics_port}']\n")
        check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        prom = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def scraped():
            try:
                return query(port, 'grokwatch_pathway_distance_count{group="math"}')
            except OSError:
                return None

        result = wait_until(scraped, timeout_s=30, interval_s=0.5)
        expected = collector.state.streams[("run-a", "train")].groups["math"].series.hist["distance"]
        assert float(result[0]["value"][1]) == expected.count
        mean = query(port, 'grokwatch_pathway_distance_sum{group="math"} / grokwatch_pathway_distance_count{group="math"}')
        assert float(mean[0]["value"][1]) == pytest.approx(expected.sum / expected.count)
        up = query(port, 'up{job="grokwatch"}')
        assert up[0]["value"][1] == "1"
    finally:
        pusher.close()
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(10)
            except subprocess.TimeoutExpired:
                prom.kill()
        collector.stop()
