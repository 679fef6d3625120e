"""The agent inside training frameworks: the transformers Trainer (evaluations, sample ids and groups),
Lightning, the tagging and flattening collators, gradient accumulation."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
from capture import (
    run_one_step,
    train_batches,
)
from tiny_models import VOCAB, tiny_lightning_module, tiny_model

import grokwatch.agent as gw
from grokwatch.wire import Routing


def test_gradient_accumulation_shares_the_step_budget_and_numbers_untagged_rows_on(sink, tmp_path):
    """A real HF Trainer with gradient_accumulation_steps=2: the micro-batches of one optimizer step share
    max_samples_per_step, all under that step, and untagged rows are numbered on across them, so no two
    samples of a step share an id (the collector follows samples, and keeps their losses, by id)."""
    from transformers import Trainer, TrainingArguments

    from grokwatch.agent import GrokwatchCallback

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True, logging_steps=100)
    callback = GrokwatchCallback(endpoint=sink.endpoint, run="accumulate", every_n_steps=1, max_samples_per_step=3)
    Trainer(model=tiny_model("olmoe"), args=args, train_dataset=Rows(), callbacks=[callback]).train()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 4)
    shipped = [(m.step, list(m.sample_ids)) for m in sink.routing("train")]
    assert shipped == [(0, ["0:0", "0:1"]), (0, ["0:2"]), (1, ["1:0", "1:1"]), (1, ["1:2"])]


def test_trainer_evaluations_go_out_as_eval_scores_per_data_group(sink, tmp_path):
    """A real Trainer evaluating an eval_dataset dict (one dataset per data group, the paper's
    per-domain accuracy): with eval_metric="accuracy" each evaluation's score goes out under its
    group, the ground truth the report lines up with that group's pathways; the Trainer's own
    timings never go out as scores. Evaluation forwards (eval mode, no grad) are not summarized."""
    from transformers import Trainer, TrainingArguments

    from grokwatch.agent import GrokwatchCallback
    from grokwatch.wire import Eval

    class Rows(torch.utils.data.Dataset):
        def __init__(self, seed):
            self.seed = seed

        def __len__(self):
            return 4

        def __getitem__(self, i):
            ids = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(self.seed * 100 + i))
            return {"input_ids": ids, "labels": ids}

    def accuracy(prediction):  # next-token accuracy of the tiny model: any value in [0, 1]
        logits, labels = prediction.predictions, prediction.label_ids
        return {"accuracy": float((logits[:, :-1].argmax(-1) == labels[:, 1:]).mean())}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                             per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=2, save_strategy="no",
                             report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                             logging_steps=100)
    callback = GrokwatchCallback(endpoint=sink.endpoint, run="evals", eval_metric="accuracy", every_n_steps=1,
                                 max_samples_per_step=2)
    Trainer(model=tiny_model("olmoe"), args=args, train_dataset=Rows(0),
            eval_dataset={"math": Rows(1), "code": Rows(2)}, compute_metrics=accuracy, callbacks=[callback]).train()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Eval)]) >= 4)
    evals = [(m.step, dict(m.scores)) for m in sink.messages if isinstance(m, Eval)]
    assert [(step, sorted(scores)) for step, scores in evals] == [(2, ["math"]), (2, ["code"]), (4, ["math"]),
                                                                  (4, ["code"])]
    assert all(0.0 <= v <= 1.0 for _, scores in evals for v in scores.values())
    assert [m.step for m in sink.routing("train")] == [0, 1, 2, 3]  # training forwards only


@pytest.mark.parametrize("remove_unused_columns, torch_compile", [
    (False, False), (True, False), pytest.param(False, True, marks=pytest.mark.slow)])
def test_trainer_rows_are_named_by_their_examples_sample_id_and_group(remove_unused_columns, torch_compile, sink,
                                                                      tmp_path, caplog):
    """A Trainer user names rows without code of their own: each example's sample_id and group travel
    through the callback's collator into the forward's arguments, where the agent takes them out (the
    model never receives them, evaluation forwards included). The Trainer drops unknown example keys
    unless remove_unused_columns=False: then a warning says why the samples go out untagged. Also with
    TrainingArguments(torch_compile=True), where the hooks run as opaque calls from compiled code."""
    from transformers import Trainer, TrainingArguments

    from grokwatch.agent import GrokwatchCallback

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids, "sample_id": torch.tensor(100 + i),
                    "group": "math" if i % 2 == 0 else "code"}

    model = tiny_model("olmoe")
    reached = []
    model.model.register_forward_pre_hook(lambda m, a, kw: reached.extend(kw), with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                             logging_steps=100, remove_unused_columns=remove_unused_columns,
                             torch_compile=torch_compile)
    callback = GrokwatchCallback(endpoint=sink.endpoint, run="named", every_n_steps=1, max_samples_per_step=4)
    with caplog.at_level(logging.WARNING, logger="grokwatch.agent"):
        Trainer(model=model, args=args, train_dataset=Rows(), eval_dataset=Rows(), data_collator=callback.collator(),
                callbacks=[callback]).train()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 2)
    shipped = [(sid, group) for m in sink.routing("train") for sid, group in zip(m.sample_ids, m.groups)]
    assert len(shipped) == 8 and "grokwatch_tags" not in reached and "sample_id" not in reached
    if remove_unused_columns:
        assert {group for _, group in shipped} == {"all"} and "remove_unused_columns" in caplog.text
    else:
        assert sorted(shipped) == sorted((str(100 + i), "math" if i % 2 == 0 else "code") for i in range(8))
        assert "remove_unused_columns" not in caplog.text


def test_a_plain_loop_names_rows_with_the_tagging_collator(sink):
    """Not only the Trainer: any loop that calls model(**batch) names its rows with TaggingCollator as
    the DataLoader's collate_fn (the example's keys go to the agent, never to the model)."""
    model = tiny_model("olmoe")
    examples = [{"input_ids": torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(i)),
                 "sample_id": f"doc-{i}", "group": ("math", "code")[i % 2]} for i in range(4)]
    for example in examples:
        example["labels"] = example["input_ids"]
    loader = torch.utils.data.DataLoader(examples, batch_size=2, collate_fn=gw.TaggingCollator())
    mon = gw.attach(model, sink.endpoint, "loop", every_n_steps=1)
    train_batches(model, loader)
    mon.close()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 2)
    assert [(list(m.sample_ids), list(m.groups)) for m in sink.routing("train")] == [
        (["doc-0", "doc-1"], ["math", "code"]), (["doc-2", "doc-3"], ["math", "code"])]


def test_non_finite_eval_scores_are_left_out_and_the_rest_still_sent(sink, caplog):
    """The wire refuses a message holding a NaN: one diverged score (eval loss NaN) must not take the
    other groups' scores with it."""
    from grokwatch.wire import Eval

    mon = gw.attach(tiny_model("olmoe"), sink.endpoint, "evals")
    with caplog.at_level(logging.WARNING, logger="grokwatch.agent"):
        mon.log_eval(5, {"math": float("nan"), "code": 0.4, "bio": float("inf")})
        mon.log_eval(6, {"math": float("nan")})  # nothing left: no message
        mon.log_eval(7, {"math": 0.5})
    stats = mon.stats()
    mon.close()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Eval)]) >= 2)
    assert [(m.step, dict(m.scores)) for m in sink.messages if isinstance(m, Eval)] == [(5, {"code": 0.4}),
                                                                                       (7, {"math": 0.5})]
    assert stats["non_finite_scores"] == 3 and stats["hook_errors"] == 0
    assert len([r for r in caplog.records if "not finite" in r.getMessage()]) == 1


def test_a_lightning_trainer_streams_with_one_callback(sink):
    """A real Lightning fit: the callback attaches to the transformers model inside the LightningModule
    (Lightning calls training_step, not the module's forward), rows are named by TaggingCollator, each
    validation's logged score goes out as its group's eval (the sanity check's does not), and the
    monitor is closed at fit end."""
    L = pytest.importorskip("lightning.pytorch")
    from grokwatch.wire import Eval

    examples = [{"input_ids": torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(i)),
                 "sample_id": f"doc-{i}", "group": "math"} for i in range(8)]
    for example in examples:
        example["labels"] = example["input_ids"]
    loader = torch.utils.data.DataLoader(examples, batch_size=2, collate_fn=gw.TaggingCollator())
    callback = gw.GrokwatchLightningCallback(sink.endpoint, "lit", every_n_steps=1, max_samples_per_step=2,
                                             eval_scores={"math": "val/math_acc"})
    module = tiny_lightning_module("val/math_acc")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, val_check_interval=2, num_sanity_val_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert callback.monitor is None  # closed at fit end
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Eval)]) >= 2)
    train = sink.routing("train")
    assert [m.step for m in train] == [0, 1, 2, 3]
    assert [list(m.sample_ids) for m in train] == [[f"doc-{2 * i}", f"doc-{2 * i + 1}"] for i in range(4)]
    evals = [(m.step, sorted(m.scores)) for m in sink.messages if isinstance(m, Eval)]
    assert evals == [(2, ["math"]), (4, ["math"])]


def test_documents_packed_by_the_flattening_collator_go_out_under_their_own_names(sink):
    """Packed pretraining: DataCollatorWithFlattening puts the examples in one row, position ids
    restarting at each. Each document is summarized on its own (as before), and now goes out under its
    example's id and group, not "<row id>#d" and one group for the row (a row mixes domains)."""
    from transformers import DataCollatorWithFlattening

    model = tiny_model("olmoe")
    examples = [{"input_ids": torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist(),
                 "sample_id": name, "group": group} for n, name, group in [(5, "doc-a", "math"), (3, "doc-b", "code"),
                                                                        (4, "doc-c", "math")]]
    loader = torch.utils.data.DataLoader(examples, batch_size=3,
                                         collate_fn=gw.TaggingCollator(DataCollatorWithFlattening()))
    mon = gw.attach(model, sink.endpoint, "flat", every_n_steps=1, max_samples_per_step=1)
    train_batches(model, loader)
    mon.close()
    [msg] = sink.wait_routing(source="train")
    assert list(msg.sample_ids) == ["doc-a", "doc-b", "doc-c"] and list(msg.groups) == ["math", "code", "math"]
    assert msg.token_counts_N.tolist() == [5, 3, 4]


def test_a_forward_may_be_tagged_with_groups_alone(sink):
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "groups", every_n_steps=1, max_samples_per_step=3)
    ids = torch.randint(0, VOCAB, (3, 8))
    mon.tag(groups=["math", "code", "math"])
    run_one_step(model, mon, ids)
    mon.close()
    [msg] = sink.wait_routing(source="train")
    assert list(msg.sample_ids) == ["0:0", "0:1", "0:2"] and list(msg.groups) == ["math", "code", "math"]
