"""Issue 32: router health in the training framework's own logs, no collector needed — a real HF Trainer's
logs reach a reporting callback that runs before grokwatch's in the Trainer's list (as W&B's and
TensorBoard's do), a real Lightning fit's logger gets them; the figures equal the plain reference
(collector/reference.py ``router_health``) over the very messages the agent shipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_lightning_module, tiny_model

import grokwatch.agent as gw
from grokwatch.agent.health import MAX_LAYERS, RouterHealth, keys
from grokwatch.collector import reference


def _expected(messages, top_k: int) -> dict:
    counts = np.concatenate([m.topk_counts_NLE for m in messages])
    tokens = np.concatenate([m.token_counts_N for m in messages])
    entropy = np.concatenate([m.entropy_NL for m in messages])
    return reference.router_health(counts, tokens, entropy, top_k)


def _check(logged: dict, messages, top_k: int) -> None:
    """The entropy over the sampled rows; the load figures over every routed token where the messages carry
    the all-token counts (they do by default), else over the sampled rows."""
    want = _expected(messages, top_k)  # per layer
    all_tokens = [m.expert_tokens_LE for m in messages if m.expert_tokens_LE is not None]
    load = reference.all_token_load(sum(all_tokens), top_k) if all_tokens else want
    for layer, (w, f) in enumerate(zip(want, load)):
        assert logged[f"moe/{layer}/load_imbalance"] == pytest.approx(f["imbalance"], rel=1e-9)
        assert logged[f"moe/{layer}/load_cv"] == pytest.approx(f["cv"], rel=1e-9, abs=1e-12)
        assert logged[f"moe/{layer}/dead_experts"] == f["dead"]
        assert logged[f"moe/{layer}/routing_entropy"] == pytest.approx(w["entropy"], rel=1e-6)
    assert logged["moe/load_imbalance_max"] == pytest.approx(max(f["imbalance"] for f in load), rel=1e-9)
    assert logged["moe/sampled_tokens"] == sum(int(m.token_counts_N.sum()) for m in messages)
    if all_tokens:
        assert logged["moe/routed_tokens"] == load[0]["tokens"]


def test_router_health_is_the_reference_over_the_messages_read_since_and_bounded_in_keys():
    rng = np.random.default_rng(3)
    L, E, K = 3, 8, 2
    health = RouterHealth(L, E, K)
    assert health.read() == {}  # nothing shipped
    from wire_factories import make_routing

    msgs = [make_routing(rng=rng, n=4, num_layers=L, num_experts=E, top_k=K, seq=s) for s in range(3)]
    for m in msgs:
        health.add(m.topk_counts_NLE, m.token_counts_N, m.entropy_NL)
    got = health.read()
    _check(got, msgs, K)
    assert set(got) == set(keys(L))
    assert health.read() == {}  # read resets
    big = RouterHealth(MAX_LAYERS + 1, E, K)
    big.read()
    m = make_routing(rng=rng, n=2, num_layers=MAX_LAYERS + 1, num_experts=E, top_k=K)
    big.add(m.topk_counts_NLE, m.token_counts_N, m.entropy_NL)
    assert set(big.read()) == set(keys(MAX_LAYERS + 1)) and len(keys(MAX_LAYERS + 1)) == 8  # summary only


def test_a_trainers_reporting_callbacks_get_router_health_in_every_training_log(sink, tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Reporter(TrainerCallback):  # stands for WandbCallback & co.: before grokwatch's in the list
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    reporter = Reporter()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, save_strategy="no",
                             report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, logging_steps=4)
    callback = gw.GrokwatchCallback(endpoint=sink.endpoint, run="hf-logs", every_n_steps=1, max_samples_per_step=2)
    model = tiny_model("olmoe")
    Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[reporter, callback]).train()
    training_logs = [lg for lg in reporter.logs if "loss" in lg]
    assert len(training_logs) == 2 and all("moe/load_imbalance_max" in lg for lg in training_logs)
    sink.drain(until=lambda ms: len(sink.routing("train")) >= 8)
    shipped = sink.routing("train")
    K = shipped[0].top_k
    # each log holds the steps shipped since the previous one: the sender may still hold the last step's
    # message when the log is taken, so each log is compared with the messages it counted (by token sum)
    counted = 0
    for lg in training_logs:
        tokens = lg["moe/sampled_tokens"]
        msgs, total = [], 0
        while total < tokens:
            msgs.append(shipped[counted])
            total += int(shipped[counted].token_counts_N.sum())
            counted += 1
        assert total == tokens
        _check(lg, msgs, K)


def test_a_lightning_fit_logs_router_health_to_its_logger(sink, tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    examples = [{"input_ids": torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(i))}
                for i in range(16)]
    for example in examples:
        example["labels"] = example["input_ids"]
    loader = torch.utils.data.DataLoader(examples, batch_size=2)
    callback = gw.GrokwatchLightningCallback(sink.endpoint, "lit-logs", every_n_steps=1, max_samples_per_step=2)
    logger = CSVLogger(str(tmp_path), name="lit")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=8, log_every_n_steps=2, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback])
    module = tiny_lightning_module()
    trainer.fit(module, train_dataloaders=loader)
    import csv

    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("moe/load_imbalance_max")]
    assert rows, "no router health in the logger's metrics"
    num_layers = module.model.config.num_hidden_layers
    assert all(float(r["moe/load_imbalance_max"]) >= 1.0 for r in rows)  # max / mean of shares
    assert all(f"moe/{layer}/dead_experts" in rows[0] for layer in range(num_layers))


def test_an_accelerate_tracker_turns_logged_loss_and_eval_scores_into_evidence(sink):
    """accelerator.log({"loss": ..., "eval/<group>": ...}, step) through a real Accelerator: the loss goes out as
    the training loss at that step, each eval/<group> as that group's score; what is not a finite number, and
    a log without a step, is left out; the other trackers are untouched."""
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from grokwatch.wire import Eval, Loss

    mon = gw.attach(tiny_model("olmoe"), sink.endpoint, "acc", every_n_steps=1)
    try:
        accelerator = Accelerator(cpu=True, log_with=[gw.GrokwatchTracker(mon)])
        accelerator.init_trackers("grokwatch-test")
        accelerator.log({"loss": 2.5, "eval/math": 0.75, "eval/code": float("nan"), "lr": 1e-3}, step=7)
        accelerator.log({"loss": torch.tensor(1.5), "eval/code": torch.ones(3)}, step=8)  # a 3-vector: no score
        accelerator.log({"loss": 9.0})  # no step: no evidence
        accelerator.end_training()
    finally:
        mon.close()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, (Loss, Eval))]) >= 3)
    losses = [(m.step, m.losses) for m in sink.messages if isinstance(m, Loss)]
    evals = [(m.step, m.scores) for m in sink.messages if isinstance(m, Eval)]
    assert losses == [(7, {"all": 2.5}), (8, {"all": 1.5})]
    assert evals == [(7, {"math": 0.75})]


def test_the_hello_names_the_trainings_own_wandb_run_once_training_has_one(sink, tmp_path):
    """Issue 32 (W&B, "carried in the hello"): the agent's hellos, re-sent every heartbeat, name the W&B run
    the training process logs to (a real wandb.init, offline: no entity) once there is one, and stop naming it
    when it is finished."""
    wandb = pytest.importorskip("wandb")
    from wandb_records import offline

    from grokwatch.wire import Hello

    def hellos():
        return [m.wandb_run for m in sink.messages if isinstance(m, Hello)]

    mon = gw.attach(tiny_model("olmoe"), sink.endpoint, "wb", every_n_steps=1, heartbeat_interval_s=0.1)
    try:
        sink.drain(until=lambda ms: len(hellos()) >= 2)
        assert hellos() and set(hellos()) == {None}  # no W&B run yet
        run = wandb.init(**offline(str(tmp_path), project="pretrain", id="train-xyz"))
        try:
            sink.drain(until=lambda ms: "/pretrain/train-xyz" in hellos())
        finally:
            run.finish()
        sink.messages.clear()
        sink.drain(until=lambda ms: len(hellos()) >= 3)
    finally:
        mon.close()
    assert hellos()[-1] is None  # finished: named no more


def test_an_accelerate_run_gives_its_other_trackers_router_health(sink, tmp_path):
    """Done-when of issue 32: an accelerate run shows moe/... keys in its own logger. GrokwatchTracker listed
    first adds the router health of the steps shipped since the previous log to each log that carries the loss,
    so accelerate's real W&B tracker after it (offline, read back) gets them beside the loss; a log without the
    loss (an evaluation) gets none and leaves the sums for the next training log."""
    pytest.importorskip("accelerate")
    pytest.importorskip("wandb")
    from accelerate import Accelerator
    from wandb_records import offline, read_run

    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "acc", every_n_steps=1)
    try:
        accelerator = Accelerator(cpu=True, log_with=[gw.GrokwatchTracker(mon), "wandb"])
        accelerator.init_trackers("grokwatch-test", init_kwargs={"wandb": offline(str(tmp_path), id="acc-run")})
        for step in range(3):
            mon.step(step)
            ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(step))
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            sink.wait_routing(step + 1, source="train")
            accelerator.log({"loss": loss.item()}, step=step)
        accelerator.log({"eval/math": 0.5}, step=3)  # a row of its own (W&B merges a step's logs)
        accelerator.end_training()
    finally:
        mon.close()
    rows = read_run(str(tmp_path), "acc-run")["history"]
    logged = [r for r in rows if "loss" in r]
    assert len(logged) == 3
    assert sum("moe/load_imbalance_max" in r for r in logged) >= 2  # every log after the shipping began
    assert all(r["moe/load_imbalance_max"] >= 1.0 for r in logged if "moe/load_imbalance_max" in r)
    assert all("moe/0/dead_experts" in r for r in logged if "moe/load_imbalance_max" in r)
    assert not any(k.startswith("moe/") for r in rows if "eval/math" in r for k in r)


def _named_in_child(queue) -> None:
    from grokwatch.agent.sender import training_wandb_run

    queue.put(training_wandb_run())


def test_a_forked_process_does_not_name_nor_attach_to_its_parents_wandb_run(tmp_path):
    """A process forked after the parent's wandb.init inherits its run object; reading its properties there
    would attach to the parent's run over W&B's service (from the agent's sender thread). The child names no
    run and returns at once; the parent names its own."""
    import multiprocessing

    wandb = pytest.importorskip("wandb")
    from wandb_records import offline

    from grokwatch.agent.sender import training_wandb_run

    run = wandb.init(**offline(str(tmp_path), project="pretrain", id="parent-run"))
    try:
        assert training_wandb_run() == "/pretrain/parent-run"
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_named_in_child, args=(queue,))
        child.start()
        assert queue.get(timeout=30) is None
        child.join(30)
        assert child.exitcode == 0
    finally:
        run.finish()
