"""Which rows of a training forward are summarized, and under which sample ids.

The monitor asks at the start of each training forward of its model (the top-level forward pre-hook):
``has_budget(step)`` (is the step sampled, and is some of its budget left), then — once it knows the
batch is one it can summarize — ``choose(step, num_rows)``. Every ``every_n_steps`` steps up to
``max_samples_per_step`` rows are summarized, across the forwards of the step (gradient accumulation
shares one budget). Rows named by ``tag()`` are chosen by the CRC32 of their id, so that a sample is
followed whenever it recurs; untagged rows are the first ones, under ids unique within the run.
"""

from __future__ import annotations

import logging
import zlib
from typing import Optional, Sequence

import torch

log = logging.getLogger("grokwatch.agent")


def stable_key(sample_id: str) -> int:
    return zlib.crc32(sample_id.encode())


class Sampler:
    def __init__(self, *, every_n_steps: int, max_samples_per_step: int, rank: int = 0, world_size: int = 1):
        self.every_n_steps = every_n_steps
        self.max_samples_per_step = max_samples_per_step
        self.rank, self.world_size = rank, world_size
        self._tag: Optional[tuple[list[str], list[str]]] = None  # names the rows of the next forward
        self._step = -1  # the step the counts below are of
        self._taken = 0  # rows summarized in it
        self._rows_in_step = 0  # rows of its earlier forwards: untagged ids number on
        self.mismatched_tags = 0  # tags whose length was not the forward's rows (logged once)

    def tag(self, sample_ids: Optional[Sequence] = None, groups: Optional[Sequence] = None) -> None:
        """Name the rows of the next forward (ids and groups as strings of at most 200 characters; a
        tensor of them gives its values, in one call, not "tensor(7)" per element and not one host sync
        per element when it is on the device). Groups alone: the first rows, under run-unique ids.
        Raises on input it cannot read."""
        sample_ids = sample_ids.tolist() if isinstance(sample_ids, torch.Tensor) else sample_ids
        groups = groups.tolist() if isinstance(groups, torch.Tensor) else groups
        ids = [str(s)[:200] for s in sample_ids] if sample_ids is not None else None
        grp = [str(g)[:200] for g in groups] if groups is not None else None
        if ids is None and grp is None:
            self._tag = None
        elif ids is None or grp is None or len(grp) == len(ids):
            self._tag = (ids, grp if grp is not None else ["all"] * len(ids))
        else:
            self._tag = None
            self._mismatch(f"{len(ids)} sample ids and {len(grp)} groups")

    def _mismatch(self, what: str) -> None:
        self.mismatched_tags += 1
        if self.mismatched_tags == 1:
            log.warning("grokwatch: tag(): %s; that forward's rows go out untagged (counted in stats()"
                        "['mismatched_tags'], logged once). Tag each forward with one id and group per row.", what)

    def has_budget(self, step: int) -> bool:
        """Whether a forward at ``step`` may be summarized. False drops the tag: it named this forward."""
        if step % self.every_n_steps == 0:
            if self._step != step:
                self._step, self._taken, self._rows_in_step = step, 0, 0
            if self._taken < self.max_samples_per_step:
                return True
        self._tag = None
        return False

    def drop_tag(self) -> None:
        """This forward will not be summarized after all (has_budget said it could be)."""
        self._tag = None

    def choose(self, step: int, num_rows: int) -> tuple[list[int], list[str], list[str]]:
        """The rows of this forward to summarize (after ``has_budget(step)``), with every row's id and group."""
        budget = self.max_samples_per_step - self._taken
        tag, self._tag = self._tag, None
        first_row, self._rows_in_step = self._rows_in_step, self._rows_in_step + num_rows
        if tag is not None and len(tag[1]) != num_rows:
            self._mismatch(f"{len(tag[1])} rows tagged for a forward of {num_rows}")
        if tag is not None and tag[0] is not None and len(tag[0]) == num_rows:
            ids, groups = tag
            order = sorted(range(num_rows), key=lambda r: (stable_key(ids[r]), r))
            rows = sorted(order[:budget])
        else:
            # Unique within the run: rows of later forwards in the step (gradient accumulation) are numbered
            # on, and other ranks' rows carry their rank (the collector follows samples by id alone).
            where = f"{step}:" if self.world_size == 1 else f"{step}:{self.rank}:"
            ids = [f"{where}{first_row + r}" for r in range(num_rows)]
            named = tag is not None and tag[0] is None and len(tag[1]) == num_rows
            groups = tag[1] if named else ["all"] * num_rows
            rows = list(range(min(budget, num_rows)))
        self._taken += len(rows)
        return rows, ids, groups
