"""OpenTelemetry view: observable instruments whose callbacks read the same
snapshot as the Prometheus view (``view.build_view``).

OTel has no observable histogram, so a histogram family becomes three
observable counters: ``<name>_bucket`` (attribute ``le``, cumulative),
``<name>_sum`` and ``<name>_count``; a summary becomes ``_sum`` and ``_count``.
Export over OTLP/HTTP is configured by the standard ``OTEL_*`` variables
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_METRIC_EXPORT_INTERVAL``, …).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import numpy as np
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource

from grokwatch._version import __version__
from grokwatch.collector.config import otlp_requested
from grokwatch.collector.state import State
from grokwatch.collector.view import Family, build_view

_CACHE_S = 0.5  # one snapshot serves every instrument of one collection


class OtelView:
    def __init__(self, state: State, readers: list[MetricReader],
                 queue_stats: Optional[Callable[[], tuple[int, int]]] = None):
        self.state = state
        self.queue_stats = queue_stats
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Family]] = (0.0, {})
        self.provider = MeterProvider(metric_readers=readers,
                                      resource=Resource.create({"service.name": "grokwatch-collector"}))
        meter = self.provider.get_meter("grokwatch.collector", __version__)
        for fam in build_view(state, queue_stats):
            self._register(meter, fam)

    def _families(self) -> dict[str, Family]:
        with self._lock:
            at, fams = self._cached
            if time.monotonic() - at > _CACHE_S:
                fams = {f.name: f for f in build_view(self.state, self.queue_stats)}
                self._cached = (time.monotonic(), fams)
            return fams

    def _register(self, meter, fam: Family) -> None:
        name, labels = fam.name, fam.labels

        def attrs(values):
            return dict(zip(labels, values))

        def simple(_: CallbackOptions):
            return [Observation(float(v), attrs(values)) for values, v in self._families()[name].samples]

        def part(index):
            def cb(_: CallbackOptions):
                out = []
                for values, v in self._families()[name].samples:
                    out.append(Observation(float(v[index]), attrs(values)))
                return out
            return cb

        def buckets(_: CallbackOptions):
            out = []
            for values, (bounds, counts, _total) in self._families()[name].samples:
                cum = np.cumsum(counts)
                for b, c in zip(list(bounds) + [float("inf")], cum):
                    out.append(Observation(float(c), {**attrs(values), "le": "+Inf" if np.isinf(b) else repr(float(b))}))
            return out

        if fam.kind == "counter":
            meter.create_observable_counter(name, callbacks=[simple], description=fam.help)
        elif fam.kind == "gauge":
            meter.create_observable_gauge(name, callbacks=[simple], description=fam.help)
        elif fam.kind == "histogram":
            meter.create_observable_counter(name + "_bucket", callbacks=[buckets], description=fam.help)
            meter.create_observable_counter(name + "_sum", callbacks=[part(2)], description=fam.help)
            meter.create_observable_counter(name + "_count", callbacks=[lambda o: [
                Observation(float(np.sum(v[1])), attrs(values)) for values, v in self._families()[name].samples]],
                description=fam.help)
        else:  # summary (count, sum)
            meter.create_observable_counter(name + "_count", callbacks=[part(0)], description=fam.help)
            meter.create_observable_counter(name + "_sum", callbacks=[part(1)], description=fam.help)

    def shutdown(self) -> None:
        self.provider.shutdown()


def otlp_readers_from_env(environ) -> list[MetricReader]:
    """A periodic OTLP/HTTP reader when OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT is set."""
    if not otlp_requested(environ):
        return []
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    return [PeriodicExportingMetricReader(OTLPMetricExporter())]
