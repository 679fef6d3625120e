"""encode / decode of wire protocol v1 (format: docs/wire.md).

A message is one msgpack map. Header keys: ``v`` (protocol version), ``kind``,
``run``, ``rank``, ``sender``, ``seq``, ``t`` (wall time). Arrays are maps
``{"dtype": "<f4", "shape": [...], "data": <bin>}`` holding raw little-endian
bytes. ``decode`` validates each message on its own and raises ``WireError``
with a machine-readable ``reason`` for anything invalid; it never raises
anything else, whatever the bytes.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, cast

import msgpack
import numpy as np

from grokwatch.wire.errors import WireError
from grokwatch.wire.limits import DEFAULT_LIMITS, Limits
from grokwatch.wire.messages import (
    DISTRIBUTIONS,
    KIND_EVAL,
    KIND_HEARTBEAT,
    KIND_HELLO,
    KIND_LOSS,
    KIND_ROUTING,
    PROTOCOL_VERSION,
    SOURCES,
    Eval,
    Heartbeat,
    Hello,
    Loss,
    Message,
    Routing,
    is_wandb_run,
)
from grokwatch.wire.reader import Reader

F32 = "<f4"
U32 = "<u4"
U64 = "<u8"


# ----------------------------------------------------------------- encode


def _array(x: np.ndarray, dtype: str) -> dict:
    arr = x if isinstance(x, np.ndarray) and x.dtype == dtype else np.asarray(x, dtype=dtype)
    return {"dtype": dtype, "shape": list(arr.shape), "data": arr.tobytes()}  # tobytes: C order, also of a view


def encode(message: Message) -> bytes:
    """Serialize a message. Arrays are converted to the wire dtype; the result
    is not validated here (``decode`` is the single place that does)."""
    if not isinstance(message, (Hello, Routing, Eval, Heartbeat, Loss)):
        raise TypeError(f"not a grokwatch.wire message: {type(message).__name__}")
    out: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "kind": message.kind,
        "run": message.run,
        "rank": int(message.rank),
        "sender": message.sender,
        "seq": int(message.seq),
        "t": float(message.wall_time),
    }
    if isinstance(message, Hello):
        out.update(
            world_size=int(message.world_size),
            host=message.host,
            agent_version=message.agent_version,
            num_layers=int(message.num_layers),
            num_experts=int(message.num_experts),
            top_k=int(message.top_k),
            distribution=message.distribution,
            has_cosines=bool(message.has_cosines),
        )
        if message.layer_names is not None:
            out["layer_names"] = list(message.layer_names)
        if message.wandb_run is not None:
            out["wandb_run"] = message.wandb_run
    elif isinstance(message, Routing):
        out.update(
            source=message.source,
            step=int(message.step),
            top_k=int(message.top_k),
            sample_ids=list(message.sample_ids),
            groups=list(message.groups),
            token_counts=_array(message.token_counts_N, U32),
            mean_probs=_array(message.mean_probs_NLE, F32),
            topk_counts=_array(message.topk_counts_NLE, U32),
            entropy=_array(message.entropy_NL, F32),
        )
        if message.adj_cosine_NJ is not None:
            out["adj_cosine"] = _array(message.adj_cosine_NJ, F32)
        if message.loss_N is not None:
            out["loss"] = _array(message.loss_N, F32)
        if message.zloss_NL is not None:
            out["zloss"] = _array(message.zloss_NL, F32)
        if message.expert_tokens_LE is not None:
            out["expert_tokens"] = _array(message.expert_tokens_LE, U64)
            out["counted_forwards"] = int(message.counted_forwards)
        if message.aux_loss is not None:
            out["aux_loss"] = float(message.aux_loss)
        if message.balance_bias_LE is not None:
            out["balance_bias"] = _array(message.balance_bias_LE, F32)
        if message.dropped_picks_L is not None:
            out["dropped_picks"] = _array(message.dropped_picks_L, U64)
        if message.group_tokens_GLE is not None:
            out["group_tokens"] = _array(message.group_tokens_GLE, U64)
            out["group_token_names"] = list(message.group_token_names)
            out["group_forwards"] = int(message.group_forwards)
    elif isinstance(message, Eval):
        out.update(step=int(message.step), scores={str(k): float(v) for k, v in message.scores.items()})
    elif isinstance(message, Loss):
        out.update(step=int(message.step), losses={str(k): float(v) for k, v in message.losses.items()})
    else:
        out.update(
            messages_sent=int(message.messages_sent),
            messages_dropped={str(k): int(v) for k, v in message.messages_dropped.items()},
            hook_errors=int(message.hook_errors),
            disabled=bool(message.disabled),
        )
    return cast(bytes, msgpack.packb(out, use_bin_type=True))  # the stubs say Optional: never None without a stream


# ----------------------------------------------------------------- decode


def _header(r: Reader) -> dict:
    header = dict(
        run=r.str("run"),
        rank=r.int("rank", hi=1 << 20),
        sender=r.str("sender"),
        seq=r.int("seq"),
        wall_time=r.float("t"),
    )
    for key in ("run", "sender"):
        if not header[key]:
            raise WireError("value_range", f"{key!r} is empty")  # exported as a label: no empty names
    return header


def _no_empty(names, key: str) -> None:
    if any(not n for n in names):
        raise WireError("value_range", f"{key!r} holds an empty name")


def _wandb_run(path: str) -> str:
    if not is_wandb_run(path):
        raise WireError("value_range", f"'wandb_run' must be entity/project/id, got {path[:80]!r}")
    return path


def _decode_hello(r: Reader) -> Hello:
    lim = r.limits
    msg = Hello(
        **_header(r),
        world_size=r.int("world_size", lo=1, hi=1 << 20),
        host=r.str("host"),
        agent_version=r.str("agent_version"),
        num_layers=r.int("num_layers", lo=1, hi=lim.max_layers),
        num_experts=r.int("num_experts", lo=2, hi=lim.max_experts),
        top_k=r.int("top_k", lo=1, hi=lim.max_top_k),
        distribution=r.choice("distribution", DISTRIBUTIONS),
        has_cosines=r.bool("has_cosines"),
        layer_names=r.str_list("layer_names") if "layer_names" in r.obj else None,
        wandb_run=_wandb_run(r.str("wandb_run")) if "wandb_run" in r.obj else None,
    )
    if msg.layer_names is not None and len(msg.layer_names) != msg.num_layers:
        raise WireError("shape", f"'layer_names' has {len(msg.layer_names)} names for {msg.num_layers} layers")
    if msg.rank >= msg.world_size:
        raise WireError("value_range", f"rank {msg.rank} not below world_size {msg.world_size}")
    if msg.top_k > msg.num_experts:
        raise WireError("value_range", f"top_k {msg.top_k} exceeds num_experts {msg.num_experts}")
    return msg


def _decode_routing(r: Reader) -> Routing:
    lim = r.limits
    header = _header(r)
    source = r.choice("source", SOURCES)
    step = r.int("step")
    top_k = r.int("top_k", lo=1, hi=lim.max_top_k)
    sample_ids = r.str_list("sample_ids")
    groups = r.str_list("groups")
    n = len(sample_ids)
    if n == 0:
        raise WireError("shape", "a routing message needs at least one sample")
    if n > lim.max_samples:
        raise WireError("too_many", f"{n} samples, limit {lim.max_samples}")
    if len(groups) != n:
        raise WireError("shape", f"{len(groups)} groups for {n} samples")
    _no_empty(groups, "groups")
    _no_empty(sample_ids, "sample_ids")
    mean_probs = r._get("mean_probs")
    shape = mean_probs.get("shape") if isinstance(mean_probs, dict) else None
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise WireError("shape", "mean_probs must be a 3-d array [N, L, E]")
    _, num_layers, num_experts = shape
    if not 1 <= num_layers <= lim.max_layers or not 2 <= num_experts <= lim.max_experts:
        raise WireError("too_many", f"L={num_layers}, E={num_experts} outside the limits")
    if top_k > num_experts:
        raise WireError("value_range", f"top_k {top_k} exceeds {num_experts} experts")
    nle, nl = (n, num_layers, num_experts), (n, num_layers)
    token_counts = r.array("token_counts", U32, (n,))
    probs = r.array("mean_probs", F32, nle)
    counts = r.array("topk_counts", U32, nle)
    entropy = r.array("entropy", F32, nl)
    cosine = r.optional_array("adj_cosine", F32, (n, num_layers - 1))
    loss = r.optional_array("loss", F32, (n,))
    zloss = r.optional_array("zloss", F32, nl)
    expert_tokens = r.optional_array("expert_tokens", U64, (num_layers, num_experts))
    counted_forwards = 0
    if expert_tokens is not None:
        if source != "train":
            raise WireError("value_range", "expert_tokens in a message of another source than train")
        counted_forwards = r.int("counted_forwards", lo=1)
    aux_loss = r.float("aux_loss") if "aux_loss" in r.obj else None
    bias = r.optional_array("balance_bias", F32, (num_layers, num_experts))
    dropped = r.optional_array("dropped_picks", U64, (num_layers,))
    if (aux_loss is not None or bias is not None or dropped is not None) and expert_tokens is None:
        raise WireError("value_range", "aux_loss, balance_bias and dropped_picks come with expert_tokens only")
    group_names, group_tokens, group_forwards = _group_tokens(r, expert_tokens, counted_forwards, num_layers,
                                                              num_experts)

    for name, arr in (("mean_probs", probs), ("entropy", entropy), ("adj_cosine", cosine), ("loss", loss),
                      ("zloss", zloss), ("balance_bias", bias)):
        if arr is not None and not np.isfinite(arr).all():
            raise WireError("non_finite", f"{name!r} holds a NaN or infinity")
    if (token_counts == 0).any():
        raise WireError("value_range", "every sample needs at least one token")
    if probs.min() < -lim.prob_range_tol or probs.max() > 1 + lim.prob_range_tol:
        raise WireError("probability_range", "mean_probs outside [0, 1]")
    sums = probs.sum(axis=2, dtype=np.float64)
    if np.abs(sums - 1.0).max() > lim.prob_sum_tol:
        raise WireError("probability_sum", f"mean_probs rows sum to {sums.min():.6g}..{sums.max():.6g}, not 1")
    tokens = token_counts.astype(np.int64)[:, None]
    if (counts.astype(np.int64).max(axis=2) > tokens).any() or (
        counts.sum(axis=2, dtype=np.int64) > tokens * top_k
    ).any():
        raise WireError("counts_exceed", "top-k counts exceed tokens x top_k")
    if entropy.min() < -lim.unit_tol or entropy.max() > 1 + lim.unit_tol:
        raise WireError("value_range", "entropy ratio outside [0, 1]")
    if cosine is not None and cosine.size and np.abs(cosine).max() > 1 + lim.unit_tol:
        raise WireError("value_range", "adjacent cosine outside [-1, 1]")
    if loss is not None and loss.min() < 0:
        raise WireError("value_range", "negative loss")
    if zloss is not None and zloss.min() < 0:
        raise WireError("value_range", "negative router z-loss")
    return Routing(
        **header,
        source=source,
        step=step,
        top_k=top_k,
        sample_ids=sample_ids,
        groups=groups,
        token_counts_N=token_counts,
        mean_probs_NLE=probs,
        topk_counts_NLE=counts,
        entropy_NL=entropy,
        adj_cosine_NJ=cosine,
        loss_N=loss,
        zloss_NL=zloss,
        expert_tokens_LE=expert_tokens,
        counted_forwards=counted_forwards,
        aux_loss=aux_loss,
        balance_bias_LE=bias,
        dropped_picks_L=dropped,
        group_token_names=group_names,
        group_tokens_GLE=group_tokens,
        group_forwards=group_forwards,
    )


def _group_tokens(r: Reader, expert_tokens, counted_forwards: int, num_layers: int,
                  num_experts: int) -> tuple[tuple[str, ...], Optional[np.ndarray], int]:
    """The all-token counts split by row group: names, [G, L, E] counts, tagged forwards — or ((), None, 0).
    They come with ``expert_tokens`` only, one distinct name a group, and never more than the run's counts."""
    if "group_tokens" not in r.obj:
        if "group_token_names" in r.obj or "group_forwards" in r.obj:
            raise WireError("value_range", "group_token_names and group_forwards come with group_tokens only")
        return (), None, 0
    if expert_tokens is None:
        raise WireError("value_range", "group_tokens come with expert_tokens only")
    names = r.str_list("group_token_names")
    if not 1 <= len(names) <= r.limits.max_count_groups:
        raise WireError("too_many", f"{len(names)} count groups, limit {r.limits.max_count_groups}")
    _no_empty(names, "group_token_names")
    if len(set(names)) != len(names):
        raise WireError("value_range", "group_token_names repeat a name")
    tokens = r.array("group_tokens", U64, (len(names), num_layers, num_experts))
    forwards = r.int("group_forwards", lo=1, hi=counted_forwards)
    left = expert_tokens.copy()  # what the groups may still take: exact, where a uint64 sum could wrap
    for tokens_LE in tokens:
        if (tokens_LE > left).any():
            raise WireError("counts_exceed", "group_tokens exceed expert_tokens")
        left -= tokens_LE
    return tuple(names), tokens, forwards


def _decode_eval(r: Reader) -> Eval:
    msg = Eval(**_header(r), step=r.int("step"), scores=r.number_map("scores", integer=False))
    _no_empty(msg.scores, "scores")
    return msg


def _decode_loss(r: Reader) -> Loss:
    msg = Loss(**_header(r), step=r.int("step"), losses=r.number_map("losses", integer=False))
    if not msg.losses:
        raise WireError("missing_field", "'losses' is empty")
    _no_empty(msg.losses, "losses")
    if min(msg.losses.values()) < 0:
        raise WireError("value_range", "negative loss")
    return msg


def _decode_heartbeat(r: Reader) -> Heartbeat:
    return Heartbeat(
        **_header(r),
        messages_sent=r.int("messages_sent"),
        messages_dropped=r.number_map("messages_dropped", integer=True),
        hook_errors=r.int("hook_errors"),
        disabled=r.bool("disabled"),
    )


_DECODERS = {
    KIND_HELLO: _decode_hello,
    KIND_ROUTING: _decode_routing,
    KIND_EVAL: _decode_eval,
    KIND_HEARTBEAT: _decode_heartbeat,
    KIND_LOSS: _decode_loss,
}


def _header_items(data: bytes, limits: Limits) -> Iterator[tuple[Any, Any]]:
    """(key, value) of a message's first header entries, without decoding its arrays: ``encode`` writes the
    header keys first, so this reads a few hundred bytes. Raises on bytes that do not start like a message."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(data), 1), max_bin_len=0,
                                max_str_len=limits.max_str_len * 4, max_array_len=0, max_map_len=64, max_ext_len=0)
    unpacker.feed(data[:4096])  # the header is in the first bytes
    for _ in range(min(unpacker.read_map_header(), 16)):
        key = unpacker.unpack()
        yield key, unpacker.unpack()


def peek_sequence(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Optional[tuple[str, int]]:
    """(sender, seq) of a message without decoding its arrays. For the collector's accounting of messages it
    drops before decoding (queue full, too large, invalid): each is counted once, under its reason, and
    not again as a sequence gap. None when the bytes do not start like a message. Never raises."""
    sender = seq = None
    try:
        for key, value in _header_items(data, limits):
            if key == "sender" and isinstance(value, str):
                sender = value
            elif key == "seq" and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                seq = value
            if sender is not None and seq is not None:
                return sender, seq
    except Exception:
        return None
    return None


def peek_route(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Optional[tuple[str, str, Optional[str]]]:
    """(sender, run, source) of a message without decoding its arrays (source None but for routing
    messages): where the collector's kernels will run it, known before it is admitted, so that one run's
    backlog can wait without holding the others up. None when the header does not say. Never raises."""
    fields: dict = {}
    try:
        for key, value in _header_items(data, limits):
            if key in ("kind", "run", "sender", "source") and isinstance(value, str):
                fields[key] = value
            if "sender" in fields and "run" in fields and "kind" in fields and (
                    fields["kind"] != "routing" or "source" in fields):
                return fields["sender"], fields["run"], fields.get("source")
    except Exception:
        return None
    return None


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse and validate one message. Raises only ``WireError``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("malformed", f"expected bytes, got {type(data).__name__}")
    if len(data) > limits.max_message_bytes:
        raise WireError("too_large", f"{len(data)} bytes, limit {limits.max_message_bytes}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            # Strings are bounded by the message size here; the field checks give "string_length".
            max_str_len=limits.max_message_bytes,
            max_bin_len=limits.max_message_bytes,
            # Generous safety nets; the field checks below give the precise reason.
            max_array_len=limits.max_samples * 4,
            max_map_len=limits.max_map_entries * 16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireError("malformed", f"not a msgpack message: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise WireError("malformed", "a message is a msgpack map")
    version = obj.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise WireError("version", f"protocol version {version!r}, this side speaks {PROTOCOL_VERSION}")
    kind = obj.get("kind")
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise WireError("kind", f"unknown message kind {obj.get('kind')!r}")
    try:
        return decoder(Reader(obj, limits))
    except WireError:
        raise
    except Exception as exc:  # a shape or type the checks above did not foresee
        raise WireError("malformed", f"{type(exc).__name__}: {exc}") from None
