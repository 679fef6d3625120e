"""The collector process: config -> state (restored from the snapshot) ->
ingest threads -> /metrics (+ OTLP) -> periodic snapshots; SIGTERM snapshots
and exits cleanly.

    from grokwatch.collector.service import Collector
    from grokwatch.collector.config import CollectorConfig
    c = Collector(CollectorConfig(listen=("tcp://127.0.0.1:0",), metrics_port=0, state_dir="/tmp/gw"))
    c.start(); print(c.endpoints, c.metrics_port); ...; c.stop()
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional

from grokwatch.collector import cardinality, kernels, pipeline, wal, warmup
from grokwatch.collector.config import CollectorConfig, ConfigError, otlp_requested
from grokwatch.collector.ingest import Ingest
from grokwatch.collector.periodic import Periodic
from grokwatch.collector.persist import (
    Journal,
    SnapshotError,
    check_writable,
    read_snapshot,
    set_aside,
    snapshot_bytes,
    write_snapshot,
)
from grokwatch.collector.prometheus import make_registry, serve
from grokwatch.collector.state import State
from grokwatch.collector.wal import WriteAheadLog
from grokwatch.wire import Limits

log = logging.getLogger("grokwatch.collector")

# The process beside its pathway state: Python, Numba's compiled kernels, the HTTP server, the journal's
# buffers (a fresh collector is ~155 MiB; docs/collector.md, "Memory bound").
BASE_MEMORY_MB = 256
SNAPSHOT_RETRY_S = 5.0  # a failed snapshot (a full disk) is tried again this soon, whatever the interval
CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def worst_case_memory_mb(config: CollectorConfig) -> int:
    """The most memory the configured collector can need: its pathway state (``max_memory_mb``) twice (a
    snapshot is a copy of it), the ingest queue (``queue_max_bytes``: messages queued and in the kernels),
    and the rest of the process."""
    return BASE_MEMORY_MB + 2 * config.max_memory_mb + -(-config.queue_max_bytes // 2**20)


def memory_limit_mb(paths: tuple = CGROUP_LIMIT_FILES) -> Optional[int]:
    """The container's memory limit (cgroup v2, then v1), or None where there is none."""
    for path in paths:
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit() or int(text) >= 1 << 60:  # v1 says "no limit" with ~2^63
            return None
        return int(text) // 2**20
    return None


def check_memory(config: CollectorConfig, limit_mb: Optional[int]) -> None:
    """Refuse to start where the worst case cannot fit the container's limit (an OOM kill later, under load,
    would lose what was in flight): one line naming the knobs."""
    need = worst_case_memory_mb(config)
    if limit_mb is not None and need > limit_mb:
        raise ConfigError(f"the worst case of this configuration needs {need} MiB (2 x max_memory_mb "
                          f"{config.max_memory_mb} + queue_max_bytes {config.queue_max_bytes // 2**20} MiB + "
                          f"{BASE_MEMORY_MB} MiB), over the container's memory limit of {limit_mb} MiB: "
                          "lower max_memory_mb or queue_max_bytes, or raise the limit")


def snapshot_blob(state: State) -> bytes:
    """A consistent, serialized copy of the state: taken quiesced (no message half applied)."""
    with state.quiesce():
        return snapshot_bytes(state.snapshot())


class Collector:
    def __init__(self, config: CollectorConfig, *, otel_exporters: Optional[list] = None, environ=None):
        check_memory(config, memory_limit_mb())
        self.config = config
        self.environ = os.environ if environ is None else environ
        if config.state_dir:
            check_writable(config.state_dir)  # OSError in one line: the CLI exits 2 with it
        # the journal counts its write errors in the state it is the sink of
        self.journal = (Journal(config.state_dir, config.journal_max_bytes,
                                on_error=lambda what: self.state.count_persist_error(what))
                        if config.state_dir else None)
        self.state = State(config, journal=self.journal)
        if config.state_dir:
            self._resume(config.state_dir)
        self.otel_exporters = otel_exporters  # None: from the OTEL_* variables
        self.ingest: Optional[Ingest] = None
        self.otel = None
        self.tensorboard = None
        self.wandb = None
        self.ready = False  # the end of start(): ingest bound, the state restored (and not_ready() for /readyz)
        self.snapshot_failing = False
        self.metrics_port: Optional[int] = None
        self._server = None
        self._stop = threading.Event()
        # Snapshots every snapshot_interval_s, sooner when woken (the write-ahead log past wal_max_bytes, or
        # writing again after failures), a failed one retried within SNAPSHOT_RETRY_S.
        self._snapshots = Periodic("grokwatch-snapshot", self.config.snapshot_interval_s, self._snapshot_round,
                                   on_error=self._snapshot_failed)
        self.wal: Optional[WriteAheadLog] = None

    def _resume(self, state_dir: str) -> None:
        """Restore the snapshot, once it has proved itself on a scratch state (restored and rendered as
        /metrics): a snapshot that is unreadable, foreign, crafted or of the wrong types is moved aside,
        logged in one line and counted, and the collector starts fresh — never a crash loop, never a
        /metrics that errors."""
        try:
            snap = read_snapshot(state_dir)
            if snap is None:
                return
            from grokwatch.collector.schema import validate_state
            from grokwatch.collector.view import build_view

            validate_state(snap, self.config)  # the shapes and ranges the kernels index by
            scratch = State(self.config)
            scratch.restore(snap)
            build_view(scratch)
        except Exception as exc:  # SnapshotError, or a type the restored state cannot work with
            reason = str(exc) if isinstance(exc, SnapshotError) else f"{type(exc).__name__}: {exc}"[:300]
            try:
                where = set_aside(state_dir)
            except OSError as move_error:
                where = f"(could not be moved: {move_error})"
            log.error("snapshot in %s not used, starting fresh: %s; moved to %s", state_dir, reason, where)
            self.state.count_persist_error("snapshot_read")
            return
        self.state.restore(snap)  # the scratch state is dropped: its objects become ours
        log.info("resumed from the snapshot in %s", state_dir)

    @property
    def endpoints(self) -> list[str]:
        return self.ingest.endpoints if self.ingest else []

    def _replay(self, state_dir: str) -> int:
        """Apply the write-ahead records the snapshot does not hold (a SIGKILL, a crash): messages applied
        after the last snapshot, and those still queued at the kill. Their journal lines written before
        the kill are not written again. Returns the next record index."""
        journaled = wal.journaled_records(self.journal.path) if self.journal else wal.JournaledRecords()
        replayed, last = pipeline.replay(self.state, wal.read(state_dir, on_bad=self.state.count_persist_error),
                                         Limits(max_message_bytes=self.config.max_message_bytes), journaled)
        if replayed:
            log.warning("resumed after an unclean stop: %d write-ahead records replayed on the snapshot", replayed)
        return last + 1

    def start(self) -> "Collector":
        exporters, interval_s = self.otel_exporters, None
        if exporters is None and otlp_requested(self.environ):  # OpenTelemetry imported only when asked for
            from grokwatch.collector.otlp import export_interval_s, otlp_exporters_from_env

            exporters = otlp_exporters_from_env(self.environ)  # ConfigError on a protocol it cannot speak
            interval_s = export_interval_s(self.environ)
        if self.config.tensorboard_dir:  # before any socket: a missing extra is one line at start
            from grokwatch.collector.tensorboard import TensorBoardView

            self.tensorboard = TensorBoardView(self.state, self.config.tensorboard_dir,
                                               self.config.tensorboard_interval_s)
        if self.config.wandb_dir:
            from grokwatch.collector.wandb_view import WandbView

            self.wandb = WandbView(self.state, self.config)
        try:
            kernels.seed_cache()  # the image's prebuilt kernels (docs/deploy.md, "Fast start")
        except OSError as exc:
            log.warning("prebuilt kernel cache not copied (%s): the kernels compile", exc)
        warmup.warm_up()  # compile or load from the cache before the first message
        if self.config.state_dir:
            next_index = self._replay(self.config.state_dir)
            self.wal = WriteAheadLog(self.config.state_dir, next_index, self.config.wal_max_bytes,
                                     on_error=self.state.count_persist_error, on_full=self._snapshots.wake,
                                     on_recovered=self._snapshots.wake)
            try:
                self.snapshot()  # holds the replay: the old generations can go
                self.wal.discard_replayed()
            except OSError as exc:
                log.warning("snapshot after start-up failed (%s): the write-ahead log is kept", exc)
        self.ingest = Ingest(self.state, self.config.listen, queue_capacity=self.config.queue_capacity,
                             max_message_bytes=self.config.max_message_bytes,
                             queue_max_bytes=self.config.queue_max_bytes,
                             curve_secret_key=self.config.curve_secret_key,
                             curve_allowed_clients=self.config.curve_allowed_clients, wal=self.wal,
                             kernel_workers=self.config.kernel_workers,
                             handshake_timeout_s=self.config.handshake_timeout_s,
                             max_connections=self.config.max_ingest_connections)
        registry = make_registry(self.state, self.ingest.queue_stats)
        self._server, _, self.metrics_port = serve(registry, self.config.metrics_addr, self.config.metrics_port,
                                                   self.config.tls_certfile, self.config.tls_keyfile,
                                                   ready=self.not_ready)
        if exporters:
            from grokwatch.collector.otlp import DEFAULT_INTERVAL_S, OtelView, instance_id

            self.otel = OtelView(self.state, exporters, self.ingest.queue_stats, interval_s or DEFAULT_INTERVAL_S,
                                 self.environ, instance_id(self.metrics_port)).start()
        if self.tensorboard:
            self.tensorboard.queue_stats = self.ingest.queue_stats
            self.tensorboard.start()
        if self.wandb:
            self.wandb.queue_stats = self.ingest.queue_stats
            self.wandb.start()
        self.ingest.start()
        if self.config.state_dir:
            self._snapshots.start()
        log.info("listening on %s", ", ".join(self.endpoints))
        log.info("%s", cardinality.startup_line(self.config))
        self.ready = True
        return self

    def not_ready(self) -> Optional[str]:
        """/readyz: None when ready; else what is not working — start-up unfinished, an ingest thread
        ended, or a persister failing (the write-ahead log, the journal, the last snapshot)."""
        if not self.ready:
            return "starting"
        problem = self.ingest.working() if self.ingest else "ingest not started"
        if problem:
            return problem
        if self.wal is not None and not self.wal.healthy:
            return "the write-ahead log cannot write (persist_errors_total{what=\"wal_write\"})"
        if self.journal is not None and not self.journal.healthy:
            return "the journal cannot write (persist_errors_total{what=\"journal_write\"})"
        if self.snapshot_failing:
            return "the last snapshot failed (persist_errors_total{what=\"snapshot_write\"})"
        return None

    def snapshot(self) -> None:
        """Flush the journal and write a consistent snapshot. A failure (a full disk) is counted
        (``snapshot_write``), logged, and raised; the temp file is gone."""
        if not self.config.state_dir:
            return
        if self.journal:
            self.journal.flush()
        with self.state.quiesce():  # the log's cut and the state's copy at the same instant, no message half applied
            if self.wal:
                self.wal.rotate()
            applied = list(self.state.wal_applied)
            if self.state.wal_held:  # a held-back message's record stays until it is applied
                applied[0] = min(applied[0], min(self.state.wal_held) - 1)
            blob = snapshot_blob(self.state)
        try:
            write_snapshot(self.config.state_dir, blob)
        except OSError:
            self.state.count_persist_error("snapshot_write")
            raise
        if self.wal:
            self.wal.trim(*applied)

    def _snapshot_round(self) -> None:
        self.snapshot()
        self.snapshot_failing = False

    def _snapshot_failed(self, exc: BaseException) -> float:
        """OSError: a full disk, no inodes (counted in snapshot()); anything else a loop error. Retried soon."""
        wait_s = min(self.config.snapshot_interval_s, SNAPSHOT_RETRY_S)
        self.snapshot_failing = True
        if not isinstance(exc, OSError):
            self.state.count_loop_error("snapshot")
        log.warning("snapshot failed (%s: %s); counted, retried in %.0f s", type(exc).__name__, exc, wait_s)
        return wait_s

    def stop(self) -> None:
        self.ready = False
        self._stop.set()
        # one snapshot at a time (both would write the same temp file): wait for the round in progress
        self._snapshots.shutdown(deadline_s=None)
        if self.ingest:
            self.ingest.stop()
        try:
            self.snapshot()
        except OSError as exc:
            log.error("final snapshot failed: %s", exc)
        except Exception:
            log.exception("final snapshot failed")
        if self._server:
            self._server.shutdown()
            self._server.server_close()
        if self.otel:
            self.otel.shutdown()
        if self.tensorboard:
            self.tensorboard.shutdown()
        if self.wandb:
            self.wandb.shutdown()
        if self.journal:
            self.journal.close()
        if self.wal:
            self.wal.close()

    def request_stop(self) -> None:
        """Ask ``wait`` to return (safe from a signal handler); ``stop`` then shuts the collector down."""
        self._stop.set()

    def wait(self) -> None:
        self._stop.wait()
