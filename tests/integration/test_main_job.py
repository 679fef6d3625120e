"""The main job end to end, shortened (slow): journal, report, phases, replay, correlate."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from grokwatch.collector.analysis import load
from grokwatch.collector.persist import read_journal
from grokwatch.demo import main_job
from grokwatch.demo.train import BenchConfig, build, write_samples
from helpers import start_collector, wait_until

pytestmark = pytest.mark.slow

SHORT = BenchConfig(groups=("add", "sub"), p=23, steps=500, eval_every=20, every_n_steps=5, samples_per_step=16,
                    probe_every_n_steps=10, probe_size_per_group=12, hidden=64, expert_hidden=16,
                    shared_expert_hidden=64, lr=3e-3, weight_decay=1.0, router_weight_decay=None,
                    warmup_steps=10, grad_clip=0.0, threads=1, save_every=100)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    cfg = BenchConfig(**{**SHORT.__dict__, "checkpoint_dir": str(out / "ckpt")})
    report = main_job(cfg, str(out), metrics_port=0, run="short")
    return out, report, cfg


def test_main_job_writes_journal_report_and_table(job):
    out, report, cfg = job
    assert os.path.exists(report)
    page = open(report, encoding="utf-8").read()
    assert "Table 1" in page and "<table>" in page
    for group in cfg.groups:
        assert os.path.exists(out / "report" / f"short-{group}.png")
    series, evals = load(read_journal(str(out / "state")))
    assert {("short", "probe", "add"), ("short", "train", "sub")} <= set(series)
    assert ("short", "add") in evals and evals[("short", "add")].train is not None
    # Two tagged groups: the default detector ("auto") judges them against the cross-group baseline.
    assert series[("short", "probe", "add")].phase_signal == "normalized_vs_cross"
    assert "watching normalized distance ÷ cross-group baseline" in page
    assert "memorized dated to step" in page and "ε" in page  # the evidence beside the marker


def test_phase_detector_leaves_memorizing_for_a_group_that_memorizes(job):
    out, _, cfg = job
    acc = [json.loads(line) for line in open(out / "accuracy.jsonl")]
    memorized = [g for g in cfg.groups if any(r[f"{g}/train"] >= 0.99 for r in acc)]
    assert memorized, "the shortened benchmark should memorize at least one group"
    records = list(read_journal(str(out / "state")))
    series, _ = load(records)
    for g in memorized:
        phases = [p for _, p in series[("short", "probe", g)].phases]
        assert phases[:3] == ["unknown", "memorizing", "memorized"], phases  # the probe's losses are evidence
        # The journal carries the step the detector dated the transition to (before the decision's record),
        # and the evidence that dated it, on the record where the phase changed.
        first = next(r for r in records if r.get("kind") == "point" and r["source"] == "probe" and r["group"] == g
                     and r.get("phase") == "memorized")
        assert first["memorized_step"] < first["step"]
        assert first["memorized_evidence"]["loss"] <= first["memorized_evidence"]["epsilon"]
        assert series[("short", "probe", g)].phases[2] == (first["memorized_step"], first["phase"])
    # The user's per-row training loss reached the collector as the train source's evidence.
    assert any(r.get("kind") == "loss" and r["source"] == "train" for r in records)


def test_replay_of_saved_checkpoints_and_correlate(job, tmp_path):
    out, _, cfg = job
    ckpts = sorted(str(p) for p in (out / "ckpt").iterdir())
    assert len(ckpts) == cfg.steps // cfg.save_every + 1
    data, *_ = build(cfg)
    samples = tmp_path / "samples.jsonl"
    write_samples(data, str(samples), per_group=8)
    collector = start_collector(tmp_path)
    try:
        result = subprocess.run([sys.executable, "-m", "grokwatch.cli", "replay", "--checkpoints", *ckpts,
                                 "--samples", str(samples), "--endpoint", collector.endpoints[0], "--run", "rp"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        wait_until(lambda: collector.state.streams.get(("rp", "replay")) is not None
                   and collector.state.streams[("rp", "replay")].latest_step == cfg.steps)
        stream = collector.state.streams[("rp", "replay")]
        assert stream.groups["add"].series.samples_total == 8 * len(ckpts)
    finally:
        collector.stop()
    acc = {json.loads(line)["step"]: json.loads(line) for line in open(out / "accuracy.jsonl")}
    scores = tmp_path / "scores.csv"
    with open(scores, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", *cfg.groups])
        for p in ckpts:
            step = int(os.path.basename(p).split("-")[1].split(".")[0])
            w.writerow([step, *(acc[step][g] for g in cfg.groups)])
    result = subprocess.run([sys.executable, "-m", "grokwatch.cli", "correlate", "--state-dir",
                             str(tmp_path / "state"), "--scores", str(scores)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "group", "metric", "n"]
    assert any(" add " in line and "pathway distance" in line for line in lines)
    n_at = len(lines[0].split()) - lines[0].split().index("n")  # from the right: the metric's title has spaces
    n_column = [int(line.split()[-n_at]) for line in lines[1:] if "pathway distance" in line]
    assert n_column and all(n == len(ckpts) for n in n_column)


def test_the_demo_with_its_metrics_port_taken_runs_its_own_collector(tmp_path, capsys):
    """A second demo (or a real collector) on port 9464 used to answer the first one's readiness check:
    the training then streamed to nobody and the report was empty. Now the demo waits for its own
    collector and moves /metrics to a free port, saying so."""
    import http.server
    import threading

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        cfg = BenchConfig(**{**SHORT.__dict__, "steps": 60, "save_every": 0})
        main_job(cfg, str(tmp_path), metrics_port=other.server_address[1], run="busy")
    finally:
        other.shutdown()
        other.server_close()
    assert "is in use" in capsys.readouterr().out
    series, _ = load(read_journal(str(tmp_path / "state")))
    assert ("busy", "train", "add") in series
