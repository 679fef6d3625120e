"""Multi-group modular arithmetic: each operation is a data group with its own
operand tokens (so groups cannot leak into each other through shared inputs).

A sample is [a, op, b, =, c]; the model sees the first four tokens and must
predict c = a ∘ b mod p. Held-out accuracy of a commutative operation is
*swap-clean*: a held-out pair whose swap (b, a) was trained on does not count
(otherwise memorization plus commutativity scores the train fraction).

The group ``rand`` is the built-in negative control (docs/groundtruth.md): its answer for each
pair (a, b) is drawn at random once, so its training samples can be memorized and its held-out
samples never predicted (chance is 1/p). A phase detector that calls it ``generalizing`` is wrong.

With ``equations_per_sample`` k > 1 a training *sample* is k training equations of one group side
by side, [a, op, b, =, c] × k (issue 17: a sample's routing is then a mean over 4k routed tokens, as
the paper's documents are means over many tokens). The train split's size per group is rounded to a
multiple of k, so every training equation belongs to exactly one sample.
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
class Samples:
    """Training samples of k equations each (k = 1: one equation a sample)."""

    ids_NW: torch.Tensor  # W = 5k: k equations [a, op, b, =, c] of one group, side by side
    group_N: torch.Tensor
    sample_ids: list[str]


@dataclass
class Dataset:
    groups: list[str]
    p: int
    vocab_size: int
    train: Split
    test: Split
    samples: Samples  # what the training loop feeds (and tags), made of the train split's equations


def make_dataset(groups: list[str], p: int, train_fraction: float, seed: int,
                 equations_per_sample: int = 1) -> Dataset:
    k = int(equations_per_sample)
    if k < 1:
        raise ValueError(f"equations_per_sample must be at least 1, not {k}")
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
        cut = k * max(1, int(round(train_fraction * len(pairs) / k)))
        train_set = {pairs[i] for i in perm[:cut]}
        for rank, i in enumerate(perm):
            a, b = pairs[i]
            row = ([g * p + a, n * p + g, g * p + b, eq_token, int(fn(a, b, p))], g, f"{op}:{a}:{b}",
                   not (commutative and (b, a) in train_set))
            (rows_train if rank < cut else rows_test).append(row)

    def split(rows):
        return Split(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]), [r[2] for r in rows],
                     torch.tensor([r[3] for r in rows]))

    train = split(rows_train)
    if k == 1:
        samples = Samples(train.ids_B5, train.group_B, train.sample_ids)
    else:  # rows_train holds each group's equations in a random order: consecutive k make a sample
        N = len(rows_train) // k
        samples = Samples(train.ids_B5.reshape(N, 5 * k), train.group_B.reshape(N, k)[:, 0],
                          [f"{groups[int(g)]}:s{i}" for i, g in enumerate(train.group_B.reshape(N, k)[:, 0].tolist())])
    return Dataset(groups, p, eq_token + 1, train, split(rows_test), samples)
