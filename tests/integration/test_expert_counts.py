"""Issue 31 part 1: the all-token expert counts (agent/counts.py) equal a plain count of every decision the
routers made in the training forwards — micro-batches of gradient accumulation added up, the user's own eval
forwards and activation-checkpoint recomputes left out, rows the sampler did not pick included — and arrive
interval by interval: summed over the shipped messages they are the count up to the last summarized step,
with no forward counted twice or lost. Negative controls: ``expert_counts=False`` ships none; a probe
message carries none; under torch.compile they are off (partial counts are never shipped)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_model

import grokwatch.agent as gw
from grokwatch.agent.discover import discover
from grokwatch.collector import reference


class DecisionTap:
    """Each router's top-k ids while ``on`` (the test's own training forwards), counted per expert."""

    def __init__(self, model, num_experts: int):
        self.on = False
        self.recomputed = 0  # router calls outside the test's forwards with grad on: checkpoint recomputes
        self.layers = discover(model).layers
        self.counts_LE = np.zeros((len(self.layers), num_experts), np.int64)
        self.handles = [layer.router.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, layer: int):
        def hook(module, args, output):
            if self.on:
                ids = output[2].reshape(-1).numpy()  # OLMoE's router: (logits, weights, ids)
                self.counts_LE[layer] += np.bincount(ids, minlength=self.counts_LE.shape[1])
            elif torch.is_grad_enabled():
                self.recomputed += 1
        return hook


def _train(sink, run, steps=8, every=3, micro=2, checkpointing=True, **options):
    model = tiny_model("olmoe")
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    E = discover(model).num_experts
    tap = DecisionTap(model, E)
    mon = gw.attach(model, sink.endpoint, run, every_n_steps=every, max_samples_per_step=1, **options)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    at_summarized = []  # the tap's counts after each summarized forward (a summarized step's first)
    for step in range(steps):
        mon.step(step)
        for m in range(micro):
            ids = torch.randint(0, VOCAB, (4, 8), generator=gen)
            tap.on = True
            out = model(input_ids=ids, labels=ids)
            tap.on = False  # the checkpointed backward recomputes the routers: not a forward
            out.loss.backward()
            if step % every == 0 and m == 0:
                at_summarized.append(tap.counts_LE.copy())
        opt.step()
        opt.zero_grad()
        with torch.no_grad():  # the user's own eval forward: neither summarized nor counted
            model.eval()
            model(input_ids=ids)
            model.train()
    stats = mon.stats()
    mon.close()
    return stats, at_summarized, tap


def test_counts_are_every_decision_of_every_training_forward_interval_by_interval(sink):
    stats, at_summarized, tap = _train(sink, "all-tokens")
    assert stats["hook_errors"] == 0, stats
    assert tap.recomputed == 8 * 2 * len(tap.layers)  # the backward did recompute every router
    shipped = sink.wait_routing(len(at_summarized), source="train")
    assert [m.step for m in shipped] == [0, 3, 6]
    # message i: the forwards since message i-1's summarized one (a step's first micro-batch), its own included
    assert [m.counted_forwards for m in shipped] == [1, 6, 6]
    previous = np.zeros_like(tap.counts_LE)
    for msg, upto in zip(shipped, at_summarized):
        assert msg.expert_tokens_LE.dtype == np.uint64
        np.testing.assert_array_equal(msg.expert_tokens_LE.astype(np.int64), upto - previous)
        previous = upto
        # 4 rows x 8 tokens x K picks per forward; one sampled row's top-k counts are a quarter of them
        assert (msg.expert_tokens_LE.sum(axis=1) == msg.counted_forwards * 32 * msg.top_k).all()
        assert msg.topk_counts_NLE.sum() * 4 * msg.counted_forwards == msg.expert_tokens_LE.sum()
    # the figures a framework would log from the same counts: the reference's over the interval
    figures = reference.all_token_load(shipped[1].expert_tokens_LE, shipped[1].top_k)
    assert all(f["tokens"] == 6 * 32 for f in figures)


def test_off_by_option_and_never_on_probe_messages(sink):
    _train(sink, "no-counts", steps=4, checkpointing=False, expert_counts=False)
    shipped = sink.wait_routing(2, source="train")
    assert all(m.expert_tokens_LE is None and m.counted_forwards == 0 for m in shipped)


def test_the_probes_forwards_are_not_counted_and_its_messages_carry_none(sink):
    stats, at_summarized, tap = _train(sink, "probe-counts", checkpointing=False, probe_every_n_steps=3,
                                       probe_size=2)
    assert stats["hook_errors"] == 0, stats
    sink.drain(until=lambda ms: len(sink.routing("train")) >= 3 and len(sink.routing("probe")) >= 2)
    assert sink.routing("probe") and all(m.expert_tokens_LE is None for m in sink.routing("probe"))
    total = sum(m.expert_tokens_LE.astype(np.int64) for m in sink.routing("train"))
    np.testing.assert_array_equal(total, at_summarized[-1])


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile")
def test_under_torch_compile_no_partial_counts_are_shipped(sink):
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "compiled-counts", every_n_steps=2, max_samples_per_step=1)
    compiled = torch.compile(model, backend="eager")
    for step in range(4):
        mon.step(step)
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(step))
        compiled(input_ids=ids, labels=ids).loss.backward()
    mon.close()
    shipped = sink.wait_routing(2, source="train")
    assert all(m.expert_tokens_LE is None for m in shipped)


def test_the_models_own_aux_loss_is_shipped_as_its_mean_over_the_interval(sink):
    """Issue 31 part 2: where the model computes its load-balancing loss (transformers' output_router_logits),
    each training message carries its mean over the interval's forwards — the model's own values."""
    model = tiny_model("olmoe", output_router_logits=True)
    mon = gw.attach(model, sink.endpoint, "aux", every_n_steps=3, max_samples_per_step=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    own, per_message = [], []
    for step in range(7):
        mon.step(step)
        ids = torch.randint(0, VOCAB, (4, 8), generator=gen)
        out = model(input_ids=ids, labels=ids)
        own.append(float(out.aux_loss))
        if step % 3 == 0:
            per_message.append(np.mean(own))
            own = []
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    mon.close()
    shipped = sink.wait_routing(3, source="train")
    assert [m.aux_loss for m in shipped] == pytest.approx(per_message, rel=1e-6)
    assert len(set(round(a, 6) for a in per_message)) == 3  # the values move: a constant could not pass


def test_an_aux_loss_free_routers_balancing_bias_is_shipped_as_the_model_holds_it(sink):
    """DeepSeek-V3's routers select with a bias the training updates (aux-loss-free balancing; transformers
    does not update it, so this loop does, as DeepSeek's rule would: toward the under-loaded experts). Each
    training message carries the bias as it is at that step; the collector's drift is the RMS of its change."""
    from grokwatch.collector.all_tokens import AllTokens

    model = tiny_model("deepseek_v3")
    gates = [layer.router for layer in discover(model).layers]
    mon = gw.attach(model, sink.endpoint, "bias", every_n_steps=2, max_samples_per_step=1)
    gen = torch.Generator().manual_seed(0)
    at_summarized = []
    for step in range(6):
        mon.step(step)
        ids = torch.randint(0, VOCAB, (4, 8), generator=gen)
        if step % 2 == 0:
            at_summarized.append(np.stack([g.e_score_correction_bias.detach().numpy().copy() for g in gates]))
        model(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for i, g in enumerate(gates):  # a deterministic update, different per layer and step
                g.e_score_correction_bias.add_(torch.linspace(-1, 1, g.e_score_correction_bias.numel()) * 1e-3
                                               * (i + 1) * (step + 1))
    mon.close()
    shipped = sink.wait_routing(3, source="train")
    for msg, bias in zip(shipped, at_summarized):
        np.testing.assert_array_equal(msg.balance_bias_LE, bias)
    assert all(m.aux_loss is None for m in shipped)  # DeepSeek-V3 in transformers computes none
    counts = AllTokens(*shipped[0].expert_tokens_LE.shape)
    for msg in shipped:
        counts.add(msg.step, 0, msg.expert_tokens_LE, msg.counted_forwards, 1, msg.aux_loss, msg.balance_bias_LE)
    want = np.sqrt(((at_summarized[2].astype(np.float64) - at_summarized[1]) ** 2).mean(axis=1))
    np.testing.assert_allclose(counts.bias_drift_L, want, rtol=1e-6)
    assert (want > 0).all()


class RowGroupTap:
    """Each router's top-k ids while ``on``, counted per expert for the group of the row each token is in
    (the batch's rows, [B, S] row-major as the router flattens them), and in total."""

    def __init__(self, model, num_experts: int):
        self.on = False
        self.row_groups: list[str] = []
        self.layers = discover(model).layers
        self.E = num_experts
        self.by_group: dict[str, np.ndarray] = {}
        self.total_LE = np.zeros((len(self.layers), num_experts), np.int64)
        for i, layer in enumerate(self.layers):
            layer.router.register_forward_hook(self._hook(i))

    def _hook(self, layer: int):
        def hook(module, args, output):
            if not self.on:
                return
            rows = len(self.row_groups)
            ids_BX = output[2].reshape(rows, -1).numpy()  # OLMoE's router: (logits, weights, ids)
            for row, group in enumerate(self.row_groups):
                counts = self.by_group.setdefault(group, np.zeros_like(self.total_LE))
                counts[layer] += np.bincount(ids_BX[row], minlength=self.E)
            self.total_LE[layer] += np.bincount(ids_BX.reshape(-1), minlength=self.E)
        return hook


def test_counts_split_by_row_group_are_each_rows_decisions_and_untagged_forwards_are_in_the_totals_only(sink):
    """Issue 31 part 1, "per group where rows are tagged": each token's picks count for the group of its row —
    equal to a plain per-row count of the routers' decisions; a forward without group tags goes into the
    totals only (``group_forwards`` says how many were tagged); a group past ``expert_count_groups`` is in the
    totals only. Negative control: summed over the groups, the split counts are the tagged forwards' totals,
    not more."""
    model = tiny_model("olmoe")
    E = discover(model).num_experts
    tap = RowGroupTap(model, E)
    mon = gw.attach(model, sink.endpoint, "row-groups", every_n_steps=2, max_samples_per_step=1,
                    expert_count_groups=2)
    gen = torch.Generator().manual_seed(0)
    patterns = [["math", "code", "math", "code"], ["code", "code", "math", "math"], None,
                ["math", "chem", "code", "math"]]  # None: untagged; chem: past the cap of two groups
    untagged_LE = np.zeros_like(tap.total_LE)
    chem_LE = np.zeros_like(tap.total_LE)
    for step in range(5):  # summarized at 0, 2, 4: the last message covers every forward
        mon.step(step)
        groups = patterns[step % len(patterns)]
        ids = torch.randint(0, VOCAB, (4, 8), generator=gen)
        if groups is not None:
            mon.tag(sample_ids=[f"{step}-{r}" for r in range(4)], groups=groups)
        before = tap.total_LE.copy(), tap.by_group.get("chem", np.zeros_like(tap.total_LE)).copy()
        tap.row_groups, tap.on = (groups or ["?"] * 4), True
        model(input_ids=ids, labels=ids).loss.backward()
        tap.on = False
        if groups is None:
            untagged_LE += tap.total_LE - before[0]
        chem_LE += tap.by_group.get("chem", np.zeros_like(tap.total_LE)) - before[1]
    stats = mon.stats()
    mon.close()
    assert stats["hook_errors"] == 0, stats
    shipped = sink.wait_routing(3, source="train")
    total = sum(m.expert_tokens_LE.astype(np.int64) for m in shipped)
    np.testing.assert_array_equal(total, tap.total_LE)
    split: dict[str, np.ndarray] = {}
    for m in shipped:
        if m.group_tokens_GLE is None:
            continue
        assert m.group_tokens_GLE.dtype == np.uint64 and set(m.group_token_names) <= {"math", "code"}
        assert 1 <= m.group_forwards <= m.counted_forwards
        for name, counts in zip(m.group_token_names, m.group_tokens_GLE.astype(np.int64)):
            split[name] = split.get(name, 0) + counts
    for name in ("math", "code"):
        np.testing.assert_array_equal(split[name], tap.by_group[name])
    assert "chem" not in split and chem_LE.sum() > 0  # past the cap: the totals only
    np.testing.assert_array_equal(split["math"] + split["code"] + chem_LE + untagged_LE, total)
    assert sum(m.group_forwards for m in shipped) == sum(m.counted_forwards for m in shipped) - 1  # step 2's
