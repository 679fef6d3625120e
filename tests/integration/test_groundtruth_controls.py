"""The committed ground-truth journals (docs/groundtruth/v2-*-journal.jsonl.gz) replayed through the
shipped detector: the random-label group — memorized, never generalizable — is never dated an onset,
nor is any group whose held-out accuracy never crosses 50 % (research/rescore_phases.py prints the table)."""

from __future__ import annotations

import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOURNALS = sorted(glob.glob(os.path.join(ROOT, "docs", "groundtruth", "v2-*-journal.jsonl.gz")))

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("journal", JOURNALS, ids=[os.path.basename(j) for j in JOURNALS])
def test_no_onset_where_held_out_accuracy_never_crosses(journal):
    import rescore_phases

    from grokwatch.collector.analysis import first_crossing, load

    records = list(rescore_phases._records(journal))
    _, evals = load(records)
    crossings = {group: first_crossing(ev) for (_, group), ev in evals.items()}
    assert crossings.get("rand") is None
    for source in ("probe", "train"):
        for group, (_, new) in rescore_phases.replay(records, source).items():
            if crossings.get(group) is None:
                assert new.onset_step is None, (source, group, new.evidence.get("generalizing"))
    probe = rescore_phases.replay(records, "probe")
    if "rand" in probe:  # the random-label control (runs made with it): memorized, so the claim was reachable
        assert probe["rand"][1].memorized_step is not None
