"""Issue 32 part 2: a real collector writes each run to W&B (offline mode), step-aligned, with the phase and
router-collapse alerts; the run file read back (tests/wandb_records.py) holds what /metrics exported."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from helpers import scrape, send_all, start_collector, value
from wandb_records import read_run
from wire_factories import make_eval, make_hello, make_loss, make_routing

pytest.importorskip("wandb")


def _memorizing(step: int) -> float:  # the training loss falls, then stays low and flat: memorized
    return 4.0 * max(0.0, 1 - step / 200) + 0.01


def _traffic(steps, seq0: int = 1, concentration: float = 0.3):
    rng = np.random.default_rng(0)
    seq, out = seq0, []
    for step in steps:
        out.append(make_routing(rng=rng, seq=seq, n=4, step=step, groups=("math", "code") * 2,
                                sample_ids=[f"s{step}-{i}" for i in range(4)], concentration=concentration))
        out.append(make_loss(seq=seq + 1, step=step, losses={"math": _memorizing(step), "code": _memorizing(step)}))
        seq += 2
    return out, seq


def test_a_run_reads_back_step_aligned_with_its_alerts(tmp_path):
    wb = tmp_path / "wb"
    c = start_collector(tmp_path, wandb_dir=str(wb), wandb_mode="offline", wandb_interval_s=3600)
    try:
        first, seq = _traffic(range(0, 300, 10))
        send_all(c, [make_hello(), *first])
        c.wandb.write_once()
        rest, seq = _traffic(range(300, 600, 10), seq0=seq)
        send_all(c, [*rest, make_eval(seq=seq, step=590, scores={"math": 0.25})])
        metrics = scrape(c.metrics_port)
    finally:
        c.stop()  # the final write, then the W&B run is finished
    run = read_run(str(wb), "grokwatch-run-a")
    assert run["run"].display_name == "run-a" and run["run"].project == "grokwatch"
    # every key on the training step, not W&B's row counter or the wall clock
    assert any(m.glob_name == "*" and m.step_metric == "grokwatch/step" for m in run["metrics"])
    rows = run["history"]
    assert all("grokwatch/step" in row for row in rows)
    entropy = [(row["grokwatch/step"], row["train/math/routing_entropy_ratio/layer0"]) for row in rows
               if "train/math/routing_entropy_ratio/layer0" in row]
    assert [s for s, _ in entropy] == [290, 590]  # one point a write, at the group's step
    assert entropy[-1][1] == pytest.approx(value(metrics, "grokwatch_routing_entropy_ratio", run="run-a",
                                                 source="train", group="math", layer="0"), rel=1e-6)
    assert [(r["grokwatch/step"], r["eval/math"]) for r in rows if "eval/math" in r] == [(590, 0.25)]
    phases = [r["train/math/phase"] for r in rows if "train/math/phase" in r]
    assert phases[-1] >= 2  # memorized (or later)
    dated = value(metrics, "grokwatch_group_memorized_step", run="run-a", source="train", group="math")
    titles = [a.title for a in run["alerts"]]
    assert titles.count("grokwatch: math memorized its data") == 1 and titles.count(
        "grokwatch: code memorized its data") == 1
    [alert] = [a for a in run["alerts"] if a.title == "grokwatch: math memorized its data"]
    assert f"at step {int(dated)}" in alert.text and alert.level == "INFO"


def test_a_collapsed_layer_alerts_once_and_a_healthy_one_never(tmp_path):
    wb = tmp_path / "wb"
    c = start_collector(tmp_path, wandb_dir=str(wb), wandb_mode="offline", wandb_interval_s=3600)
    try:
        healthy, seq = _traffic(range(0, 50, 10), concentration=50.0)  # near-uniform routing
        send_all(c, [make_hello(), *healthy])
        c.wandb.write_once()
        assert c.wandb.alerts == 0
        rng = np.random.default_rng(1)
        msgs = []
        for step in range(50, 400, 10):  # every token on one expert: entropy ~0 in every layer
            m = make_routing(rng=rng, seq=seq, n=4, step=step, groups=("math", "code") * 2,
                             sample_ids=[f"c{step}-{i}" for i in range(4)])
            probs = np.zeros_like(m.mean_probs_NLE)
            probs[..., 0] = 1.0
            msgs.append(dataclasses.replace(m, mean_probs_NLE=probs,
                                            entropy_NL=np.zeros_like(m.entropy_NL)))
            seq += 1
        send_all(c, msgs)
        c.wandb.write_once()
        c.wandb.write_once()  # still collapsed: no second alert
    finally:
        c.stop()
    alerts = read_run(str(wb), "grokwatch-run-a")["alerts"]
    collapse = [a for a in alerts if "router collapse" in a.title]
    assert sorted(a.title for a in collapse) == [f"grokwatch: router collapse in layer {layer}" for layer in range(4)]
    assert all(a.level == "WARN" for a in collapse)


def test_bad_wandb_settings_fail_at_start_with_one_line(tmp_path):
    from grokwatch.collector.config import CollectorConfig, ConfigError

    with pytest.raises(ConfigError, match="wandb_mode"):
        CollectorConfig(wandb_mode="sometimes")
    with pytest.raises(ConfigError, match="wandb_run_id"):
        CollectorConfig(wandb_run_id="{rank}")
    with pytest.raises(ConfigError, match="wandb_run_id"):  # {training} stands alone: the id is the training's
        CollectorConfig(wandb_run_id="{training}-{host}")
    assert CollectorConfig(wandb_run_id="{training}").wandb_run_id == "{training}"


def test_the_wandb_run_id_joins_a_training_run_named_after_its_grokwatch_run(tmp_path):
    from grokwatch.collector.wandb_view import run_id

    assert run_id("{run}", "llama-moe/pp0") == "llama-moe_pp0"  # W&B's id alphabet
    wb = tmp_path / "wb"
    c = start_collector(tmp_path, wandb_dir=str(wb), wandb_mode="offline", wandb_interval_s=3600,
                        wandb_run_id="{run}")
    try:
        traffic, _ = _traffic(range(0, 30, 10))
        send_all(c, [make_hello(), *traffic])
    finally:
        c.stop()
    assert read_run(str(wb), "run-a")["history"]


def test_wandb_run_id_training_joins_the_run_the_hello_names_and_waits_until_one_does(tmp_path):
    """Issue 32: with wandb_run_id = "{training}" nothing is written for a run until a hello names the
    training's W&B run in the configured project (a hello naming another project is a claim the collector does
    not act on with its W&B key); then that run (its id and project, from the hello) gets the points due then,
    under grokwatch/ with only those keys on grokwatch/step, and the alerts; the training run's name is not
    ours to set. Rank 1's hello, naming none, does not unname it. The default (own run) records the
    training's run in its config instead."""
    wb = tmp_path / "wb"
    c = start_collector(tmp_path, wandb_dir=str(wb), wandb_mode="offline", wandb_interval_s=3600,
                        wandb_run_id="{training}", wandb_project="pretrain")
    try:
        first, seq = _traffic(range(0, 300, 10))
        send_all(c, [make_hello(world_size=2), *first])
        assert c.wandb.write_once() == 0 and not c.wandb.runs  # waits: no hello has named a W&B run
        send_all(c, [make_hello(seq=seq, world_size=2, wandb_run="someone/elsewhere/their-run")])
        seq += 1
        assert c.wandb.write_once() == 0 and not c.wandb.runs  # outside wandb_project: not joined
        rest, seq = _traffic(range(300, 600, 10), seq0=seq)
        send_all(c, [*rest, make_hello(seq=seq, world_size=2, wandb_run="/pretrain/train-xyz"),
                     make_hello(rank=1, sender="s1", world_size=2)])
        assert c.wandb.write_once() > 0
        metrics = scrape(c.metrics_port)
        more, seq = _traffic(range(600, 700, 10), seq0=seq + 1)  # the training restarts under a new W&B run
        send_all(c, [*more, make_hello(seq=seq, world_size=2, wandb_run="/pretrain/train-restarted")])
        assert c.wandb.write_once() > 0
    finally:
        c.stop()
    later = read_run(str(wb), "train-restarted")["history"]
    assert later and min(row["grokwatch/step"] for row in later) >= 600  # followed, with what came after
    run = read_run(str(wb), "train-xyz")
    assert run["run"].project == "pretrain" and run["run"].display_name != "run-a"
    assert [m.glob_name for m in run["metrics"] if m.glob_name] == ["grokwatch/*"]
    assert all(m.step_metric == "grokwatch/step" for m in run["metrics"] if m.glob_name)
    rows = run["history"]
    assert rows and all(set(row) <= {"_step", "_runtime", "_timestamp"} | {k for k in row if k.startswith("grokwatch/")}
                        for row in rows)
    entropy = [(row["grokwatch/step"], row["grokwatch/train/math/routing_entropy_ratio/layer0"]) for row in rows
               if "grokwatch/train/math/routing_entropy_ratio/layer0" in row]
    assert entropy and entropy[-1][1] == pytest.approx(value(
        metrics, "grokwatch_routing_entropy_ratio", run="run-a", source="train", group="math", layer="0"), rel=1e-6)
    assert "grokwatch: math memorized its data" in [a.title for a in run["alerts"]]
    assert run["config"]["grokwatch_run"] == "run-a" and run["config"]["grokwatch_experts"] == 8
    # the default: an own run, which names the training's in its config
    own = tmp_path / "own"
    c = start_collector(tmp_path / "c2", wandb_dir=str(own), wandb_mode="offline", wandb_interval_s=3600)
    try:
        traffic, _ = _traffic(range(0, 30, 10))
        send_all(c, [make_hello(), *traffic])
        c.wandb.write_once()
        send_all(c, [make_hello(seq=100, wandb_run="team/pretrain/train-xyz")])
        c.wandb.write_once()
    finally:
        c.stop()
    assert read_run(str(own), "grokwatch-run-a")["config"]["training_wandb_run"] == "team/pretrain/train-xyz"
