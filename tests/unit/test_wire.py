"""The wire contract: round trips, one test per rejection reason, hostile bytes."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from grokwatch.wire import (
    REASONS,
    Hello,
    Limits,
    WireError,
    decode,
    encode,
)
from wire_factories import make_eval, make_heartbeat, make_hello, make_routing

HEADER = ("run", "rank", "sender", "seq", "wall_time", "kind")


def assert_same(a, b):
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert x is not None and y is not None, name
            assert x.shape == y.shape, name
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
        else:
            assert x == y, name


# ------------------------------------------------------------------ round trips

text = st.text(min_size=0, max_size=40)
name = st.text(min_size=1, max_size=40)  # runs, senders and groups are labels: never empty


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 5), num_layers=st.integers(1, 6),
       num_experts=st.integers(2, 10), data=st.data(), cosines=st.booleans(), loss=st.booleans(),
       source=st.sampled_from(["train", "probe", "replay"]), step=st.integers(0, 2**40),
       run=name, group=name)
def test_routing_round_trips_every_field(seed, n, num_layers, num_experts, data, cosines, loss, source,
                                          step, run, group):
    top_k = data.draw(st.integers(1, num_experts))
    msg = make_routing(rng=np.random.default_rng(seed), n=n, num_layers=num_layers, num_experts=num_experts,
                       top_k=top_k, cosines=cosines, loss=loss, source=source, step=step, run=run,
                       groups=(group,) * n)
    out = decode(encode(msg))
    assert_same(msg, out)
    assert out.num_samples == n
    assert out.mean_probs_NLE.dtype == np.float32 and out.topk_counts_NLE.dtype == np.uint32


@given(rank=st.integers(0, 7), layers=st.integers(1, 64), experts=st.integers(2, 256),
       dist=st.sampled_from(["softmax", "sigmoid", "topk"]), cos=st.booleans(), host=text)
def test_hello_round_trips(rank, layers, experts, dist, cos, host):
    msg = Hello(run="r", rank=rank, sender="abc", seq=0, wall_time=12.5, world_size=8, host=host,
                agent_version="0.1.0", num_layers=layers, num_experts=experts, top_k=min(2, experts),
                distribution=dist, has_cosines=cos)
    assert_same(msg, decode(encode(msg)))


@given(scores=st.dictionaries(name, st.floats(allow_nan=False, allow_infinity=False), max_size=10),
       step=st.integers(0, 10**9))
def test_eval_round_trips(scores, step):
    msg = make_eval(scores=scores, step=step)
    assert_same(msg, decode(encode(msg)))


@given(dropped=st.dictionaries(text, st.integers(0, 2**62), max_size=5), sent=st.integers(0, 2**62),
       errors=st.integers(0, 1000), disabled=st.booleans())
def test_heartbeat_round_trips(dropped, sent, errors, disabled):
    msg = make_heartbeat(messages_dropped=dropped, messages_sent=sent, hook_errors=errors, disabled=disabled)
    assert_same(msg, decode(encode(msg)))


def test_decoded_arrays_are_read_only_views_without_copy():
    out = decode(encode(make_routing()))
    assert not out.mean_probs_NLE.flags.writeable  # np.frombuffer over the received bytes
    assert out.mean_probs_NLE.base is not None


# ------------------------------------------------------------------ rejections


def raw(message) -> dict:
    return msgpack.unpackb(encode(message), raw=False)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def set_array(obj, key, arr, dtype=None):
    arr = np.ascontiguousarray(arr, dtype=dtype or obj[key]["dtype"])
    obj[key] = {"dtype": obj[key]["dtype"], "shape": list(arr.shape), "data": arr.tobytes()}


def arr(obj, key):
    a = obj[key]
    return np.frombuffer(a["data"], a["dtype"]).reshape(a["shape"]).copy()


def _mutate(fn, message=None):
    obj = raw(message if message is not None else make_routing())
    fn(obj)
    return pack(obj)


def _probs_scaled(obj):
    set_array(obj, "mean_probs", arr(obj, "mean_probs") * 1.5)


def _probs_out_of_range(obj):
    p = arr(obj, "mean_probs")
    p[0, 0, 0] += 0.5
    p[0, 0, 1] -= 0.5 + p[0, 0, 1] * 0 + 0.5  # keeps the sum, leaves one weight negative
    p[0, 0, 2] += 0.5
    set_array(obj, "mean_probs", p)


def _counts_exceed(obj):
    c = arr(obj, "topk_counts")
    c[0, 0, :] = arr(obj, "token_counts")[0]  # every expert on every token: > tokens x top_k
    set_array(obj, "topk_counts", c)


def _nan_entropy(obj):
    e = arr(obj, "entropy")
    e[0, 0] = np.nan
    set_array(obj, "entropy", e)


def _cosine_out_of_range(obj):
    set_array(obj, "adj_cosine", arr(obj, "adj_cosine") * 0 + 1.5)


def _long_string(obj):
    obj["run"] = "x" * 300


REJECTIONS = {
    "too_large": lambda: b"\x80" + b"\x00" * 2000,
    "malformed": lambda: b"\xc1 definitely not msgpack",
    "version": lambda: _mutate(lambda o: o.update(v=2)),
    "kind": lambda: _mutate(lambda o: o.update(kind="gossip")),
    "missing_field": lambda: _mutate(lambda o: o.pop("step")),
    "field_type": lambda: _mutate(lambda o: o.update(step="ten")),
    "string_length": lambda: _mutate(_long_string),
    "too_many": lambda: _mutate(lambda o: o.update(scores={str(i): 0.0 for i in range(300)}), make_eval()),
    "shape": lambda: _mutate(lambda o: o.update(groups=["a"])),
    "dtype": lambda: _mutate(lambda o: o["entropy"].update(dtype="<f8")),
    "non_finite": lambda: _mutate(_nan_entropy),
    "probability_range": lambda: _mutate(_probs_out_of_range),
    "probability_sum": lambda: _mutate(_probs_scaled),
    "counts_exceed": lambda: _mutate(_counts_exceed),
    "value_range": lambda: _mutate(_cosine_out_of_range),
}


def test_every_reason_has_a_rejection_test():
    assert set(REJECTIONS) == set(REASONS)


@pytest.mark.parametrize("reason", sorted(REJECTIONS))
def test_invalid_message_is_rejected_with_its_reason(reason):
    data = REJECTIONS[reason]()
    with pytest.raises(WireError) as info:
        decode(data, Limits(max_message_bytes=1500) if reason == "too_large" else Limits())
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o.update(rank=True),  # bool is not an integer here
        lambda o: o.update(seq=-1),
        lambda o: o.update(t=float("inf")),
        lambda o: o.update(source="eval"),
        lambda o: o.update(top_k=99),
        lambda o: o.update(sample_ids=[], groups=[]),
        lambda o: o["mean_probs"].update(shape=[3, 4]),
        lambda o: o["mean_probs"].update(data=b"\x00" * 3),
        lambda o: o.update(token_counts={"dtype": "<u4", "shape": [3], "data": b"\x00" * 12}),
        lambda o: o.update(loss={"dtype": "<f4", "shape": [3], "data": np.full(3, -1, "<f4").tobytes()}),
    ],
)
def test_structural_violations_are_wire_errors(mutate):
    with pytest.raises(WireError):
        decode(_mutate(mutate))


def test_hello_layer_names_are_optional_and_one_per_layer():
    """The names a newer agent sends travel; an older agent's hello (no names) still decodes; a count
    that is not the layer count, or a name that is not a string, is refused with its reason."""
    names = tuple(f"model.layers.{i}.mlp.gate" for i in range(4))
    assert decode(encode(make_hello(num_layers=4, layer_names=names))).layer_names == names
    assert decode(encode(make_hello(num_layers=4))).layer_names is None
    for bad, reason in ((names[:3], "shape"), ([0, 1, 2, 3], "field_type"), (("x" * 300,) * 4, "string_length")):
        with pytest.raises(WireError) as info:
            decode(encode(make_hello(num_layers=4, layer_names=bad)))
        assert info.value.reason == reason


def test_hello_may_name_the_trainings_wandb_run():
    """Issue 32: the training's own W&B run travels in the hello as entity/project/id (entity may be empty:
    an offline run); an older agent's hello has none; anything not of that form is refused as value_range."""
    for path in ("team/pretrain/abc123", "/pretrain/abc123", "t/p/run-1_a.b"):
        assert decode(encode(make_hello(wandb_run=path))).wandb_run == path
    assert decode(encode(make_hello())).wandb_run is None
    for bad in ("abc123", "team/pretrain", "team//abc", "t/p/has space", "t/p/" + "x" * 129, "a/b/c/d", "t/p/"):
        with pytest.raises(WireError) as info:
            decode(encode(make_hello(wandb_run=bad)))
        assert info.value.reason == "value_range", bad


def test_hello_rank_must_be_below_world_size():
    with pytest.raises(WireError) as info:
        decode(encode(make_hello(rank=4, world_size=4)))
    assert info.value.reason == "value_range"


def test_heartbeat_counts_must_be_non_negative():
    with pytest.raises(WireError):
        decode(_mutate(lambda o: o.update(messages_dropped={"queue_full": -1}), make_heartbeat()))


def test_eval_scores_must_be_finite():
    with pytest.raises(WireError) as info:
        decode(_mutate(lambda o: o.update(scores={"math": math.nan}), make_eval()))
    assert info.value.reason == "non_finite"


# ------------------------------------------------------------------ hostile bytes


@given(st.binary(max_size=512))
def test_random_bytes_raise_only_wire_error(data):
    try:
        decode(data)
    except WireError:
        pass


@given(cut=st.integers(0, 10_000), seed=st.integers(0, 1000))
def test_truncated_messages_raise_only_wire_error(cut, seed):
    data = encode(make_routing(rng=np.random.default_rng(seed)))
    with pytest.raises(WireError):
        decode(data[: cut % len(data)])


@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=5) | st.binary(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=20))
def test_arbitrary_msgpack_values_raise_only_wire_error(value):
    for obj in (value, {"v": 1, "kind": "routing", "x": value}, {**raw(make_routing()), "mean_probs": value}):
        try:
            decode(pack(obj))
        except WireError:
            pass


def test_encode_refuses_non_messages():
    with pytest.raises(TypeError):
        encode({"kind": "hello"})


def test_loss_round_trips_and_refuses_negative_empty_or_non_finite_values():
    import msgpack

    from wire_factories import make_loss

    msg = decode(encode(make_loss(losses={"math": 0.25, "code": 3.0})))
    assert msg.kind == "loss" and msg.step == 10 and msg.losses == {"math": 0.25, "code": 3.0}
    for losses, reason in (({"math": -0.1}, "value_range"), ({}, "missing_field")):
        with pytest.raises(WireError) as err:
            decode(encode(make_loss(losses=losses)))
        assert err.value.reason == reason
    raw = msgpack.unpackb(encode(make_loss()), raw=False)
    raw["losses"] = {"math": float("nan")}
    with pytest.raises(WireError) as err:
        decode(msgpack.packb(raw, use_bin_type=True))
    assert err.value.reason == "non_finite"


def test_a_collector_that_predates_the_loss_kind_rejects_it_by_kind_and_nothing_else():
    """Compatibility both ways: an older decoder (no ``loss`` kind) refuses it as ``kind`` — one counted
    rejection — and a newer one still reads every older kind (the round trips above)."""
    from grokwatch.wire import codec
    from wire_factories import make_loss

    older = {k: v for k, v in codec._DECODERS.items() if k != "loss"}
    saved, codec._DECODERS = codec._DECODERS, older
    try:
        with pytest.raises(WireError) as err:
            decode(encode(make_loss()))
        assert err.value.reason == "kind"
    finally:
        codec._DECODERS = saved


def test_a_long_string_is_string_length_not_malformed():
    with pytest.raises(WireError) as err:
        decode(encode(make_routing(groups=("g" * 10_000,) * 3)))
    assert err.value.reason == "string_length"


@pytest.mark.parametrize("msg", [
    lambda: make_routing(run=""), lambda: make_hello(sender=""), lambda: make_routing(groups=("a", "", "b")),
    lambda: make_eval(scores={"": 0.5}),
], ids=["run", "sender", "group", "eval-group"])
def test_empty_names_are_rejected_with_a_reason(msg):
    """An empty run or group would be exported without its label (run="" is no label in Prometheus)."""
    with pytest.raises(WireError) as err:
        decode(encode(msg()))
    assert err.value.reason == "value_range"


# ------------------------------------------------------------------ the optional router z-loss (issue 21)


def _with_zloss(zloss):
    import dataclasses

    return dataclasses.replace(make_routing(n=3, num_layers=4), zloss_NL=zloss)


def test_router_zloss_round_trips_and_is_optional():
    msg = _with_zloss(np.array([[0.5, 1.0, 2.0, 3.0]] * 3, np.float32))
    assert_same(decode(encode(msg)), msg)
    assert decode(encode(make_routing(n=3))).zloss_NL is None  # an agent that predates it: None


def test_a_decoder_reads_only_the_keys_it_knows():
    """Both directions of compatibility: a collector that predates a field ignores it (here, a key no decoder
    knows rides along untouched), and a new collector reads an old agent's message without it (above)."""
    obj = msgpack.unpackb(encode(_with_zloss(np.ones((3, 4), np.float32))), raw=False)
    obj["a_field_from_the_future"] = {"dtype": "f4", "shape": [3], "data": b"\0" * 12}
    without = dict(obj)
    del without["zloss"]
    old_view = decode(msgpack.packb(without, use_bin_type=True))  # what an older decoder sees of a new message
    assert old_view.zloss_NL is None and old_view.num_samples == 3
    assert decode(msgpack.packb(obj, use_bin_type=True)).zloss_NL is not None


@pytest.mark.parametrize("bad, reason", [(-0.5, "value_range"), (math.nan, "non_finite"), (math.inf, "non_finite")])
def test_a_negative_or_non_finite_zloss_is_rejected(bad, reason):
    z = np.ones((3, 4), np.float32)
    z[1, 2] = bad
    with pytest.raises(WireError) as info:
        decode(encode(_with_zloss(z)))
    assert info.value.reason == reason


def test_a_zloss_of_the_wrong_shape_is_rejected():
    with pytest.raises(WireError) as info:
        decode(encode(_with_zloss(np.ones((3, 2), np.float32))))
    assert info.value.reason == "shape"


# ------------------------------------------------------------------ the all-token expert counts (issue 31)


def _with_counts(counts, forwards=3, source="train"):
    import dataclasses

    return dataclasses.replace(make_routing(n=3, num_layers=4, num_experts=8, source=source),
                               expert_tokens_LE=counts, counted_forwards=forwards)


def test_expert_tokens_round_trip_exactly_beyond_float_precision_and_are_optional():
    counts = np.arange(32, dtype=np.uint64).reshape(4, 8) + np.uint64(2**53 + 1)  # not a float64
    msg = _with_counts(counts)
    back = decode(encode(msg))
    assert_same(back, msg)
    assert back.expert_tokens_LE.dtype == np.uint64 and back.counted_forwards == 3
    old = decode(encode(make_routing(n=3)))  # an agent that predates them
    assert old.expert_tokens_LE is None and old.counted_forwards == 0


@pytest.mark.parametrize("change, reason", [
    (dict(source="probe"), "value_range"),  # only training forwards are counted
    (dict(forwards=0), "value_range"),  # counts of no forward
    (dict(counts=np.zeros((4, 7), np.uint64)), "shape"),  # not the message's experts
    (dict(counts=np.zeros((3, 8), np.uint64)), "shape"),  # not its layers
])
def test_expert_tokens_that_do_not_fit_the_message_are_rejected(change, reason):
    args = dict(counts=np.ones((4, 8), np.uint64), forwards=2, source="train") | change
    with pytest.raises(WireError) as info:
        decode(encode(_with_counts(args["counts"], args["forwards"], args["source"])))
    assert info.value.reason == reason


def test_expert_tokens_of_the_wrong_dtype_or_size_are_rejected():
    obj = msgpack.unpackb(encode(_with_counts(np.ones((4, 8), np.uint64))), raw=False)
    for bad, reason in (({"dtype": "<u4", "shape": [4, 8], "data": b"\0" * 128}, "dtype"),
                        ({"dtype": "<u8", "shape": [4, 8], "data": b"\0" * 128}, "shape")):  # 4 bytes an item
        with pytest.raises(WireError) as info:
            decode(msgpack.packb(obj | {"expert_tokens": bad}, use_bin_type=True))
        assert info.value.reason == reason
    without = dict(obj)
    del without["counted_forwards"]
    with pytest.raises(WireError):
        decode(msgpack.packb(without, use_bin_type=True))


def _with_groups(names=("math", "code"), tokens=None, group_forwards=2, counts=None):
    import dataclasses

    tokens = np.full((len(names), 4, 8), 2, np.uint64) if tokens is None else tokens
    counts = np.full((4, 8), 5, np.uint64) if counts is None else counts
    return dataclasses.replace(_with_counts(counts, forwards=3), group_token_names=tuple(names),
                               group_tokens_GLE=tokens, group_forwards=group_forwards)


def test_counts_split_by_row_group_round_trip_and_are_optional():
    msg = _with_groups()
    back = decode(encode(msg))
    assert back.group_token_names == ("math", "code") and back.group_forwards == 2
    np.testing.assert_array_equal(back.group_tokens_GLE, msg.group_tokens_GLE)
    assert back.group_tokens_GLE.dtype == np.uint64
    old = decode(encode(_with_counts(np.ones((4, 8), np.uint64))))  # an agent that predates them
    assert old.group_tokens_GLE is None and old.group_token_names == () and old.group_forwards == 0


@pytest.mark.parametrize("change, reason", [
    (dict(tokens=np.full((2, 4, 8), 3, np.uint64)), "counts_exceed"),  # the groups hold more than the run
    (dict(tokens=np.stack([np.full((4, 8), 2**64 - 1, np.uint64), np.full((4, 8), 7, np.uint64)]),
          counts=np.full((4, 8), 2**64 - 1, np.uint64)), "counts_exceed"),  # a uint64 sum would wrap to 6
    (dict(group_forwards=4), "value_range"),  # more tagged forwards than counted
    (dict(group_forwards=0), "value_range"),
    (dict(names=("math", "math")), "value_range"),
    (dict(names=("math",), tokens=np.ones((2, 4, 8), np.uint64)), "shape"),  # two groups' counts, one name
    (dict(names=("math", "")), "value_range"),
    (dict(names=tuple(f"g{i}" for i in range(65)), tokens=np.zeros((65, 4, 8), np.uint64)), "too_many"),
])
def test_counts_split_by_row_group_that_do_not_fit_are_rejected(change, reason):
    args = dict(names=("math", "code"), tokens=None, group_forwards=2, counts=None) | change
    with pytest.raises(WireError) as info:
        decode(encode(_with_groups(**args)))
    assert info.value.reason == reason


def test_group_counts_come_with_the_runs_counts_only():
    obj = msgpack.unpackb(encode(_with_groups()), raw=False)
    for drop in (("expert_tokens", "counted_forwards"), ("group_tokens",)):
        partial = {k: v for k, v in obj.items() if k not in drop}
        with pytest.raises(WireError) as info:
            decode(msgpack.packb(partial, use_bin_type=True))
        assert info.value.reason == "value_range"


def test_dropped_picks_round_trip_and_come_with_the_counts_only():
    import dataclasses

    msg = dataclasses.replace(_with_counts(np.ones((4, 8), np.uint64)), dropped_picks_L=np.arange(4, dtype=np.uint64))
    assert decode(encode(msg)).dropped_picks_L.tolist() == [0, 1, 2, 3]
    obj = msgpack.unpackb(encode(msg), raw=False)
    partial = {k: v for k, v in obj.items() if k not in ("expert_tokens", "counted_forwards")}
    with pytest.raises(WireError) as info:
        decode(msgpack.packb(partial, use_bin_type=True))
    assert info.value.reason == "value_range"
    with pytest.raises(WireError) as info:  # one value a layer
        decode(msgpack.packb(obj | {"dropped_picks": {"dtype": "<u8", "shape": [3], "data": b"\0" * 24}},
                             use_bin_type=True))
    assert info.value.reason == "shape"
