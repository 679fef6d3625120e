"""One way to run work every so often beside the collector: the OTLP export, the TensorBoard writer and the
snapshots (issue 30). A daemon thread runs ``work`` each interval or when woken; an exception is logged and
the next round retries (``on_error`` may shorten the wait: a failed snapshot retries within seconds); the
shutdown is idempotent — the first call stops the thread within its deadline and runs ``final`` once, later
calls do nothing — like OpenTelemetry's ``PeriodicExportingMetricReader``."""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

log = logging.getLogger("grokwatch.collector")


class Periodic:
    def __init__(self, name: str, interval_s: float, work: Callable[[], Optional[float]], *,
                 final: Optional[Callable[[], object]] = None,
                 on_error: Optional[Callable[[BaseException], Optional[float]]] = None):
        """``work()`` returns the seconds until the next round, or None for ``interval_s``; ``on_error(exc)``
        likewise after an exception (None: log it and wait an interval)."""
        self.name, self.interval_s = name, interval_s
        self._work, self._final, self._on_error = work, final, on_error
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._shut = False
        self._lock = threading.Lock()

    def start(self) -> "Periodic":
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        """Run the work now (or as soon as the round in progress ends)."""
        self._wake.set()

    def _loop(self) -> None:
        wait_s = self.interval_s
        while not self._stop.is_set():
            self._wake.wait(wait_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                nxt = self._work()
            except Exception as exc:
                nxt = self._on_error(exc) if self._on_error else None
                if self._on_error is None:
                    log.exception("%s failed; the next interval retries", self.name)
            wait_s = self.interval_s if nxt is None else nxt

    def shutdown(self, deadline_s: Optional[float] = 10.0) -> bool:
        """Stop the thread (waiting at most ``deadline_s`` for the round in progress; None: as long as it
        takes) and run ``final`` once. Returns whether the thread had stopped; a second call returns True and
        does nothing."""
        with self._lock:
            if self._shut:
                return True
            self._shut = True
        self._stop.set()
        self._wake.set()
        stopped = True
        if self._thread is not None:
            self._thread.join(timeout=deadline_s)
            stopped = not self._thread.is_alive()
            if not stopped:
                log.warning("%s did not stop within %.0f s; left to finish on its own", self.name, deadline_s)
        if self._final is not None and stopped:
            try:
                self._final()
            except Exception:
                log.exception("%s: the final round failed", self.name)
        return stopped
