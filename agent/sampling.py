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

from grokwatch.agent.status import Identity

log = logging.getLogger("grokwatch.agent")


def _nested(values) -> bool:
    """A list per row (documents of packed rows), not one name per row."""
    return values is not None and len(values) > 0 and all(isinstance(v, (list, tuple)) for v in values)


def _names(values) -> list[str]:
    """Ids or groups as the wire carries them: strings of at most 200 characters."""
    return [str(v)[:200] for v in values]


def _groups(values) -> list[str]:
    """Groups as the wire carries them; an empty name is the default group (the wire refuses empty labels)."""
    return [name or "all" for name in _names(values)]


def stable_key(sample_id: str) -> int:
    return zlib.crc32(sample_id.encode())


class Sampler:
    def __init__(self, *, every_n_steps: int, max_samples_per_step: int, identity: Optional[Identity] = None):
        self.every_n_steps = every_n_steps
        self.max_samples_per_step = max_samples_per_step
        self.identity = identity if identity is not None else Identity()  # read, never written here
        # Names the rows of the next forward: (row ids or None, row groups, documents or None).
        self._tag: Optional[tuple] = None
        self._groups_given = False  # the tag names groups (not only ids)
        # The documents of the rows the last choose() named, when the tag named them (packed rows): per
        # row, the ids (or None: run-unique) and the groups of its documents in order.
        self.chosen_docs: Optional[tuple[Optional[list[list[str]]], list[list[str]]]] = None
        self._step = -1  # the step the counts below are of
        self._taken = 0  # rows summarized in it
        self._rows_in_step = 0  # rows of its earlier forwards: untagged ids number on
        self.mismatched_tags = 0  # tags whose length was not the forward's rows (logged once)
        # The group of each row of the latest tag (None: never tagged, every row is "all"): what a per-row
        # training loss given to Monitor.step(loss=...) is averaged by.
        self.row_groups: Optional[list[str]] = None

    def tag(self, sample_ids: Optional[Sequence] = None, groups: Optional[Sequence] = None) -> None:
        """Name the rows of the next forward (ids and groups as strings of at most 200 characters; a
        tensor of them gives its values, in one call, not "tensor(7)" per element and not one host sync
        per element when it is on the device). Groups alone: the first rows, under run-unique ids.
        A list per row names the documents of packed rows, in order (a row is chosen by its first).
        Raises on input it cannot read."""
        sample_ids = sample_ids.tolist() if isinstance(sample_ids, torch.Tensor) else sample_ids
        groups = groups.tolist() if isinstance(groups, torch.Tensor) else groups
        self._tag = None
        self._groups_given = groups is not None
        if sample_ids is None and groups is None:
            return
        if _nested(sample_ids) or _nested(groups):
            # Documents per row, the same for ids and groups where both are given, none empty.
            shapes = {tuple(map(len, x)) if _nested(x) else None for x in (sample_ids, groups) if x is not None}
            only = next(iter(shapes)) if len(shapes) == 1 else None
            if only is None or 0 in only:
                self._mismatch("per-document ids and groups of different shapes")
                return
            doc_ids = [_names(row) for row in sample_ids] if sample_ids is not None else None
            doc_grp = ([_groups(row) for row in groups] if groups is not None
                       else [["all"] * len(r) for r in doc_ids or ()])
            self._tag = ([row[0] for row in doc_ids] if doc_ids is not None else None,
                         [row[0] for row in doc_grp], (doc_ids, doc_grp))
            self.row_groups = self._tag[1]
            return
        ids = _names(sample_ids) if sample_ids is not None else None
        grp = _groups(groups) if groups is not None else None
        if ids is None or grp is None or len(grp) == len(ids):
            self._tag = (ids, grp if grp is not None else ["all"] * len(ids or ()), None)
            self.row_groups = self._tag[1]
        else:
            self._mismatch(f"{len(ids)} sample ids and {len(grp)} groups")

    def _mismatch(self, what: str) -> None:
        self.mismatched_tags += 1
        if self.mismatched_tags == 1:
            log.warning("grokwatch: tag(): %s; that forward's rows go out untagged (counted in stats()"
                        "['mismatched_tags'], logged once). Tag each forward with one id and group per row.", what)

    def forward_groups(self) -> Optional[list[str]]:
        """The group of each row of the forward about to run, where tag() named them — None where it did not,
        and where a packed row holds documents of several groups (its tokens are of no one group)."""
        tag = self._tag
        if tag is None or not self._groups_given:
            return None
        if tag[2] is not None and any(len(set(row)) > 1 for row in tag[2][1]):
            return None
        return tag[1]

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
            tag = None
        self.chosen_docs = tag[2] if tag is not None else None
        if tag is not None and tag[0] is not None:
            ids, groups = tag[0], tag[1]
            order = sorted(range(num_rows), key=lambda r: (stable_key(ids[r]), r))
            rows = sorted(order[:budget])
        else:
            # Unique within the run: rows of later forwards in the step (gradient accumulation) are numbered
            # on, and other ranks' rows carry their rank (the collector follows samples by id alone).
            who = self.identity
            where = f"{step}:" if who.world_size == 1 else f"{step}:{who.rank}:"
            ids = [f"{where}{first_row + r}" for r in range(num_rows)]
            groups = tag[1] if tag is not None else ["all"] * num_rows
            rows = list(range(min(budget, num_rows)))
        self._taken += len(rows)
        return rows, ids, groups
