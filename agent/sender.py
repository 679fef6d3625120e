"""The agent's sender thread and its ZeroMQ PUSH socket.

The training thread only calls ``submit`` / ``submit_eval`` / ``submit_loss``: a ``put`` on a
bounded queue (full -> counted drop; ``queue.SimpleQueue``, whose C ``put``
costs a fraction of ``queue.Queue``'s lock and condition). This thread waits for
the device copy (CUDA event), turns the pinned host buffer into a wire message,
encodes it and sends with ``NOBLOCK`` (``zmq.Again`` -> counted drop). It
never blocks the training loop, and ``close`` waits a bounded time.

The socket connects (the collector binds). ``IMMEDIATE=0`` with a small
``SNDHWM``: a short collector restart loses nothing (up to the HWM queues in
libzmq); a long one drops and counts.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket as pysocket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from grokwatch._version import __version__
from grokwatch.agent.health import RouterHealth
from grokwatch.agent.status import Identity
from grokwatch.wire import (
    AGENT_DROP_REASONS,
    DEFAULT_LIMITS,
    DEFAULT_MAX_MESSAGE_BYTES,
    Eval,
    Heartbeat,
    Hello,
    Loss,
    Routing,
    encode,
    is_wandb_run,
)

log = logging.getLogger("grokwatch.agent")

DROP_REASONS = AGENT_DROP_REASONS  # the wire's list: the collector folds any other reason into "other"
_CLOSE = object()  # put by close(): the sender thread's wake-up to finish


def _number(value) -> float:
    return float(value.detach().float().item() if hasattr(value, "detach") else value)


def group_losses(losses) -> dict[str, float]:
    """The wire's {group: mean loss} from what Monitor.step(loss=...) queued (on the sender thread):
    non-finite and negative values are left out (the wire refuses a message holding any)."""
    if isinstance(losses, tuple):  # ("rows", per-row losses, their groups)
        _, rows, groups = losses
        values = rows.detach().float().cpu().reshape(-1).tolist()
        sums: dict[str, list[float]] = {}
        for group, value in zip(groups, values):
            acc = sums.setdefault(group, [0.0, 0])
            acc[0] += value
            acc[1] += 1
        out = {g: total / n for g, (total, n) in sums.items()}
    else:
        out = {(str(g)[:200] or "all"): _number(v) for g, v in losses.items()}
    return {g: v for g, v in out.items() if v == v and 0.0 <= v < float("inf")}


class AgentFaults(Protocol):
    """What the sender reads of the agent's faults (capture.Faults owns them)."""

    count: int
    disabled: bool


class _NoFaults:
    count = 0
    disabled = False


# The queue's items: a routing message waiting on its device copy (Pending) or one of these.
@dataclass(frozen=True)
class HelloItem:
    """Send a hello (at start, and when the identity changed)."""


@dataclass(frozen=True)
class EvalItem:
    step: int
    scores: dict


@dataclass(frozen=True)
class LossItem:
    step: int
    losses: Any  # {group: number or detached tensor}, or ("rows", per-row tensor, row groups)


@dataclass
class Pending:
    """One forward's summaries, waiting on the device copy."""

    source: str
    step: int
    sample_ids: list[str]
    groups: list[str]
    host_index: int
    event: Any  # torch.cuda.Event or None on CPU
    with_cosines: bool
    with_loss: bool
    counted_forwards: int = 0  # > 0: the buffer holds the all-token counts of this many training forwards
    aux_forwards: int = 0  # > 0: ... and the model's aux loss summed over this many of them
    with_bias: bool = False  # ... and the routers' balancing biases
    group_forwards: int = 0  # > 0: ... and the same counts split by row group, for this many tagged forwards
    group_names: tuple[str, ...] = ()  # ... the groups' names, in the buffer's slot order


@dataclass
class _Counts:
    """All-token counts on the host, from the staging buffer (views) or summed with those no message could
    carry yet: int64 [L, E + 1] (column E: picks of no expert), and per row group the same."""

    tokens_LE1: np.ndarray
    forwards: int
    groups: dict[str, np.ndarray]
    group_forwards: int

    def plus(self, later: "_Counts") -> "_Counts":
        groups = {name: c.copy() for name, c in self.groups.items()}
        for name, c in later.groups.items():
            groups[name] = groups[name] + c if name in groups else c.copy()
        return _Counts(self.tokens_LE1 + later.tokens_LE1, self.forwards + later.forwards, groups,
                       self.group_forwards + later.group_forwards)

    def copy(self) -> "_Counts":
        return _Counts(self.tokens_LE1.copy(), self.forwards, {n: c.copy() for n, c in self.groups.items()},
                       self.group_forwards)

    def by_group(self) -> tuple[tuple[str, ...], Optional[np.ndarray], int]:
        """The groups whose rows routed tokens: names, [G, L, E] counts, tagged forwards; ((), None, 0) if none."""
        names = tuple(name for name, c in self.groups.items() if c[:, :-1].any())
        if not names:
            return (), None, 0
        return names, np.stack([self.groups[name][:, :-1] for name in names]), self.group_forwards


def _defined(zloss_NL: np.ndarray) -> Optional[np.ndarray]:
    """The z-loss rows, or None where the routers' scores are not softmax logits (the reduction's -1)."""
    return zloss_NL if zloss_NL.size and zloss_NL.min() >= 0 else None


def _mean_aux(sum_1: np.ndarray, forwards: int) -> Optional[float]:
    """The model's mean aux loss over the forwards that gave one; None without one, or not finite."""
    if not forwards:
        return None
    mean = float(sum_1[0]) / forwards
    return mean if math.isfinite(mean) else None


def _as_slice(indices: list[int]):
    """``indices`` as a slice when they step evenly (then NumPy returns views), else as they are."""
    if len(indices) == 1:
        return slice(indices[0], indices[0] + 1)
    step = indices[1] - indices[0]
    if step > 0 and all(b - a == step for a, b in zip(indices, indices[1:])):
        return slice(indices[0], indices[-1] + 1, step)
    return indices


def training_wandb_run() -> Optional[str]:
    """This process's active W&B run as "entity/project/id" (the Trainer's WandbCallback, Lightning's
    WandbLogger, accelerate's tracker and a bare ``wandb.init`` all set ``wandb.run``), else None. Never imports
    wandb, never raises: the hellos, re-sent every heartbeat, pick the run up once training has started it."""
    wandb = sys.modules.get("wandb")
    try:
        run = getattr(wandb, "run", None)
        if run is None or getattr(run, "_attach_pid", os.getpid()) != os.getpid():
            return None  # none, or a run object inherited over a fork: reading it would attach to it (network)
        path = "/".join(str(getattr(run, k, "") or "") for k in ("entity", "project", "id"))
        return path if is_wandb_run(path) and len(path) <= DEFAULT_LIMITS.max_str_len else None
    except Exception:  # a finished or broken run object: no name rather than a fault
        return None


class Sender:
    def __init__(self, *, endpoint: str, run: str, num_layers: int, num_experts: int, top_k: int,
                 distribution: str, identity: Optional[Identity] = None, faults: Optional[AgentFaults] = None,
                 has_cosines: Callable[[], bool] = lambda: False, staging=None, queue_size: int = 64,
                 sndhwm: int = 256, linger_ms: int = 500, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 heartbeat_interval_s: float = 5.0, layer_names: Optional[Sequence[str]] = None,
                 curve: Optional[tuple[bytes, bytes, bytes]] = None):
        """``identity`` (rank, world size), ``faults`` (hook errors, disabled) and ``has_cosines`` belong to the
        monitor's parts: the sender reads them, on its thread, when it builds a message (agent/status.py)."""
        self.endpoint = endpoint
        self.layer_names = tuple(layer_names) if layer_names is not None else None
        self.run = run
        self.identity = identity if identity is not None else Identity()
        self.faults: AgentFaults = faults if faults is not None else _NoFaults()
        self.has_cosines = has_cosines
        self.shape = (num_layers, num_experts, top_k)
        self._carry: Optional[_Counts] = None  # all-token counts no message could carry yet
        self._logged_unrouted = False
        self.health = RouterHealth(num_layers, num_experts, top_k)  # for the framework's logs (agent/health.py)
        self.distribution = distribution
        self.staging = staging
        self._host_views: list = []
        if staging is not None:
            self.use_staging(staging)
        self.sender_id = uuid.uuid4().hex[:16]
        self.max_message_bytes = max_message_bytes
        self.heartbeat_interval_s = heartbeat_interval_s
        self.queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.queue_size = queue_size  # the bound _enqueue keeps (one producer: the training thread)
        self.sent = 0
        self.dropped: dict[str, int] = {}
        self.wakes = 0  # times the sender thread woke up (each takes the GIL)
        self._seq = 0
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.setsockopt(zmq.LINGER, linger_ms)
        self._sock.setsockopt(zmq.IMMEDIATE, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        if curve is not None:  # (the collector's public key, ours, our secret): CURVE-encrypted, authenticated
            self._sock.curve_serverkey, self._sock.curve_publickey, self._sock.curve_secretkey = curve
        # "sent" is handed to libzmq, not delivered: whether a collector took the connection is learned from
        # the socket's handshake events; what was sent since the last one is "undelivered" at close.
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.connected = False
        self._since_connected = 0  # messages sent while no collector held the connection
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:  # attach() fails fast, and leaves no socket or I/O thread behind
            self._monitor.close(linger=0)
            self._sock.close(linger=0)
            self._ctx.term()
            raise ValueError(f"endpoint: cannot connect to {endpoint!r}: {exc}") from None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="grokwatch-sender", daemon=True)
        self._thread.start()
        self._enqueue(HelloItem())

    def use_staging(self, staging) -> None:
        """The host buffers messages are read from: NumPy views of each pinned buffer (shared memory),
        made once. Swapped by the monitor only while no message is in flight (``Summaries.follow``)."""
        self._host_views = [{k: t.numpy() for k, t in staging.split(buf).items()} for buf in staging.pool]
        self.staging = staging

    # ----------------------------------------------------------- training thread

    def count_drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def _enqueue(self, item) -> bool:
        if self._closed.is_set():
            self.count_drop("closed")
            return False
        if self.queue.qsize() >= self.queue_size:
            self.count_drop("queue_full")
            return False
        self.queue.put(item)
        return True

    def submit(self, pending: Pending) -> None:
        if not self._enqueue(pending) and self.staging is not None:
            self.staging.give_back(pending.host_index)

    def submit_eval(self, step: int, scores: dict[str, float]) -> None:
        self._enqueue(EvalItem(step, dict(scores)))

    def submit_loss(self, step: int, losses) -> None:
        """``losses``: {group: number or detached tensor}, or ("rows", per-row tensor, row groups). Tensors
        are read here, on the sender thread (``.item()`` waits for the device there, not in training)."""
        self._enqueue(LossItem(step, losses))

    def introduce(self) -> None:
        """The identity changed (torch.distributed initialized after attach()): the messages that follow
        carry it, and a new hello tells the collector the world size."""
        self._enqueue(HelloItem())

    # ----------------------------------------------------------- sender thread

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def _header(self) -> dict:
        return dict(run=self.run, rank=self.identity.rank, sender=self.sender_id, seq=self._next_seq(),
                    wall_time=time.time())

    def _hello(self) -> Hello:
        L, E, K = self.shape
        return Hello(**self._header(), world_size=self.identity.world_size, host=pysocket.gethostname()[:200],
                     agent_version=__version__, num_layers=L, num_experts=E, top_k=K,
                     distribution=self.distribution, has_cosines=self.has_cosines(), layer_names=self.layer_names,
                     wandb_run=training_wandb_run())

    def _heartbeat(self) -> Heartbeat:
        return Heartbeat(**self._header(), messages_sent=self.sent, messages_dropped=dict(self.dropped),
                         hook_errors=self.faults.count, disabled=self.faults.disabled)

    def _routing(self, p: Pending) -> Optional[Routing]:
        """One row selection per array: the staging buffer is stored in the
        wire's order and dtypes. Few NumPy calls, because this thread holds the
        GIL while it builds a message and the training thread may be waiting
        for it (in a training process, with cold caches, each NumPy call here costs several times what it
        does in a warm loop: docs/benchmarks.md)."""
        if p.event is not None and not p.event.query():  # done already: no wait, no GIL hand-over
            p.event.synchronize()  # waits here, on the sender thread, not in training
        v = self._host_views[p.host_index]
        counts = self._expert_tokens(v, p)
        keep = [i for i in np.flatnonzero(v["tokens_N"]).tolist() if p.sample_ids[i]]
        if not keep:
            if counts is not None:  # no sampled row to ship them with: they go with the next message
                self._carry = counts.copy()
            return None
        tokens_LE = counts.tokens_LE1[:, :-1] if counts is not None else None  # column E: picks of no expert
        group_names, group_tokens, group_forwards = counts.by_group() if counts is not None else ((), None, 0)
        rows = _as_slice(keep)  # usually slots 0, D, 2D, ...: views, copied once by encode
        return Routing(
            **self._header(), source=p.source, step=p.step, top_k=self.shape[2],
            sample_ids=tuple(p.sample_ids[i] for i in keep), groups=tuple(p.groups[i] for i in keep),
            token_counts_N=v["tokens_N"][rows].view(np.uint32),
            mean_probs_NLE=v["mean_probs_NLE"][rows],
            topk_counts_NLE=v["topk_counts_NLE"][rows].view(np.uint32),
            entropy_NL=v["entropy_NL"][rows],
            adj_cosine_NJ=v["adj_cosine_NL"][rows, 1:] if p.with_cosines and self.shape[0] > 1 else None,
            loss_N=v["loss_N"][rows] if p.with_loss else None,
            zloss_NL=_defined(v["zloss_NL"][rows]),
            expert_tokens_LE=tokens_LE, counted_forwards=counts.forwards if counts is not None else 0,
            aux_loss=_mean_aux(v["aux_loss"], p.aux_forwards) if tokens_LE is not None else None,
            balance_bias_LE=v["balance_bias_LE"] if p.with_bias and tokens_LE is not None else None,
            dropped_picks_L=counts.tokens_LE1[:, -1] if counts is not None else None,
            group_token_names=group_names, group_tokens_GLE=group_tokens, group_forwards=group_forwards,
        )

    def _expert_tokens(self, v: dict, p: Pending) -> Optional[_Counts]:
        """The all-token counts the buffer holds (views of it, or a sum with those a previous message could not
        carry), or None when it holds none."""
        if not p.counted_forwards:
            return None
        groups = {}
        if p.group_forwards:
            by_slot = v["group_tokens_GLE"].view(np.int64)
            groups = {name: by_slot[slot] for slot, name in enumerate(p.group_names)}
        counts = _Counts(v["expert_tokens_LE"].view(np.int64), p.counted_forwards, groups, p.group_forwards)
        if self._carry is not None:
            counts, self._carry = self._carry.plus(counts), None
        if not self._logged_unrouted and counts.tokens_LE1[:, -1].any():
            self._logged_unrouted = True
            log.warning("grokwatch: routers returned expert ids outside 0..%d, or record() picks of weight 0 "
                        "(dropped tokens?): those picks count for no expert, shipped as dropped picks (logged "
                        "once)", self.shape[1] - 1)
        return counts

    def _encode(self, message) -> Optional[bytes]:
        try:
            return encode(message)
        except Exception:
            self.count_drop("encode_error")
            return None

    def _send(self, message) -> None:
        data = self._encode(message)
        if data is not None:
            self._send_bytes(data)

    def _send_bytes(self, data: bytes) -> None:
        if len(data) > self.max_message_bytes:
            self.count_drop("too_large")
            return
        self._connection_events()
        try:
            self._sock.send(data, zmq.NOBLOCK, copy=True)
            self.sent += 1
            if not self.connected:
                self._since_connected += 1
        except zmq.Again:
            self.count_drop("send_blocked")

    def _connection_events(self) -> None:
        """Read the socket's handshake events (sender thread): a handshake delivers what libzmq queued."""
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
            except zmq.ZMQError:  # zmq.Again: none left
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected, self._since_connected = True, 0
            elif event == zmq.EVENT_DISCONNECTED:
                self.connected = False

    def _process(self, item) -> None:
        if isinstance(item, Pending):
            try:  # the message's arrays are views of the pinned buffer until encoded
                message = self._routing(item)
                data = None if message is None else self._encode(message)
                if message is not None and message.source == "train":
                    self.health.add(message.topk_counts_NLE, message.token_counts_N, message.entropy_NL,
                                    message.expert_tokens_LE)
            finally:
                if self.staging is not None:
                    self.staging.give_back(item.host_index)
            if data is not None:
                self._send_bytes(data)
        elif isinstance(item, HelloItem):
            self._send(self._hello())
        elif isinstance(item, EvalItem):
            self._send(Eval(**self._header(), step=item.step, scores=item.scores))
        elif isinstance(item, LossItem):
            losses = group_losses(item.losses)
            if losses:
                self._send(Loss(**self._header(), step=item.step, losses=losses))
            else:
                self.count_drop("non_finite")

    def _loop(self) -> None:
        """Sleeps until an item or the next heartbeat: an idle sender takes the GIL once per heartbeat
        interval, not every 100 ms (each time it wakes while the training thread runs Python, the training
        thread hands the GIL over and waits to get it back; ``close`` wakes it with ``_CLOSE``)."""
        next_beat = time.monotonic() + self.heartbeat_interval_s
        while True:
            timeout = max(0.0, next_beat - time.monotonic())
            try:
                item = self.queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            self.wakes += 1
            if item is not None and item is not _CLOSE:
                try:
                    self._process(item)
                except Exception:  # never let the sender die; count it
                    log.exception("grokwatch sender error")
                    self.count_drop("encode_error")
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat_interval_s
                self._send(self._hello())  # a restarted collector learns the shape again
                self._send(self._heartbeat())
            if self._closed.is_set() and self.queue.empty():
                break
        self._send(self._heartbeat())

    def close(self, timeout_s: float = 2.0) -> None:
        """Flush what is queued (bounded wait), send a last heartbeat, close."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.queue.put(_CLOSE)  # after what is queued: wakes the thread once that is sent
        self._thread.join(timeout_s)
        if self._thread.is_alive():  # still sending: leave the socket to it (daemon thread)
            log.warning("grokwatch sender did not finish within %.1f s; leaving it behind", timeout_s)
            return
        self._connection_events()
        if not self.connected and self._since_connected:
            # No collector took them: libzmq discards them with the socket. Counted, said once.
            self.count_drop("undelivered", self._since_connected)
            log.warning("grokwatch: %d messages were never delivered: no collector accepted the connection to %s "
                        "since they were sent (counted in stats()['dropped']['undelivered'])",
                        self._since_connected, self.endpoint)
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self._sock.close(linger=min(int(timeout_s * 1000), 500))
        self._ctx.term()
