"""A real Prometheus (Debian's package) scrapes the collector on loopback."""

from __future__ import annotations

import subprocess

import pytest

from grokwatch.wire import encode
from helpers import Pusher, prom_query, prometheus, start_collector, wait_until
from wire_factories import make_hello, make_routing

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]


def test_prometheus_scrapes_and_computes_the_group_mean_distance(tmp_path):
    collector = start_collector(tmp_path, comparisons_per_sample=64)
    pusher = Pusher(collector.endpoints[0])
    try:
        pusher.send(encode(make_hello()))
        for seq in range(1, 4):
            pusher.send(encode(make_routing(seq=seq, n=4)))
        wait_until(lambda: collector.state.samples_total == 12)
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: grokwatch\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{collector.metrics_port}']\n")
        check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        with prometheus(config, tmp_path / "tsdb") as port:

            def scraped():
                try:
                    return prom_query(port, 'grokwatch_pathway_distance_count{group="math"}')
                except OSError:
                    return None

            result = wait_until(scraped, timeout_s=30, interval_s=0.5)
            expected = collector.state.streams[("run-a", "train")].groups["math"].series.hist["distance"]
            assert float(result[0]["value"][1]) == expected.count
            mean = prom_query(port, 'grokwatch_pathway_distance_sum{group="math"} '
                                    '/ grokwatch_pathway_distance_count{group="math"}')
            assert float(mean[0]["value"][1]) == pytest.approx(expected.sum / expected.count)
            up = prom_query(port, 'up{job="grokwatch"}')
            assert up[0]["value"][1] == "1"
    finally:
        pusher.close()
        collector.stop()
