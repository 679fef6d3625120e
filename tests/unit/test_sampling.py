"""Which rows of a training forward the agent summarizes, without a model (agent/sampling.py)."""

import pytest

torch = pytest.importorskip("torch")

from grokwatch.agent.sampling import Sampler, stable_key  # noqa: E402
from grokwatch.agent.status import Identity  # noqa: E402


def test_a_step_budget_spans_its_forwards_and_untagged_ids_number_on():
    sampler = Sampler(every_n_steps=2, max_samples_per_step=5)
    assert sampler.has_budget(0)
    assert sampler.choose(0, 3) == ([0, 1, 2], ["0:0", "0:1", "0:2"], ["all"] * 3)
    assert sampler.has_budget(0)
    rows, ids, _ = sampler.choose(0, 3)  # the second micro-batch: two rows left
    assert rows == [0, 1] and ids == ["0:3", "0:4", "0:5"]
    assert not sampler.has_budget(0)  # spent
    assert not sampler.has_budget(1)  # not a sampled step
    assert sampler.has_budget(2) and sampler.choose(2, 1)[1] == ["2:0"]  # a new step, a new budget


def test_tagged_rows_are_chosen_by_their_ids_and_a_tag_names_one_forward():
    sampler = Sampler(every_n_steps=1, max_samples_per_step=2, identity=Identity(rank=1, world_size=4))
    names = ["d", "a", "c", "b"]
    sampler.tag(names, ["g1", "g2", "g1", "g2"])
    assert sampler.has_budget(0)
    rows, ids, groups = sampler.choose(0, 4)
    assert rows == sorted(sorted(range(4), key=lambda r: (stable_key(names[r]), r))[:2])
    assert (ids, groups) == (names, ["g1", "g2", "g1", "g2"])
    sampler.tag(torch.tensor([7, 8]), torch.tensor([0, 1]))  # a DataLoader's tensors: their values
    assert sampler.has_budget(1) and sampler.choose(1, 2)[1:] == (["7", "8"], ["0", "1"])
    sampler.tag(["x", "y"])
    assert sampler.has_budget(2)
    sampler.drop_tag()  # that forward was not summarized: the tag does not name the next one
    assert sampler.has_budget(2) and sampler.choose(2, 2)[1] == ["2:1:0", "2:1:1"]  # untagged, this rank's
    sampler.tag(["x", "y"], ["only one group"])  # lengths differ: no tag
    assert sampler.has_budget(3) and sampler.choose(3, 2)[1] == ["3:1:0", "3:1:1"]


def test_groups_alone_name_the_first_rows_under_run_unique_ids():
    sampler = Sampler(every_n_steps=1, max_samples_per_step=2)
    sampler.tag(groups=["math", "code", "math"])
    assert sampler.has_budget(0) and sampler.choose(0, 3) == ([0, 1], ["0:0", "0:1", "0:2"], ["math", "code", "math"])
    sampler.tag(groups=["math"])  # one group for two rows: no tag
    assert sampler.has_budget(1) and sampler.choose(1, 2)[2] == ["all", "all"]
    sampler.tag()  # neither: no tag
    assert sampler.has_budget(2) and sampler.choose(2, 1)[2] == ["all"]


def test_a_tag_that_does_not_fit_its_forward_is_counted_and_logged_once(caplog):
    """Tagging the whole global batch before a micro-batch's forward, or ids and groups of different
    lengths, leaves the rows untagged: a user must hear of it once, not find it in the dashboards."""
    sampler = Sampler(every_n_steps=1, max_samples_per_step=2)
    with caplog.at_level("WARNING", logger="grokwatch.agent"):
        sampler.tag(["a", "b", "c", "d"])  # four ids, a forward of two rows
        assert sampler.has_budget(0) and sampler.choose(0, 2)[1] == ["0:0", "0:1"]
        sampler.tag(["a", "b"], ["g"])
        sampler.tag(["a", "b"], ["g", "h"])  # fits: not counted
        assert sampler.has_budget(1) and sampler.choose(1, 2)[1] == ["a", "b"]
    assert sampler.mismatched_tags == 2
    assert len([r for r in caplog.records if "tag()" in r.getMessage()]) == 1



def test_a_list_per_row_names_the_documents_of_packed_rows():
    sampler = Sampler(every_n_steps=1, max_samples_per_step=1)
    sampler.tag([["a", "b", "c"], ["d"]], [["math", "code", "math"], ["bio"]])
    assert sampler.has_budget(0)
    rows, ids, groups = sampler.choose(0, 2)
    assert rows == [sorted(range(2), key=lambda r: stable_key("ad"[r]))[0]]  # a row is chosen by its first
    assert (ids, groups) == (["a", "d"], ["math", "bio"])
    assert sampler.chosen_docs == ([["a", "b", "c"], ["d"]], [["math", "code", "math"], ["bio"]])
    sampler.tag(groups=[["math", "code"]])  # documents' groups alone
    assert sampler.has_budget(1) and sampler.choose(1, 1)[1:] == (["1:0"], ["math"])
    assert sampler.chosen_docs == (None, [["math", "code"]])
    sampler.tag([["a", "b"]], [["math"]])  # shapes differ: no tag
    assert sampler.has_budget(2) and sampler.choose(2, 1)[1:] == (["2:0"], ["all"])
    assert sampler.chosen_docs is None and sampler.mismatched_tags == 1
