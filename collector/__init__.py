"""grokwatch.collector — the sidecar: ZeroMQ ingest, validation, per-group
state, Numba kernels, Prometheus and OpenTelemetry export, snapshots, journal.

Never imports torch (the sidecar image carries none).

Data path: ingest -> validate -> state (kernels beside reference) -> export.
"""
