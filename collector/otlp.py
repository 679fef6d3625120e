"""OpenTelemetry view: the same snapshot as the Prometheus view (``view.build_view``), exported over OTLP
as the data types backends read right.

- counters: cumulative monotonic Sums; gauges: Gauges;
- histograms: OTLP Histograms with their explicit bounds, cumulative. A histogram whose values can be
  negative (its first bound is below zero: the adjacent cosine, the consistency) carries no ``sum`` in
  the Histogram point (the OTLP data model: a histogram sum is assumed to be of non-negative events);
  its sum is the view's gauge ``<name>_sum_signed``, as on /metrics;
- summaries (count, sum of a non-negative quantity): ``<name>_count`` and ``<name>_sum``, monotonic Sums.

The SDK has no observable histogram, so this view builds the export batch itself (``collect()``) and a
thread hands it to the exporters every ``OTEL_METRIC_EXPORT_INTERVAL`` milliseconds (default 60,000)
and once more at shutdown. The exporter follows the standard variables: ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or ``…_METRICS_ENDPOINT``), ``OTEL_EXPORTER_OTLP_(METRICS_)PROTOCOL`` — ``http/protobuf`` (default) or
``grpc`` (the ``otlp-grpc`` extra); anything else is refused at start with one line.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import urllib.parse
from typing import Callable, Mapping, Optional

import numpy as np
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from grokwatch._version import __version__
from grokwatch.collector.config import ConfigError, otlp_requested
from grokwatch.collector.periodic import Periodic
from grokwatch.collector.state import State
from grokwatch.collector.view import Family, HistogramValue, SummaryValue, ViewMemo, build_view, scalar

log = logging.getLogger("grokwatch.collector")

CUMULATIVE = AggregationTemporality.CUMULATIVE
PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_INTERVAL_S = 60.0


def instance_id(metrics_port: Optional[int] = None) -> str:
    """``service.instance.id`` by default: the host and the /metrics port (one collector a port on a host, and
    the same after a restart, so a backend sees one series reset rather than a new one per restart); the host
    and pid where there is no port. The shipped manifests name the pod instead (OTEL_RESOURCE_ATTRIBUTES)."""
    return f"{socket.gethostname()}:{os.getpid() if metrics_port is None else metrics_port}"


def resource(environ=None, instance: Optional[str] = None) -> Resource:
    """This collector's OTLP resource: service.name, service.version, service.instance.id, then whatever
    OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME say, which wins."""
    env = os.environ if environ is None else environ
    ours = Resource.create({"service.name": "grokwatch-collector", "service.version": __version__,
                            "service.instance.id": instance or instance_id()})
    theirs = {}
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            theirs[urllib.parse.unquote(key.strip())] = urllib.parse.unquote(value.strip())
    if env.get("OTEL_SERVICE_NAME"):
        theirs["service.name"] = env["OTEL_SERVICE_NAME"]
    return ours.merge(Resource(theirs))


# UCUM units of what the counters and gauges count, by the word their name ends in (after _total); the rest
# by the Prometheus suffix: seconds, bytes, else dimensionless ("1": ratios, distances, shares, losses).
COUNTED = {"messages": "{message}", "messages_received": "{message}", "messages_rejected": "{message}",
           "messages_lost": "{message}", "messages_sent": "{message}", "messages_dropped": "{message}",
           "step": "{step}", "ranks": "{rank}", "queue_size": "{message}", "queue_capacity": "{message}",
           "samples": "{sample}", "samples_processed": "{sample}", "tokens": "{token}", "forwards": "{forward}",
           "experts": "{expert}", "connections": "{connection}", "failures": "{handshake}", "errors": "{error}",
           "disconnects": "{disconnect}", "scrapes_stale": "{scrape}", "reads_stale": "{read}",
           "pathways": "{pathway}", "undefined": "{sample}"}


def unit(name: str) -> str:
    """A metric's UCUM unit: seconds, bytes, a count of something ({message}, {sample}, ...), else 1."""
    if name.endswith("_count"):  # a summary's count: of observations
        return "1"
    base = name.removesuffix("_total").removesuffix("_sum")
    if base.endswith("_seconds"):
        return "s"
    if base.endswith("_bytes"):
        return "By"
    for word, counted in COUNTED.items():
        if base.endswith("_" + word):
            return counted
    return "1"


class OtelView:
    def __init__(self, state: State, exporters: list[MetricExporter],
                 queue_stats: Optional[Callable[[], tuple]] = None, interval_s: float = DEFAULT_INTERVAL_S,
                 environ=None, instance: Optional[str] = None):
        self.state = state
        self.exporters = exporters
        self.queue_stats = queue_stats
        self.memo = ViewMemo()  # this view's stale-read fallbacks (view.py)
        self.interval_s = interval_s
        self.start_ns = time.time_ns()  # the start of every cumulative series this process exports
        # Who sent it: several collectors pushing cumulative sums with the same attributes would otherwise
        # collide in a backend. OTEL_RESOURCE_ATTRIBUTES (the shipped manifests: the pod's name from the
        # downward API) and OTEL_SERVICE_NAME add to these and win (Resource.create alone lets ours win).
        self.resource = resource(environ, instance)
        self.scope = InstrumentationScope("grokwatch.collector", __version__)
        self.export_failures = 0
        # the last export (what changed since the last interval) is the shutdown's, where there is an exporter
        self._periodic = Periodic("grokwatch-otlp", interval_s, self._round,
                                  final=self.export_once if exporters else None)
        self._closed = False

    def start(self) -> "OtelView":
        if self.exporters:
            self._periodic.start()
        return self

    def collect(self) -> MetricsData:
        """One export batch from one snapshot of the state."""
        now = time.time_ns()
        metrics: list[Metric] = []
        for fam in build_view(self.state, self.queue_stats, self.memo):
            if fam.samples:  # a family with no series yet: no metric (OTLP has no empty one)
                metrics.extend(self._metrics(fam, now))
        return MetricsData([ResourceMetrics(self.resource, [ScopeMetrics(self.scope, metrics, "")], "")])

    def _metrics(self, fam: Family, now: int) -> list[Metric]:
        u = unit(fam.name)

        def attrs(values):
            return dict(zip(fam.labels, values))

        def number(values, v):
            return NumberDataPoint(attrs(values), self.start_ns, now, scalar(v))

        def total(name, points, monotonic):
            return Metric(name, fam.help, unit(name), Sum(points, CUMULATIVE, monotonic))

        if fam.kind == "counter":
            return [total(fam.name, [number(k, v) for k, v in fam.samples], True)]
        if fam.kind == "gauge":
            return [Metric(fam.name, fam.help, u, Gauge([number(k, v) for k, v in fam.samples]))]
        if fam.kind == "summary":  # the count and sum of a non-negative quantity
            counts, sums = [], []
            for k, summary in fam.samples:
                assert isinstance(summary, SummaryValue)
                counts.append(number(k, summary.count))
                sums.append(number(k, summary.sum))
            return [total(fam.name + "_count", counts, True), total(fam.name + "_sum", sums, True)]
        points = []
        for k, hist in fam.samples:
            assert isinstance(hist, HistogramValue)
            bounds, value_sum = hist.bounds, hist.sum
            counts = np.asarray(hist.counts, dtype=np.int64)
            is_signed = fam.signed  # view.Spec.signed
            # The SDK's annotations ask for a sum, min and max; the OTLP data model makes all three optional,
            # and its encoder leaves out what is None (a signed histogram has no sum; we keep no min, max).
            points.append(HistogramDataPoint(attrs(k), self.start_ns, now, int(counts.sum()),
                                             None if is_signed else float(value_sum),  # pyright: ignore[reportArgumentType]
                                             [int(c) for c in counts], [float(b) for b in bounds],
                                             None, None))  # pyright: ignore[reportArgumentType]
        return [Metric(fam.name, fam.help, u, Histogram(points, CUMULATIVE))]

    def export_once(self) -> bool:
        data = self.collect()
        ok = True
        for exporter in self.exporters:
            try:
                result = exporter.export(data)
            except Exception as exc:  # an exporter must never take the collector down
                result = MetricExportResult.FAILURE
                log.warning("OTLP export raised %s: %s", type(exc).__name__, exc)
            if result != MetricExportResult.SUCCESS:
                ok = False
        if not ok:
            self.export_failures += 1
            log.warning("OTLP export failed (%d so far); the next interval retries", self.export_failures)
        return ok

    def _round(self) -> None:
        self.export_once()

    def shutdown(self, deadline_s: float = 10.0) -> None:
        """Once: the last export, then every exporter's shutdown; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self._periodic.shutdown(deadline_s)
        for exporter in self.exporters:
            try:
                exporter.shutdown()
            except Exception:
                pass


def otlp_protocol(environ: Mapping[str, str]) -> str:
    protocol = (environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip()
    if protocol not in PROTOCOLS:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: the collector exports "
                          f"{' or '.join(PROTOCOLS)}")
    return protocol


def export_interval_s(environ: Mapping[str, str]) -> float:
    raw = environ.get("OTEL_METRIC_EXPORT_INTERVAL")
    if raw is None or raw.strip() == "":
        return DEFAULT_INTERVAL_S
    try:
        ms = float(raw)
    except ValueError:
        ms = -1.0
    if not ms > 0:
        raise ConfigError(f"OTEL_METRIC_EXPORT_INTERVAL={raw!r}: expected a positive number of milliseconds")
    return ms / 1000.0


def otlp_exporters_from_env(environ: Mapping[str, str]) -> list[MetricExporter]:
    """The OTLP exporter the standard variables ask for; [] when no endpoint is set. ConfigError on a
    protocol this collector cannot speak (or whose extra is not installed)."""
    if not otlp_requested(environ):
        return []
    if otlp_protocol(environ) == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # pyright: ignore[reportMissingImports]
                OTLPMetricExporter,  # the otlp-grpc extra
            )
        except ImportError:
            raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the gRPC exporter: "
                              "pip install 'grokwatch[otlp-grpc]'") from None
        return [OTLPMetricExporter()]
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return [OTLPMetricExporter()]
