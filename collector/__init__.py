"""grokwatch.collector — the sidecar: ZeroMQ ingest, validation, per-group
state, Numba kernels, Prometheus and OpenTelemetry export, snapshots, journal.

Never imports torch (the sidecar image carries none).

Data path, one module a stage:

- ingest.py (ZeroMQ PULL, bounded queue) and wal.py (the write-ahead log) -> pipeline.py, the only
  writer of the state: admission.py under the state's lock, kernels on per-stream workers, finish (and the
  write-ahead replay, the same path);
- state.py, data only: sequence numbers (senders.py), runs and shapes (runs.py), rejections (reasons.py),
  memory bounds (budget.py); one stream.py per (run, source) whose arrays kernels.py writes (edit_distance.py;
  reference.py is the plain version the tests compare against);
- evidence.py: each message's points (points.py) into the phase trackers (phases.py,
  memorization.py) and the journal;
- view.py: a copy of it all as typed metric families (read only; each exporter keeps its own fallback
  readings) -> prometheus.py, otlp.py, tensorboard.py, wandb_view.py;
- persist.py (snapshots), service.py (the process), analysis.py and report.py (journals, offline);
- config.py: the options. Shapes in names: docs/shapes.md.
"""
