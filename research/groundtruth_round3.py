"""Round 3's pre-registered analysis (issue 28), fixed before any round-3 seed or null journal exists.

    python research/groundtruth_round3.py --seeds r3-seed0.jsonl r3-seed1.jsonl r3-seed2.jsonl \
        --null r3-null.jsonl [--json out.json]
    python research/groundtruth_round3.py --gate r3-pilot-wd1.jsonl --budget-steps 12000

Input: the JSON-lines logs of ``python -m grokwatch.demo.round3`` (one line per probe step, every metric per
domain, computed exactly on fixed probe sets). Domains: the rules add, sub, mul, sq; the controls rand (a
fixed random table: memorizable, never generalizable) and noise (answers redrawn at every showing). The
null run has only rand tables: every onset there is false.

Definitions (pre-registered; docs/groundtruth.md, "Round 3"):

* memorized step of a domain: the first probe step with training accuracy ≥ 0.75 (0.99 until pilot 4, amended
  before any seed ran: at the weight decay that lets a domain generalize, training accuracy plateaus at 0.76–0.94);
  crossing: the first probe step with held-out (swap-clean) accuracy ≥ 0.5.
* **T1, panel test per seed.** Over the domains that memorized (rule domains and rand) plus noise, from the
  latest of their memorized steps to the end: M[d, t] = α_d + γ_t + β·acc[d, t]. The step effects γ_t absorb
  every change common to all domains. β by ordinary least squares (Frisch–Waugh: both sides residualized on
  the two sets of dummies). Null: the accuracy curves permuted across domains (every permutation: 720 for
  six domains), which keeps each curve's shape and autocorrelation; the one-sided p in the metric's expected
  direction counts the identity. Seeds pooled by the mean β; its null by 20,000 draws of one permutation
  per seed; 95 % interval β̄ ± 1.96 × the null's standard deviation.
* **Minimum effect of interest**: 0.03 × the metric's scale per unit of held-out accuracy. The scale is 1
  for R (= within ÷ cross, normalized distances: the review's −0.03); for every other metric the median
  over rule domains of its level at the panel's first step (for E_path the within-domain normalized distance,
  for E_js the within-domain JS divergence, for the fresh-loss gap its own level).
* **T2, timing.** For each rule domain that crosses: y(t) = M_d(t) − mean of the controls' M(t), over the
  probe steps from 500 on; the least-squares fit y = a + b·t + c·[t ≥ break] (one level shift on a linear
  drift), the break searched over the steps between 5 % and 95 % of that span; error = |break − crossing| ÷ run length. Pooled over seeds:
  median error and Kendall τ between breaks and crossings. The step counter's baseline: every domain's
  crossing predicted by the median crossing of the other domains (all seeds, leave one out).
* **T3, specificity per seed.** Δ_d = mean of M_d over the last fifth of the panel window − over its first
  fifth, minus the same of noise. Passes in a seed where the median crossing rule domain moves in the
  expected direction and |Δ_rand| < 0.5 × that median |Δ|. Needed in ≥ 2 of 3 seeds.
* **T4, the shipped detector** (``collector/phases.py``, default PhaseConfig, distance ``auto``) over each
  domain's probe points (loss evidence: the probe's training-document answer loss): onsets within 10 % of
  the run of a crossing; false onsets in rand, noise, non-crossing rule domains and every null-run domain.

Decision per metric (α = 0.005):
* **shown**: pooled T1 p < 0.005 with β in the expected direction in every seed; T2 median error ≤ 0.10,
  Kendall τ ≥ 0.5 and an error no larger than the step counter's; T3 passes;
* **absent at this scale**: ≥ 2 rule domains cross in each seed and the pooled 95 % interval of β excludes
  the minimum effect (in the expected direction);
* **inconclusive**: anything else.

Metrics scored: the paper's two (R and the raw within distance; consistency 1 − C and the raw adjacent
cosine), the transfer metric (E_path, E_js), and the baselines (per-token entropy H_tok, H(ḡ) H_gbar, pathway
length, training answer loss, fresh-loss gap; the step in T2). Baselines have no expected direction: their
p is two-sided and their direction the pooled β's sign.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

RULES = ("add", "sub", "mul", "sq")
CONTROLS = ("rand", "noise")
ALPHA = 0.005
MEI_FRACTION = 0.03
# metric -> expected direction when a domain generalizes (-1 falls, +1 rises, 0: a baseline, two-sided)
METRICS: dict[str, int] = {
    "R": -1, "within": -1, "within_norm": -1, "consistency": +1, "adj_cosine": +1,
    "E_path": -1, "E_js": -1,
    "gap": -1,
    "H_tok": 0, "H_gbar": 0, "length": 0, "loss_train": 0,
}
PRIMARY = ("R", "E_path")
SCALE_OF = {"R": None, "E_path": "within_norm", "E_js": "within_js"}  # None: scale 1
MEMORIZED_ACC = 0.75  # amended before any seed run (pilot 4: at the weight decay that lets a domain generalize, rule domains and rand plateau at 0.76-0.94 training accuracy)
CROSS_ACC = 0.5
T2_FROM_STEP = 500
T2_EDGE = 0.05
TIMING_TOL = 0.10
KENDALL_MIN = 0.5
POOL_DRAWS = 20_000


@dataclass
class Run:
    name: str
    steps: np.ndarray
    domains: list[str]
    series: dict[str, dict[str, np.ndarray]]  # domain -> key -> values over steps

    @property
    def length(self) -> float:
        return float(self.steps[-1])

    def get(self, domain: str, key: str) -> np.ndarray:
        return self.series[domain][key]

    def first_step(self, domain: str, key: str, level: float) -> Optional[int]:
        hit = np.flatnonzero(self.get(domain, key) >= level)
        return int(self.steps[hit[0]]) if hit.size else None

    def memorized(self, domain: str) -> Optional[int]:
        return self.first_step(domain, "acc_train", MEMORIZED_ACC)

    def crossing(self, domain: str) -> Optional[int]:
        return self.first_step(domain, "acc_test", CROSS_ACC)


def load(path: str) -> Run:
    records = []
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as fh:
        for line in fh:
            rec = json.loads(line)
            if "step" in rec:
                records.append(rec)
    if not records:
        raise ValueError(f"{path}: no probe steps")
    domains = list(records[0]["domains"])
    keys = list(records[0]["domains"][domains[0]])
    series = {d: {k: np.array([_num(r["domains"][d].get(k)) for r in records]) for k in keys} for d in domains}
    return Run(path, np.array([r["step"] for r in records], dtype=np.float64), domains, series)


def _num(x) -> float:
    return math.nan if x is None else float(x)


# ---------------------------------------------------------------- T1: the panel test


@dataclass
class Panel:
    domains: list[str]
    steps: np.ndarray
    M: np.ndarray  # [domains, steps]
    acc: np.ndarray
    start: int


def panel(run: Run, metric: str) -> Optional[Panel]:
    members = [d for d in run.domains if d in RULES + ("rand",) and run.memorized(d) is not None]
    mem_steps = [run.memorized(d) for d in members]
    if "noise" in run.domains:
        members.append("noise")
    if len(members) < 3 or not mem_steps:
        return None
    start = max(s for s in mem_steps if s is not None)
    cols = run.steps >= start
    if cols.sum() < 10:
        return None
    M = np.stack([run.get(d, metric)[cols] for d in members])
    acc = np.stack([run.get(d, "acc_test")[cols] for d in members])
    ok = np.isfinite(M).all(0) & np.isfinite(acc).all(0)
    if ok.sum() < 10:
        return None
    return Panel(members, run.steps[cols][ok], M[:, ok], acc[:, ok], int(start))


def _two_way_residualizer(n_dom: int, n_t: int):
    """x [n_dom, n_t] -> x minus its domain and step means (the balanced panel's two-way projection)."""
    def resid(x: np.ndarray) -> np.ndarray:
        return x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + x.mean()
    return resid


def beta_of(P: Panel, acc: Optional[np.ndarray] = None) -> float:
    resid = _two_way_residualizer(*P.M.shape)
    a = resid(P.acc if acc is None else acc)
    m = resid(P.M)
    den = float((a * a).sum())
    return float((a * m).sum() / den) if den > 0 else math.nan


def permutation_betas(P: Panel) -> np.ndarray:
    n = len(P.domains)
    perms = list(itertools.permutations(range(n))) if n <= 7 else [
        tuple(np.random.default_rng(i).permutation(n)) for i in range(5040)]
    return np.array([beta_of(P, P.acc[list(p)]) for p in perms])


def one_sided_p(obs: float, null: np.ndarray, direction: int) -> float:
    if direction < 0:
        return float((null <= obs + 1e-15).mean())
    if direction > 0:
        return float((null >= obs - 1e-15).mean())
    return float(min(1.0, 2 * min((null <= obs + 1e-15).mean(), (null >= obs - 1e-15).mean())))


def scale_of(run: Run, P: Panel, metric: str) -> float:
    key = SCALE_OF.get(metric, metric)
    if key is None:
        return 1.0
    first = np.flatnonzero(run.steps >= P.start)[0]
    levels = [abs(run.get(d, key)[first]) for d in RULES if d in run.domains]
    levels = [v for v in levels if math.isfinite(v)]
    return float(np.median(levels)) if levels else math.nan


@dataclass
class T1:
    betas: list[float] = field(default_factory=list)
    p_seeds: list[float] = field(default_factory=list)
    beta: float = math.nan
    p: float = math.nan
    ci: tuple[float, float] = (math.nan, math.nan)
    mei: float = math.nan
    direction: int = 0  # the one tested (a baseline's: the pooled sign)


def t1(runs: list[Run], metric: str, rng: np.random.Generator) -> T1:
    out = T1()
    nulls, scales = [], []
    for run in runs:
        P = panel(run, metric)
        if P is None:
            continue
        out.betas.append(beta_of(P))
        nulls.append(permutation_betas(P))
        scales.append(scale_of(run, P, metric))
    if not out.betas:
        return out
    out.beta = float(np.mean(out.betas))
    expected = METRICS[metric]
    out.direction = expected if expected else (1 if out.beta > 0 else -1)
    for b, null in zip(out.betas, nulls):
        out.p_seeds.append(one_sided_p(b, null, expected))
    draws = np.mean([null[rng.integers(0, len(null), POOL_DRAWS)] for null in nulls], axis=0)
    out.p = one_sided_p(out.beta, np.r_[out.beta, draws], expected)  # the observed draw counts once
    sd = float(draws.std(ddof=1))
    out.ci = (out.beta - 1.96 * sd, out.beta + 1.96 * sd)
    out.mei = MEI_FRACTION * float(np.nanmedian(scales))
    return out


# ---------------------------------------------------------------- T2: timing


def level_break(x: np.ndarray, y: np.ndarray, edge: float = T2_EDGE) -> float:
    """The break of the least-squares fit y = a + b·x + c·[x ≥ break]: one level shift on a linear drift
    (a metric that follows a sigmoid accuracy curve shifts at its midpoint, the 50 % crossing)."""
    lo, hi = x[0] + edge * (x[-1] - x[0]), x[-1] - edge * (x[-1] - x[0])
    best, at = math.inf, math.nan
    for b in x[(x >= lo) & (x <= hi)]:
        X = np.c_[np.ones_like(x), x, (x >= b).astype(np.float64)]
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        sse = float(((X @ coef - y) ** 2).sum())
        if sse < best:
            best, at = sse, float(b)
    return at


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    n = len(a)
    if n < 3:
        return math.nan
    s = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            s += np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
    return float(s / (n * (n - 1) / 2))


@dataclass
class T2:
    breaks: list[float] = field(default_factory=list)
    crossings: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    median_error: float = math.nan
    tau: float = math.nan
    step_median_error: float = math.nan


def crossings(runs: list[Run]) -> list[tuple[Run, str, int]]:
    return [(run, d, c) for run in runs for d in RULES if d in run.domains
            for c in [run.crossing(d)] if c is not None]


def t2(runs: list[Run], metric: str) -> T2:
    out = T2()
    for run, d, c in crossings(runs):
        controls = [k for k in CONTROLS if k in run.domains]
        if not controls:
            continue
        y = run.get(d, metric) - np.mean([run.get(k, metric) for k in controls], axis=0)
        ok = (run.steps >= T2_FROM_STEP) & np.isfinite(y)
        if ok.sum() < 10:
            continue
        b = level_break(run.steps[ok], y[ok])
        out.breaks.append(b)
        out.crossings.append(float(c))
        out.errors.append(abs(b - c) / run.length)
    if out.errors:
        out.median_error = float(np.median(out.errors))
        out.tau = kendall_tau(np.array(out.breaks), np.array(out.crossings))
    out.step_median_error = step_counter_error(runs)
    return out


def step_counter_error(runs: list[Run]) -> float:
    """The step counter's timing: each crossing predicted by the median of the others' (leave one out)."""
    cs = crossings(runs)
    if len(cs) < 2:
        return math.nan
    errs = []
    for i, (run, _, c) in enumerate(cs):
        others = [o for j, (_, _, o) in enumerate(cs) if j != i]
        errs.append(abs(float(np.median(others)) - c) / run.length)
    return float(np.median(errs))


# ---------------------------------------------------------------- T3: specificity


def t3(runs: list[Run], metric: str) -> list[Optional[bool]]:
    direction = METRICS[metric] or 0
    out: list[Optional[bool]] = []
    for run in runs:
        P = panel(run, metric)
        if P is None or "rand" not in P.domains or "noise" not in P.domains:
            out.append(None)
            continue
        k = max(1, len(P.steps) // 5)
        change = {d: float(P.M[i, -k:].mean() - P.M[i, :k].mean()) for i, d in enumerate(P.domains)}
        net = {d: change[d] - change["noise"] for d in P.domains}
        rule = [net[d] for d in P.domains if d in RULES and run.crossing(d) is not None]
        if not rule:
            out.append(False)
            continue
        med = float(np.median(rule))
        if direction == 0:
            direction_ok = True
        else:
            direction_ok = np.sign(med) == direction
        out.append(bool(direction_ok and abs(net["rand"]) < 0.5 * abs(med)))
    return out


# ---------------------------------------------------------------- T4: the shipped detector


def detector_onsets(run: Run) -> dict[str, Optional[int]]:
    from grokwatch.collector.phases import PhaseConfig, PhaseTracker

    onsets: dict[str, Optional[int]] = {}
    for d in run.domains:
        tracker = PhaseTracker(PhaseConfig(), distance="auto")
        s = run.series[d]
        for i, step in enumerate(run.steps):
            point = {"loss": s["loss_train"][i], "distance": s["within"][i], "distance_normalized": s["within_norm"][i],
                     "cross_distance": s["cross"][i], "cross_distance_normalized": s["cross_norm"][i],
                     "consistency": s["consistency"][i]}
            tracker.observe(int(step), {k: (None if not math.isfinite(v) else float(v)) for k, v in point.items()})
        onsets[d] = tracker.onset_step
    return onsets


def t4(runs: list[Run], null_runs: list[Run]) -> dict:
    hits, crossed, false_onsets, silent_controls = 0, 0, [], 0
    for run in runs:
        onsets = detector_onsets(run)
        for d, onset in onsets.items():
            c = run.crossing(d) if d in RULES else None
            if c is not None:
                crossed += 1
                hits += onset is not None and abs(onset - c) <= TIMING_TOL * run.length
            elif onset is not None:
                false_onsets.append(f"{run.name}:{d}@{onset}")
            elif d in CONTROLS:
                silent_controls += 1
    null_false = []
    for run in null_runs:
        null_false += [f"{run.name}:{d}@{o}" for d, o in detector_onsets(run).items() if o is not None]
    return dict(crossings=crossed, within_10pct=hits, false_onsets=false_onsets,
                null_domains=sum(len(r.domains) for r in null_runs), null_false_onsets=null_false)


# ---------------------------------------------------------------- the paper's protocol, replayed (descriptive)


def paper_protocol(runs: list[Run], metric: str, checkpoints: int = 6) -> tuple[int, int]:
    """Groups with |Spearman(metric, held-out accuracy)| ≥ 0.9 at ``checkpoints`` evenly spaced probe steps
    from the first held-out accuracy > 0.1 to the end, of the rule domains that cross (the paper's Table 1)."""
    n = hit = 0
    for run, d, _ in crossings(runs):
        start = np.flatnonzero(run.get(d, "acc_test") > 0.1)
        if not start.size:
            continue
        idx = np.unique(np.linspace(start[0], len(run.steps) - 1, checkpoints).round().astype(int))
        x = run.steps[idx] if metric == "step" else run.get(d, metric)[idx]
        y = run.get(d, "acc_test")[idx]
        if len(idx) < 4 or not np.isfinite(x).all():
            continue
        n += 1
        hit += abs(_spearman(x, y)) >= 0.9
    return hit, n


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    def rank(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for val in np.unique(v):  # ties: mean rank
            tie = v == val
            r[tie] = r[tie].mean()
        return r
    rx, ry = rank(np.asarray(x, float)), rank(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


# ---------------------------------------------------------------- decision


def verdict(metric: str, runs: list[Run], r1: T1, r2: T2, r3: list[Optional[bool]]) -> str:
    direction = r1.direction
    seeds_ok = bool(r1.betas) and all(np.sign(b) == direction for b in r1.betas) and len(r1.betas) == len(runs)
    timing_ok = (r2.median_error <= TIMING_TOL and r2.tau >= KENDALL_MIN
                 and not r2.median_error > r2.step_median_error)
    spec_ok = sum(1 for v in r3 if v) >= 2
    if r1.p < ALPHA and seeds_ok and timing_ok and spec_ok:
        return "shown"
    enough = all(sum(1 for d in RULES if d in run.domains and run.crossing(d) is not None) >= 2 for run in runs)
    if enough and math.isfinite(r1.mei):
        lo, hi = r1.ci
        if METRICS[metric] < 0 and lo > -r1.mei:
            return "absent"
        if METRICS[metric] > 0 and hi < r1.mei:
            return "absent"
        if METRICS[metric] == 0 and lo > -r1.mei and hi < r1.mei:
            return "absent"
    return "inconclusive"


def analyse(runs: list[Run], null_runs: list[Run], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out: dict = {"runs": [r.name for r in runs], "null": [r.name for r in null_runs], "metrics": {}}
    out["milestones"] = {r.name: {d: dict(memorized=r.memorized(d), crossing=r.crossing(d),
                                          final_test=_round(float(r.get(d, "acc_test")[-1])))
                                  for d in r.domains} for r in runs + null_runs}
    for metric in METRICS:
        r1, r2, r3 = t1(runs, metric, rng), t2(runs, metric), t3(runs, metric)
        hit, n = paper_protocol(runs, metric)
        out["metrics"][metric] = dict(
            direction=METRICS[metric], beta=_round(r1.beta), betas=[_round(b) for b in r1.betas],
            p=_round(r1.p), p_seeds=[_round(p) for p in r1.p_seeds], ci=[_round(c) for c in r1.ci],
            mei=_round(r1.mei), t2_median_error=_round(r2.median_error), t2_tau=_round(r2.tau),
            t2_n=len(r2.errors), t2_step_error=_round(r2.step_median_error), t3=r3, paper_protocol=[hit, n],
            verdict=verdict(metric, runs, r1, r2, r3))
    hit, n = paper_protocol(runs, "step")
    out["step_paper_protocol"] = [hit, n]
    out["detector"] = t4(runs, null_runs)
    return out


def _round(x: Optional[float], digits: int = 4) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(f"{x:.{digits}g}")


def render(result: dict) -> str:
    lines = ["| metric | dir | β̄ (per seed) | pooled p | 95 % CI | MEI | T2 err (step's) | T2 τ (n) | T3 | paper protocol | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in result["metrics"].items():
        lines.append(
            f"| {name} | {'+' if m['direction'] > 0 else '−' if m['direction'] < 0 else '±'} | {m['beta']} "
            f"({', '.join(str(b) for b in m['betas'])}) | {m['p']} | [{m['ci'][0]}, {m['ci'][1]}] | {m['mei']} | "
            f"{m['t2_median_error']} ({m['t2_step_error']}) | {m['t2_tau']} ({m['t2_n']}) | "
            f"{''.join('✓' if v else '✗' if v is False else '–' for v in m['t3'])} | "
            f"{m['paper_protocol'][0]}/{m['paper_protocol'][1]} | **{m['verdict']}** |")
    s = result["step_paper_protocol"]
    lines.append(f"\nStep number, paper protocol: {s[0]}/{s[1]}.")
    det = result["detector"]
    lines.append(f"Shipped detector: {det['within_10pct']} of {det['crossings']} crossings dated within 10 %; "
                 f"false onsets {len(det['false_onsets'])} ({', '.join(det['false_onsets']) or 'none'}); "
                 f"null run: {len(det['null_false_onsets'])} of {det['null_domains']} domains.")
    return "\n".join(lines)


def gate(run: Run, budget_steps: int, memorize_by: int = 1500) -> dict:
    """The pilot gate: every rule domain memorized by ``memorize_by``, rand memorized, ≥ 2 rule domains on
    track to cross 50 % held-out within ``budget_steps`` (crossed, or the last ten points' line gets there)."""
    out: dict = {"memorized": {}, "on_track": {}}
    for d in run.domains:
        out["memorized"][d] = run.memorized(d)
    for d in RULES:
        if d not in run.domains:
            continue
        c = run.crossing(d)
        if c is not None:
            out["on_track"][d] = f"crossed at {c}"
            continue
        x, y = run.steps[-10:], run.get(d, "acc_test")[-10:]
        slope = float(np.polyfit(x, y, 1)[0]) if len(x) > 2 else 0.0
        eta = x[-1] + (CROSS_ACC - y[-1]) / slope if slope > 0 else math.inf
        out["on_track"][d] = f"at {y[-1]:.2f}, reaches 0.5 by ≈ {eta:.0f}" if eta <= budget_steps else None
    rules_mem = all((out["memorized"].get(d) or math.inf) <= memorize_by for d in RULES if d in run.domains)
    out["pass"] = bool(rules_mem and out["memorized"].get("rand") is not None
                       and sum(v is not None for v in out["on_track"].values()) >= 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seeds", nargs="*", default=[])
    ap.add_argument("--null", nargs="*", default=[])
    ap.add_argument("--json", default=None)
    ap.add_argument("--gate", nargs="*", default=[], help="pilot logs to check against the gate")
    ap.add_argument("--budget-steps", type=int, default=12000)
    args = ap.parse_args(argv)
    for path in args.gate:
        print(path, json.dumps(gate(load(path), args.budget_steps)))
    if not args.seeds:
        return 0
    result = analyse([load(p) for p in args.seeds], [load(p) for p in args.null])
    print(json.dumps(result["milestones"], indent=1))
    print(render(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
