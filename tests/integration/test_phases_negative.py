"""Negative control of METRICS.md §5 over the real pipeline: a tiny transformers OLMoE trained on random
tokens (nothing to generalize) under the default ``attach()``, over ZeroMQ on loopback to a collector.
No group may be dated memorized or generalizing: without loss evidence its phase is ``unknown``; with
the probe's or the user's loss (near log V, never low) it is still ``memorizing``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import grokwatch.agent as gw
from helpers import scrape, start_collector, wait_until
from tiny_models import VOCAB, tiny_model


def _phases(samples, name="grokwatch_group_phase"):
    out = {}
    for labels, v in samples.get(name, {}).items():
        d = dict(labels)
        if v == 1:
            out[(d["source"], d["group"])] = d["phase"]
    return out


@pytest.mark.parametrize("evidence", ["none", "probe_and_train_loss"])
def test_random_tokens_are_never_memorized_or_generalizing(tmp_path, evidence):
    collector = start_collector(tmp_path)
    try:
        torch.manual_seed(0)
        model = tiny_model("olmoe", seed=1)
        kw = dict(probe_every_n_steps=2, probe_size=16) if evidence != "none" else {}
        mon = gw.attach(model, collector.endpoints[0], "noise", every_n_steps=1, **kw)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        pool = torch.randint(0, VOCAB, (64, 12), generator=torch.Generator().manual_seed(0))
        steps, batch = 60, 8
        for step in range(steps):
            rows = [(step * batch + i) % len(pool) for i in range(batch)]
            ids = pool[rows]
            mon.tag([f"r{r}" for r in rows], ["a" if r % 2 else "b" for r in rows])
            logits = model(input_ids=ids).logits
            per_row = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
            per_row.mean().backward()
            opt.step()
            opt.zero_grad()
            if evidence == "none":
                mon.step(step + 1)  # the default: nothing but the step
            else:
                mon.step(step + 1, loss=per_row)
        sent = mon.stats()["sent"]
        mon.close()
        wait_until(lambda: collector.state.received_total >= sent, timeout_s=20)
        s = scrape(collector.metrics_port)
        phases = _phases(s)
        assert {("train", "a"), ("train", "b")} <= set(phases)
        assert not s.get("grokwatch_group_memorized_step") and not s.get("grokwatch_group_onset_step")
        if evidence == "none":
            assert set(phases.values()) == {"unknown"}
        else:
            assert {phases[("train", g)] for g in "ab"} == {"memorizing"}  # the user's loss: evidence, not low
            assert {phases[("probe", g)] for g in "ab"} == {"memorizing"}
        assert sum(s["grokwatch_collector_messages_rejected_total"].values()) == 0
    finally:
        collector.stop()
