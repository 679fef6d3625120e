"""The four message kinds of wire protocol v1, as plain dataclasses.

Array field names end with their shape (docs/shapes.md): N the message's samples, L MoE layers,
E experts, J adjacent layer pairs (L − 1).

Every message carries the same header: which run and rank sent it, a random
``sender`` id chosen once per agent process (so a restarted agent is a new
sender), a per-sender sequence number shared by all kinds (gaps = lost
messages), and the sender's wall-clock time in seconds since the epoch.

Arrays are numpy arrays. After ``decode`` they are read-only views over the
received bytes (no copy after the msgpack parse).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

PROTOCOL_VERSION = 1

KIND_HELLO = "hello"
KIND_ROUTING = "routing"
KIND_EVAL = "eval"
KIND_HEARTBEAT = "heartbeat"
KIND_LOSS = "loss"
KINDS = (KIND_HELLO, KIND_ROUTING, KIND_EVAL, KIND_HEARTBEAT, KIND_LOSS)

SOURCES = ("train", "probe", "replay")
# A probe sample's group label with this prefix is a *fresh* document of the group after it (never trained on):
# routed in the same round as the group's training samples for the transfer metric (METRICS.md §6).
FRESH_PREFIX = "fresh@"
# Why an agent drops a message (its heartbeat's ``messages_dropped`` keys). The collector exports a
# reason outside this list as "other", so that a heartbeat cannot add label values at will.
AGENT_DROP_REASONS = ("queue_full", "send_blocked", "too_large", "staging_busy", "incomplete", "encode_error",
                      "closed", "non_finite", "undelivered")
# What the mean routing weights are the mean of (METRICS.md, Notation).
DISTRIBUTIONS = ("softmax", "sigmoid", "topk")


_WANDB_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def is_wandb_run(path: str) -> bool:
    """A W&B run path as ``Hello.wandb_run`` carries it: "entity/project/id" — three parts (so no slash in a
    name), a project, and an id in W&B's alphabet (the entity may be empty: an offline run has none)."""
    parts = path.split("/")
    return len(parts) == 3 and bool(parts[1]) and _WANDB_ID.fullmatch(parts[2]) is not None


@dataclass(frozen=True, kw_only=True, eq=False)
class Hello:
    """First message of a sender: who it is and the shape of what follows."""

    run: str
    rank: int
    sender: str
    seq: int
    wall_time: float
    world_size: int
    host: str
    agent_version: str
    num_layers: int
    num_experts: int
    top_k: int
    distribution: str
    has_cosines: bool
    # Optional: the module names of the MoE layers the sender summarizes (which layers, not their order).
    # Pipeline stages route different layers under one run name; the collector tells them apart by these.
    layer_names: Optional[tuple[str, ...]] = None
    # Optional: the training process's own W&B run, "entity/project/id" (entity may be empty), so that a
    # collector can write into that run (wandb_run_id = "{training}") or link its own run to it.
    wandb_run: Optional[str] = None
    kind: str = field(default=KIND_HELLO, init=False)


@dataclass(frozen=True, kw_only=True, eq=False)
class Routing:
    """Per-sample routing summaries of one step (or one probe / replay pass).

    ``entropy_NL`` is the mean over the sample's tokens of H(p(t)) / log E, in
    [0, 1]. ``adj_cosine_NJ`` (needs router weights), ``loss_N`` (the
    probe's per-sample mean NLL) and ``zloss_NL`` (the mean over the sample's
    tokens of logsumexp(router logits)², the router z-loss; only where the
    router gives softmax logits) are optional. A collector that predates a field
    ignores it (the decoder reads only the keys it knows).
    """

    run: str
    rank: int
    sender: str
    seq: int
    wall_time: float
    source: str
    step: int
    top_k: int
    sample_ids: tuple[str, ...]
    groups: tuple[str, ...]
    token_counts_N: np.ndarray  # uint32
    mean_probs_NLE: np.ndarray  # float32, rows on the simplex
    topk_counts_NLE: np.ndarray  # uint32
    entropy_NL: np.ndarray  # float32
    adj_cosine_NJ: Optional[np.ndarray] = None  # float32
    loss_N: Optional[np.ndarray] = None  # float32
    zloss_NL: Optional[np.ndarray] = None  # float32, >= 0
    # Train source only: tokens routed to each expert (top-k picks) over *every* token of every training
    # forward since the sender's previous such message (``counted_forwards`` forwards, this one included),
    # not only the sampled rows: the load figures the training framework itself would log.
    expert_tokens_LE: Optional[np.ndarray] = None  # uint64
    counted_forwards: int = 0
    # With them (train source): the model's own load-balancing loss, mean over those forwards that computed one,
    # and the routers' balancing biases (aux-loss-free routing) as they are at this step.
    aux_loss: Optional[float] = None
    balance_bias_LE: Optional[np.ndarray] = None  # float32
    # With them: per layer, the picks of no expert over the same forwards (ids outside 0..E-1, and record()'s
    # picks of weight 0: tokens a capacity factor dropped after the choice), so that counted + dropped is
    # every pick the routers made.
    dropped_picks_L: Optional[np.ndarray] = None  # uint64
    # With them, where the training rows were tagged with groups: the same counts split by the group of the
    # row each token came from, for the groups that had tokens (``group_forwards`` of the counted forwards
    # were tagged; the rest are in ``expert_tokens_LE`` only).
    group_token_names: tuple[str, ...] = ()
    group_tokens_GLE: Optional[np.ndarray] = None  # uint64 [G, L, E]
    group_forwards: int = 0
    kind: str = field(default=KIND_ROUTING, init=False)

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)


@dataclass(frozen=True, kw_only=True, eq=False)
class Eval:
    """The user's own held-out scores per group at a step: ground truth for
    reports, never an input of the metrics."""

    run: str
    rank: int
    sender: str
    seq: int
    wall_time: float
    step: int
    scores: dict[str, float]
    kind: str = field(default=KIND_EVAL, init=False)


@dataclass(frozen=True, kw_only=True, eq=False)
class Heartbeat:
    """The agent's own counters, cumulative since the sender started."""

    run: str
    rank: int
    sender: str
    seq: int
    wall_time: float
    messages_sent: int
    messages_dropped: dict[str, int]  # by reason
    hook_errors: int
    disabled: bool = False
    kind: str = field(default=KIND_HEARTBEAT, init=False)


@dataclass(frozen=True, kw_only=True, eq=False)
class Loss:
    """The training loss the user handed the agent at a step, per data group (mean NLL of the group's
    rows in nats): the loss evidence of the train source's phases (METRICS.md §5). Added to protocol v1
    compatibly: a collector that predates it rejects it as ``kind`` and counts it."""

    run: str
    rank: int
    sender: str
    seq: int
    wall_time: float
    step: int
    losses: dict[str, float]  # group -> mean loss, finite, >= 0
    kind: str = field(default=KIND_LOSS, init=False)


Message = Hello | Routing | Eval | Heartbeat | Loss
