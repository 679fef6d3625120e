"""Round 3's data (issue 28): documents of modular equations over operand tokens that every domain shares.

A *domain* is only its op token and its rule: the 31 operand tokens (p = 31) are the same for all of them,
so nothing but routing on context can tell the domains apart — unlike the earlier benchmark, where every
token carried its group. A document is ``equations`` equations of one domain, ``[a, OP, b, =, c, ;] × 4``
(24 tokens, every one routed). Each domain has a fixed pool of training documents (half of its p² pairs),
seen again and again in mini-batches; its other pairs are held out.

Domains of increasing difficulty (``add``, ``sub``, ``mul``, ``sq`` = a² + b²) and two controls:

* ``rand`` — the answer of each pair is drawn once from a fixed random table: memorizable, never
  generalizable (held-out accuracy stays at chance, 1/p);
* ``noise`` — the answer is drawn afresh at every showing: neither memorizable nor generalizable; the same
  token statistics as the others, so whatever it does is global drift.

Held-out accuracy of a commutative rule is *swap-clean*: a held-out pair whose swap was trained on does not
count. *Fresh* documents (for the transfer metric and the fresh-loss gap) are made of held-out pairs only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RULES = {
    "add": (lambda a, b, p: (a + b) % p, True),
    "sub": (lambda a, b, p: (a - b) % p, False),
    "mul": (lambda a, b, p: (a * b) % p, True),
    "sq": (lambda a, b, p: (a * a + b * b) % p, True),
}
CONTROLS = ("rand", "noise")  # rand: a fixed random table; noise: redrawn at every showing
DOMAINS = tuple(RULES) + CONTROLS
EQUATION = 6  # tokens per equation: a, OP, b, =, c, ;
ANSWER = 4  # the answer's offset in an equation (predicted from the '=' before it)


@dataclass(frozen=True)
class Docs:
    """Documents [N, equations·6] with their domain index, whether each equation's answer counts for
    held-out accuracy (swap-clean), and (noise only) which rows are redrawn at every showing."""

    ids_NW: torch.Tensor
    domain_N: torch.Tensor
    clean_NQ: torch.Tensor  # [N, equations] bool
    ids: list[str]


@dataclass(frozen=True)
class ModDocs:
    domains: tuple[str, ...]
    p: int
    equations: int
    vocab_size: int
    train: Docs  # the fixed training pools, every domain's side by side
    heldout: Docs  # the held-out pairs as documents (held-out accuracy; fresh documents are drawn from these)

    @property
    def eq_token(self) -> int:
        return self.p + len(self.domains)

    @property
    def sep_token(self) -> int:
        return self.p + len(self.domains) + 1

    def answer_positions(self) -> torch.Tensor:
        """Positions of the answer tokens in a document [equations]."""
        return torch.arange(self.equations) * EQUATION + ANSWER

    def redraw_noise(self, ids_NW: torch.Tensor, domain_N: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A copy of ``ids_NW`` whose noise documents carry new random answers (every showing)."""
        if "noise" not in self.domains:  # (only the domain named noise is redrawn)
            return ids_NW
        rows = domain_N == self.domains.index("noise")
        if not bool(rows.any()):
            return ids_NW
        out = ids_NW.clone()
        pos = self.answer_positions()
        out[rows.nonzero()[:, :1], pos[None, :]] = torch.randint(0, self.p, (int(rows.sum()), len(pos)), generator=gen)
        return out


def kind_of(name: str) -> str:
    """A domain's kind: its name, except that rand2, rand3, ... are more random tables (the all-rand null run)."""
    return "rand" if name.startswith("rand") and name[4:].isdigit() else name


def make_moddocs(domains: tuple[str, ...] = DOMAINS, *, p: int = 31, equations: int = 4, train_docs: int = 120,
                 seed: int = 0) -> ModDocs:
    """``train_docs`` documents of ``equations`` distinct pairs per domain (default 480 of 961 pairs, half);
    the remaining pairs are held out, grouped into documents the same way (a last short one dropped)."""
    for d in domains:
        if kind_of(d) not in RULES and kind_of(d) not in CONTROLS:
            raise ValueError(f"domain {d!r}: not one of {', '.join(DOMAINS)} (rand2, rand3, ... are more rand tables)")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domains {domains}: each name once")
    n_pairs = p * p
    if train_docs * equations >= n_pairs:
        raise ValueError(f"{train_docs} documents of {equations} equations leave no held-out pair of {n_pairs}")
    gen = torch.Generator().manual_seed(seed)
    D = len(domains)
    eq_tok, sep_tok = p + D, p + D + 1
    parts: dict[str, list] = {"train": [], "heldout": []}
    for di, name in enumerate(domains):
        if kind_of(name) in RULES:
            rule, commutative = RULES[name]
            table = torch.tensor([[rule(a, b, p) for b in range(p)] for a in range(p)])
        else:  # rand: a fixed table; noise: a table too (fresh documents and held-out rows need some answer), redrawn in training
            table, commutative = torch.randint(0, p, (p, p), generator=gen), False
        perm = torch.randperm(n_pairs, generator=gen)
        cut = train_docs * equations
        train_pairs = {(int(i) // p, int(i) % p) for i in perm[:cut]}
        for split, idx in (("train", perm[:cut]), ("heldout", perm[cut:])):
            usable = len(idx) - len(idx) % equations
            for start in range(0, usable, equations):
                row, clean = [], []
                for i in idx[start:start + equations].tolist():
                    a, b = i // p, i % p
                    row += [a, p + di, b, eq_tok, int(table[a, b]), sep_tok]
                    clean.append(not (commutative and (b, a) in train_pairs))
                parts[split].append((row, di, clean, f"{name}:{split}:{start // equations}"))

    def docs(rows) -> Docs:
        return Docs(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
                    torch.tensor([r[2] for r in rows], dtype=torch.bool), [r[3] for r in rows])

    return ModDocs(tuple(domains), p, equations, p + D + 2, docs(parts["train"]), docs(parts["heldout"]))
