"""Positive and negative control of the METRICS.md §5 detector on ground-truth journals, old against new.

    python research/rescore_phases.py out/gtX1/state out/demo/state [--sources probe train]
    python research/rescore_phases.py docs/groundtruth/v2-*-journal.jsonl.gz     # the committed journals

Each state directory is a collector's journal from a run that logged held-out accuracy (`grokwatch
demo`). Its points (and the train source's loss records) are replayed in journal order through the
detector before the evidence rules (research/phases_v1.py, its shipped defaults) and through today's
(collector/phases.py, the shipped defaults). Per (run, source, group): the held-out 50 % crossing,
each detector's memorized and onset steps; an onset is "within 10 %" when |onset − crossing| ≤ 10 % of
the run, "false" in a group that never crosses (the random-label group `rand` never can). Prints a
markdown table and the totals that docs/groundtruth.md keeps.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import phases_v1  # noqa: E402

from grokwatch.collector.analysis import first_crossing, load  # noqa: E402
from grokwatch.collector.config import CollectorConfig  # noqa: E402
from grokwatch.collector.persist import read_journal  # noqa: E402
from grokwatch.collector.phases import PhaseConfig, PhaseTracker  # noqa: E402


def replay(records, source: str):
    """-> {group: (old tracker, new tracker)} after every record of ``source``, in journal order."""
    cfg = CollectorConfig()
    old_cfg = phases_v1.PhaseConfig(window=12, patience=4, loss_abs_tol=0.05, loss_rel_tol=0.05,
                                    distance_rel_tol=0.03, consistency_abs_tol=float("inf"))
    trackers: dict = {}
    for r in records:
        if r.get("source") != source or r.get("kind") not in ("point", "loss"):
            continue
        group = r["group"]
        if group.startswith(("_", "mem@")):
            continue
        if group not in trackers:
            trackers[group] = (phases_v1.PhaseTracker(old_cfg, cfg.phase_distance),
                               PhaseTracker(PhaseConfig.of(cfg), cfg.phase_distance,
                                            epsilon=cfg.memorization_epsilon.get(group)))
        old, new = trackers[group]
        if r["kind"] == "loss":
            new.add_loss(r["step"], r["loss"])
        else:
            old.observe(r["step"], r)
            new.observe(r["step"], r)
    for old, new in trackers.values():
        old.add(10**12, None, None, None)  # close the last points
        new.add(10**12, None, None, None)
    return trackers


def _records(path: str):
    """A collector's state directory, or a compressed journal (docs/groundtruth/*-journal.jsonl.gz)."""
    if not path.endswith(".gz"):
        yield from read_journal(path)
        return
    import gzip
    import json

    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def verdict(onset, crossing, length) -> str:
    if crossing is None:
        return "ok" if onset is None else "false"
    if onset is None:
        return "missed"
    return "within 10 %" if abs(onset - crossing) <= 0.1 * length else "late/early"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state_dirs", nargs="+")
    parser.add_argument("--sources", nargs="+", default=["probe", "train"])
    args = parser.parse_args(argv)
    totals: dict = defaultdict(lambda: defaultdict(int))
    print("| journal | source | group | held-out ≥ 50 % | old: memorized / onset | new: memorized / onset | old | new |")
    print("|---|---|---|---|---|---|---|---|")
    for state_dir in args.state_dirs:
        records = list(_records(state_dir))
        _, evals = load(records)
        crossings = {group: first_crossing(ev) for (_, group), ev in evals.items()}
        length = max(float(ev.steps[-1]) for ev in evals.values())
        name = (os.path.basename(state_dir).removesuffix("-journal.jsonl.gz") if state_dir.endswith(".gz")
                else os.path.basename(os.path.dirname(os.path.abspath(state_dir))))
        for source in args.sources:
            for group, (old, new) in sorted(replay(records, source).items()):
                cross = crossings.get(group)
                v_old, v_new = verdict(old.onset_step, cross, length), verdict(new.onset_step, cross, length)
                for who, v in (("old", v_old), ("new", v_new)):
                    totals[(source, who)][v] += 1
                    totals[(source, who)]["crossings" if cross is not None else "never"] += 1
                fmt = lambda s: "–" if s is None else f"{s:,.0f}"  # noqa: E731
                print(f"| {name} | {source} | {group} | {fmt(cross)} | {fmt(old.memorized_step)} / "
                      f"{fmt(old.onset_step)} | {fmt(new.memorized_step)} / {fmt(new.onset_step)} ({new.phase}) | "
                      f"{v_old} | {v_new} |")
    print()
    print("| source | detector | crossings within 10 % | missed | onsets in groups that never cross |")
    print("|---|---|---|---|---|")
    for (source, who), t in sorted(totals.items()):
        print(f"| {source} | {who} | {t['within 10 %']} / {t['crossings']} | {t['missed']} / {t['crossings']} | "
              f"{t['false']} / {t['never']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
