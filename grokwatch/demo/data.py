"""Multi-group modular arithmetic: each operation is a data group with its own
operand tokens (so groups cannot leak into each other through shared inputs).

A sample is [a, op, b, =, c]; the model sees the first four tokens and must
predict c = a ∘ b mod p. Held-out accuracy of a commutative operation is
*swap-clean*: a held-out pair whose swap (b, a) was trained on does not count
(otherwise memorization plus commutativity scores the train fraction).

The group ``rand`` is the built-in negative control (docs/groundtruth.md): its answer for each
pair (a, b) is drawn at random once, so its training samples can be memorized and its held-out
samples never predicted (chance is 1/p). A phase detector that calls it ``generalizing`` is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OPS = {
    "add": (lambda a, b, p: (a + b) % p, True),
    "sub": (lambda a, b, p: (a - b) % p, False),
    "mul": (lambda a, b, p: (a * b) % p, True),
    "div": (lambda a, b, p: (a * pow(int(b), p - 2, p)) % p, False),
    "sq": (lambda a, b, p: (a * a + b * b) % p, True),
    "rand": (None, False),  # random labels: memorizable, never generalizable (answers drawn per dataset)
}
RANDOM_LABELS = "rand"


@dataclass
class Split:
    ids_B5: torch.Tensor  # [a, op, b, =, c] token ids
    group_B: torch.Tensor  # group index
    sample_ids: list[str]
    clean_B: torch.Tensor  # bool: counts for swap-clean held-out accuracy


@dataclass
class Dataset:
    groups: list[str]
    p: int
    vocab_size: int
    train: Split
    test: Split


def make_dataset(groups: list[str], p: int, train_fraction: float, seed: int) -> Dataset:
    n = len(groups)
    eq_token = n * p + n
    gen = torch.Generator().manual_seed(seed)
    rows_train, rows_test = [], []
    for g, op in enumerate(groups):
        fn, commutative = OPS[op]
        if op == RANDOM_LABELS:
            table_PP = torch.randint(0, p, (p, p), generator=gen)
            fn = (lambda table: (lambda a, b, p: int(table[a, b])))(table_PP)
        pairs = [(a, b) for a in range(p) for b in range(p) if not (op == "div" and b == 0)]
        perm = torch.randperm(len(pairs), generator=gen).tolist()
        cut = int(round(train_fraction * len(pairs)))
        train_set = {pairs[i] for i in perm[:cut]}
        for rank, i in enumerate(perm):
            a, b = pairs[i]
            row = ([g * p + a, n * p + g, g * p + b, eq_token, int(fn(a, b, p))], g, f"{op}:{a}:{b}",
                   not (commutative and (b, a) in train_set))
            (rows_train if rank < cut else rows_test).append(row)

    def split(rows):
        return Split(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]), [r[2] for r in rows],
                     torch.tensor([r[3] for r in rows]))

    return Dataset(groups, p, eq_token + 1, split(rows_train), split(rows_test))
