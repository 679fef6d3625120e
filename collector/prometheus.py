"""Prometheus view: a prometheus-client custom collector on its own registry,
served over HTTP (optionally TLS). Families are built fresh on every scrape
from ``view.build_view`` — the same snapshot the OpenTelemetry view reads.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.samples import Sample
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)

from grokwatch.collector.state import State
from grokwatch.collector.view import build_view

log = logging.getLogger(__name__)


def _le(bound: float) -> str:
    return repr(float(bound))


class PrometheusCollector:
    """``collect()`` renders one consistent snapshot of the state."""

    def __init__(self, state: State, queue_stats: Optional[Callable[[], tuple[int, int]]] = None):
        self.state = state
        self.queue_stats = queue_stats

    def describe(self):
        return []  # families vary with the data; nothing to pre-register

    def collect(self):
        for fam in build_view(self.state, self.queue_stats):
            name = fam.name
            labels = list(fam.labels)
            if fam.kind == "counter":
                out = CounterMetricFamily(name.removesuffix("_total"), fam.help, labels=labels)
                for values, v in fam.samples:
                    out.add_metric(list(values), float(v))
            elif fam.kind == "gauge":
                out = GaugeMetricFamily(name, fam.help, labels=labels)
                for values, v in fam.samples:
                    out.add_metric(list(values), float(v))
            elif fam.kind == "histogram":
                out = HistogramMetricFamily(name, fam.help, labels=labels)
                for values, (bounds, counts, total) in fam.samples:
                    cum = np.cumsum(counts)
                    buckets = [(_le(b), float(c)) for b, c in zip(bounds, cum[:-1])] + [("+Inf", float(cum[-1]))]
                    out.add_metric(list(values), buckets, float(total))
                    if bounds[0] < 0:
                        # prometheus-client leaves _sum and _count out when a bucket is negative
                        # (OpenMetrics wants a monotonic sum). METRICS.md §2 needs the group mean of
                        # consistency and cosine as sum / count, so they are written all the same.
                        labels_map = dict(zip(fam.labels, values))
                        out.samples.append(Sample(name + "_count", labels_map, float(cum[-1])))
                        out.samples.append(Sample(name + "_sum", labels_map, float(total)))
            else:  # summary: count and sum, no quantiles (aggregatable)
                out = SummaryMetricFamily(name, fam.help, labels=labels)
                for values, (count, total) in fam.samples:
                    out.add_metric(list(values), count_value=count, sum_value=total)
            yield out


def make_registry(state: State, queue_stats=None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusCollector(state, queue_stats))
    return registry


def serve(registry: CollectorRegistry, addr: str, port: int, certfile: Optional[str] = None,
          keyfile: Optional[str] = None):
    """Start the /metrics server; returns (server, thread, bound port)."""
    server, thread = start_http_server(port, addr=addr, registry=registry, certfile=certfile, keyfile=keyfile)
    bound = server.server_address[1]
    log.info("serving /metrics on %s:%d%s", addr, bound, " (TLS)" if certfile else "")
    return server, thread, bound
