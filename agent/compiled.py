"""The batched reduction compiled with torch.compile: on CUDA, a few fused
kernels instead of ~25 separate ones, each a launch of host time on the
training step and a pass over [layers, rows, tokens, experts] in memory.

``CompiledReduction`` wraps reduce.py's ``summarize`` (means, entropies,
counts, the adjacent-layer cosines for consecutive layers with usable router
weights, and the writes into the staging views); reduce_all calls it in place
of the op-by-op function. A compiled call has a fixed host cost (dynamo's
guards, the generated wrapper; measured in docs/benchmarks.md), paid once a
sampled step. The first
call compiles (a one-time pause of the training step, logged with its
duration; a new sequence length compiles once more, then for any length). If
compiling or running compiled code raises, the error is logged once and the
op-by-op function takes over for good: the step still gets its summary, and
``Monitor.stats()["reduction"]`` says why.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch

from grokwatch.agent.reduce import summarize

log = logging.getLogger("grokwatch.agent")


def compile_by_default(device: torch.device) -> bool:
    """``attach(compile_reduction=None)``: compiled on CUDA, where the op-by-op reduction's launches and
    memory passes are what a sampled step costs; op by op on CPU (slower compiled at the tiny shape
    measured here, and no compile pause, no C++ toolchain needed)."""
    return device.type == "cuda"


class CompiledReduction:
    """``summarize`` through torch.compile (fullgraph: a graph break would quietly undo the fusion),
    falling back to op by op on the first error. Called as ``summarize``."""

    def __init__(self) -> None:
        self._fn: Optional[Callable] = None
        self.error: Optional[BaseException] = None
        self.compile_seconds: Optional[float] = None  # the first call: compile and run

    @property
    def state(self) -> str:
        if self.error is not None:
            return f"op by op (compiling failed: {type(self.error).__name__})"
        return "compiled" if self.compile_seconds is not None else "compiled (not yet run)"

    def __call__(self, *args, **kwargs):
        if self.error is None:
            try:
                if self._fn is None:
                    self._fn = torch.compile(summarize, fullgraph=True)
                if self.compile_seconds is None:
                    return self._first_call(args, kwargs)
                return self._fn(*args, **kwargs)
            except Exception as exc:  # no compiler toolchain, an unsupported platform, a dynamo limitation
                self.error = exc
                log.warning("grokwatch: compiling the batched reduction failed; it runs op by op from now on "
                            "(attach(compile_reduction=False) skips the attempt): %r", exc)
        return summarize(*args, **kwargs)

    def _first_call(self, args: tuple, kwargs: dict):
        """Compiles, then runs. Compiling may wait for the device once (loading kernels): a user's
        ``torch.cuda.set_sync_debug_mode("error")`` is relaxed for this call only, so that it does not
        cost the compiled path for the rest of the run; the calls after it run under the user's mode."""
        log.info("grokwatch: compiling the batched reduction (once; attach(compile_reduction=False) skips it)")
        mode = torch.cuda.get_sync_debug_mode() if args[0].is_cuda else 0
        if mode:
            torch.cuda.set_sync_debug_mode(0)
        try:
            start = time.perf_counter()
            assert self._fn is not None
            out = self._fn(*args, **kwargs)
        finally:
            if mode:
                torch.cuda.set_sync_debug_mode(mode)
        self.compile_seconds = time.perf_counter() - start
        log.info("grokwatch: the batched reduction was compiled in %.1f s (once)", self.compile_seconds)
        return out
