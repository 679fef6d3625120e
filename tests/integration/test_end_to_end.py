"""A real agent on a tiny OLMoE training -> a collector on loopback -> /metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import grokwatch.agent as gw
from grokwatch.collector import reference
from helpers import scrape, start_collector, value, wait_until
from test_agent_capture import RouterTap
from tiny_models import VOCAB, tiny_model


def test_training_to_metrics_equals_the_reference_of_the_routers(tmp_path):
    collector = start_collector(tmp_path, comparisons_per_sample=64, window_samples=64)
    try:
        model = tiny_model("olmoe", seed=5)
        tap = RouterTap(model)
        mon = gw.attach(model, collector.endpoints[0], "e2e", every_n_steps=1, max_samples_per_step=4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        steps, batch = 5, 4
        per_group = {"math": [], "code": []}
        for step in range(steps):
            ids = torch.randint(0, VOCAB, (batch, 10))
            groups = ["math", "code"] * (batch // 2)
            mon.tag([f"s{step}-{i}" for i in range(batch)], groups)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            logits = [c[0] for c in tap.calls[-3:]]
            for i, g in enumerate(groups):
                means = np.stack([torch.softmax(l.reshape(batch, 10, -1)[i], -1).mean(0).numpy() for l in logits])
                per_group[g].append(reference.pathway_symbols(reference.pathway_layers(means, 0.7), 8))
        mon.log_eval(steps, {"math": 0.25, "code": 0.75})
        mon.close()
        tap.remove()
        wait_until(lambda: collector.state.evals.get(("e2e", "code")) is not None)
        s = scrape(collector.metrics_port)
        for g, paths in per_group.items():
            labels = dict(run="e2e", source="train", group=g)
            dists = [reference.levenshtein(paths[i], paths[j]) for j in range(len(paths)) for i in range(j)]
            assert value(s, "grokwatch_pathway_samples_total", **labels) == len(paths)
            assert value(s, "grokwatch_pathway_distance_count", **labels) == len(dists)
            assert value(s, "grokwatch_pathway_distance_sum", **labels) == pytest.approx(sum(dists))
            for layer in range(3):
                assert value(s, "grokwatch_routing_entropy_ratio", layer=layer, **labels) > 0.5
            assert value(s, "grokwatch_pathway_adjacent_cosine_bucket", le="+Inf", **labels) == len(paths)
        cross = value(s, "grokwatch_pathway_distance_count", run="e2e", source="train", group="_cross")
        assert cross > 0
        assert value(s, "grokwatch_train_step", run="e2e") == steps - 1
        assert value(s, "grokwatch_eval_score", run="e2e", group="code") == 0.75
        assert value(s, "grokwatch_collector_messages_lost_total") == 0
        assert sum(s["grokwatch_collector_messages_rejected_total"].values()) == 0
        assert value(s, "grokwatch_agent_messages_sent_total", run="e2e", rank=0) >= steps
    finally:
        collector.stop()


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=16, length=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Stage(torch.nn.Module):
    """One pipeline stage of a 4-layer MoE: two routers, numbered globally as Megatron does."""

    def __init__(self, first_layer: int, hidden: int = 8, experts: int = 4):
        super().__init__()
        torch.manual_seed(first_layer)
        self.first_layer = first_layer
        self.routers = torch.nn.ModuleList(torch.nn.Linear(hidden, experts, bias=False) for _ in range(2))
        self.mon = None

    def forward(self, h):
        for i, router in enumerate(self.routers):
            logits = router(h)
            self.mon.record(i, logits=logits, router_weight=router.weight)
            h = h + torch.softmax(logits, -1).sum(-1, keepdim=True) * h
        return h


@pytest.mark.parametrize("runs", ["one run", "a run per stage"])
def test_pipeline_stages_under_one_run_are_refused_not_mixed(tmp_path, runs):
    """Two stages of one model, each with two MoE layers: the same shape. Under one run name their
    pathways would compare layers 0-1 with layers 2-3; the collector keeps the first stage's and refuses
    the second's (counted as shape_mismatch). Under a run per stage, both are kept."""
    collector = start_collector(tmp_path)
    try:
        emb = torch.nn.Embedding(16, 8)
        stages = [Stage(0), Stage(2)]
        for n, stage in enumerate(stages):
            run = "pp" if runs == "one run" else f"pp/pp{n}"
            names = [f"decoder.layers.{stage.first_layer + i}.mlp.router" for i in range(2)]
            stage.mon = gw.attach(stage, collector.endpoints[0], run, num_layers=2, num_experts=4, top_k=1,
                                  every_n_steps=1, max_samples_per_step=2, layer_names=names)
            if n == 0:  # the first stage says hello first
                wait_until(lambda: collector.state.shapes.get(run))
        for step in range(3):
            for stage in stages:
                stage.mon.step(step)
            ids = torch.randint(0, 16, (2, 5))
            stages[1](stages[0](emb(ids))).sum().backward()
        for stage in stages:
            stage.mon.close()
        rejected = 4 if runs == "one run" else 0  # the second stage's hello and its 3 summaries
        kept = 6 if runs == "one run" else 12
        wait_until(lambda: collector.state.samples_total == kept
                   and collector.state.rejected_total.get("shape_mismatch", 0) == rejected)
        s = scrape(collector.metrics_port)
        assert value(s, "grokwatch_collector_messages_rejected_total", reason="shape_mismatch") == rejected
        runs_seen = {labels for labels in s["grokwatch_pathway_samples_total"]}
        assert len(runs_seen) == (1 if runs == "one run" else 2)
    finally:
        collector.stop()


def test_hf_trainer_callback_streams_a_real_training(tmp_path):
    from transformers import Trainer, TrainingArguments

    from grokwatch.agent import GrokwatchCallback

    collector = start_collector(tmp_path)
    try:
        model = tiny_model("qwen3_moe")
        args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=4,
                                 logging_steps=100, save_strategy="no", report_to=[], use_cpu=True,
                                 dataloader_num_workers=0, disable_tqdm=True)
        callback = GrokwatchCallback(endpoint=collector.endpoints[0], run="trainer", every_n_steps=1)
        trainer = Trainer(model=model, args=args, train_dataset=_TokenDataset(), callbacks=[callback])
        trainer.train()
        assert callback.monitor is None  # closed at train end
        # The step is known at admission, the samples once the kernels are done: wait for both.
        wait_until(lambda: collector.state.train_step.get("trainer") == 3 and collector.state.samples_total == 4 * 4)
        s = scrape(collector.metrics_port)
        assert value(s, "grokwatch_train_step", run="trainer") == 3
        assert value(s, "grokwatch_pathway_samples_total", run="trainer", source="train", group="all") == 4 * 4
        # The loss the Trainer optimized is the model's own: no aux loss switched on by us.
        assert model.config.output_router_logits is False
    finally:
        collector.stop()


def test_benchmark_model_routing_every_position_ships_four_tokens_per_sample():
    """The demo's route_all_positions variant: each equation's summary is a mean over its 4 tokens."""
    import zmq

    from grokwatch.demo.train import BenchConfig, train
    from grokwatch.wire import Routing, decode

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:0")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        cfg = BenchConfig(groups=("add", "sub"), p=11, steps=3, eval_every=100, every_n_steps=1, samples_per_step=6,
                          probe_every_n_steps=0, probe_size_per_group=0, hidden=32, expert_hidden=8,
                          shared_expert_hidden=0, threads=1, route_all_positions=1)
        train(cfg, endpoint=endpoint, run="all-positions")
        routing = []
        while sock.poll(2000):
            msg = decode(sock.recv())
            if isinstance(msg, Routing):
                routing.append(msg)
            if len(routing) == 3:
                break
        assert [m.step for m in routing] == [0, 1, 2]
        for m in routing:
            assert m.token_counts_N.tolist() == [4] * 6
            assert m.topk_counts_NLE.sum(axis=2).tolist() == [[4 * cfg.top_k] * cfg.num_moe_layers] * 6
    finally:
        sock.close(0)
        ctx.term()


def test_benchmark_k_equation_samples_ship_4k_tokens_and_the_sample_loss():
    """Round 2's samples (issue 17): k equations a sample, every position routed, so a sample's summary is
    a mean over 4k tokens, and the train source's loss evidence is the sample's mean answer NLL."""
    from grokwatch.demo.train import BenchConfig, train
    from grokwatch.wire import Loss
    from sink import Sink

    sink = Sink()
    try:
        cfg = BenchConfig(groups=("add", "rand"), p=11, steps=2, eval_every=100, every_n_steps=1, samples_per_step=4,
                          probe_every_n_steps=0, probe_size_per_group=0, hidden=32, expert_hidden=8,
                          shared_expert_hidden=0, threads=1, route_all_positions=1, equations_per_sample=3,
                          num_experts=8, top_k=2, sparse_experts=1, router_scale=4.0)
        train(cfg, endpoint=sink.endpoint, run="k-equations")
        sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Loss)]) >= 2)
        routing, losses = sink.routing(), [m for m in sink.messages if isinstance(m, Loss)]
        assert [m.step for m in routing] == [0, 1]
        for m in routing:
            assert m.token_counts_N.tolist() == [4 * 3] * 4
            assert all(sid.split(":")[1].startswith("s") for sid in m.sample_ids)
        assert losses and set(losses[0].losses) <= {"add", "rand"}
    finally:
        sink.close()


def test_demo_rejects_an_unknown_setting_with_one_line():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "grokwatch.cli", "demo", "--set", "num_expert=3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "num_experts" in result.stderr and "Traceback" not in result.stderr
    from grokwatch.demo import parse_overrides

    assert parse_overrides(["num_experts=16", "lr=0.001", "groups=add,sub", "route-all-positions=1"]) == {
        "num_experts": 16, "lr": 0.001, "groups": ("add", "sub"), "route_all_positions": 1}
