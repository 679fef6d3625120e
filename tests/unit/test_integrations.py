"""The framework integrations' pure parts, without a training run (agent/integrations.py)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from grokwatch.agent.integrations import TaggingCollator, eval_scores  # noqa: E402


def test_the_tagging_collator_never_breaks_a_batch():
    """Examples that carry the keys only in part, or a collator that returns no mapping: the batch is
    the user's collator's, never a KeyError from ours."""
    collate = TaggingCollator()
    full = collate([{"x": torch.tensor([1]), "sample_id": 7, "group": "a"},
                    {"x": torch.tensor([2]), "sample_id": torch.tensor(8), "group": "b"}])
    assert full["grokwatch_tags"] == ([7, 8], ["a", "b"]) and full["x"].tolist() == [[1], [2]]
    partial = collate([{"x": torch.tensor([1]), "sample_id": 7, "group": "a"}, {"x": torch.tensor([2]), "group": "b"}])
    assert partial["grokwatch_tags"] == (None, ["a", "b"]) and "sample_id" not in partial
    neither = collate([{"x": torch.tensor([1]), "sample_id": 7}, {"x": torch.tensor([2]), "group": "b"}])
    assert "grokwatch_tags" not in neither and set(neither) == {"x"}
    as_list = TaggingCollator(lambda features: [f["x"] for f in features])([{"x": 1, "sample_id": 3}])
    assert as_list == [1]


def test_eval_scores_of_trainer_metrics():
    metrics = {"eval_loss": 2.5, "eval_accuracy": 0.5, "eval_runtime": 0.1, "eval_samples_per_second": 40.0,
               "eval_steps_per_second": 10.0, "epoch": 1.0, "eval_done": True}
    assert eval_scores(metrics) == {"loss": 2.5, "accuracy": 0.5}
    assert eval_scores(metrics, "accuracy") == {"all": 0.5}
    assert eval_scores({"eval_math_exact_match": 0.25, "eval_math_loss": 1.0}, "exact_match") == {"math": 0.25}


def test_examples_packed_into_one_row_name_its_documents():
    """DataCollatorWithFlattening packs the examples into one row (position ids restart at each):
    the examples' ids and groups then name that row's documents, in order."""
    from transformers import DataCollatorWithFlattening

    batch = TaggingCollator(DataCollatorWithFlattening())(
        [{"input_ids": [1, 2, 3], "sample_id": "a", "group": "math"}, {"input_ids": [4, 5], "sample_id": "b",
                                                                       "group": "code"}])
    assert batch["input_ids"].shape == (1, 5) and batch["grokwatch_tags"] == ([["a", "b"]], [["math", "code"]])
