"""``grokwatch report``: one self-contained HTML page plus PNG files from a
collector's journal. Per group: losses, held-out accuracy (when logged),
pathway distance beside the cross-group baseline, consistency and adjacent
cosine, routing entropy, router health per layer, the phases with onset
markers; and the paper's Table 1 with confounder columns.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from typing import Optional

import numpy as np

from grokwatch.collector.analysis import (
    METRIC_TITLES,
    METRICS,
    EvalSeries,
    GroupSeries,
    correlation_table,
    first_crossing,
    load,
    memorized_step,
)
from grokwatch.collector.labels import BUCKET_PREFIX, CROSS_GROUP
from grokwatch.collector.persist import read_journal

# phase_distance -> how the report names it
SIGNAL_TITLES = {"normalized": METRIC_TITLES["distance_normalized"], "raw": METRIC_TITLES["distance"],
                 "vs_cross": METRIC_TITLES["distance_vs_cross"],
                 "normalized_vs_cross": METRIC_TITLES["normalized_vs_cross"]}


def format_cell(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.2f}"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:+.1f} %"


def evidence_text(series: GroupSeries) -> list[str]:
    """What dated each phase, in words (the journal's evidence, METRICS.md §5)."""
    out = []
    mem = series.evidence.get("memorized")
    if mem:
        out.append(f"memorized dated to step {mem['step']}: loss {mem.get('loss')} ≤ ε {mem.get('epsilon')}, "
                   f"change {mem.get('loss_change')} over its last {mem.get('loss_points')} loss points "
                   f"(flat within {mem.get('loss_tolerance')})")
    gen = series.evidence.get("generalizing")
    if gen:
        signal = SIGNAL_TITLES.get(gen.get("signal"), gen.get("signal"))
        out.append(f"onset dated to step {gen['step']}: {signal} {_pct(gen.get('distance_change'))} over the window "
                   f"(Theil–Sen slope {gen.get('distance_slope')} per step, interval [{gen.get('distance_slope_low')}, "
                   f"{gen.get('distance_slope_high')}]; Mann–Kendall p = {gen.get('p_fall')}, noise lag-1 "
                   f"correlation {gen.get('noise_rho')}); cross-group baseline {_pct(gen.get('baseline_change'))}; "
                   f"loss {gen.get('loss')} ≤ ε {gen.get('epsilon')}; confirmed at step {gen.get('confirmed_step')}")
    if series.phases and all(p == "unknown" for _, p in series.phases):
        out.append("phase unknown: no loss evidence for this group (no probe, no training loss given), so no claim")
    return out


def _phase_marks(ax, series: GroupSeries) -> None:
    for step, phase in series.phases:
        if phase == "memorized":
            ax.axvline(step, color="tab:gray", ls="--", lw=1)
        elif phase == "generalizing":
            ax.axvline(step, color="tab:red", ls="--", lw=1.2)


def plot_group(series: GroupSeries, train: Optional[GroupSeries], ev: Optional[EvalSeries], path: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(6, 1, figsize=(8, 14), sharex=True)
    s, v = series.steps, series.values
    title = f"{series.run} · {series.group} ({series.source})"
    ax = axes[0]
    if not np.isnan(v["loss"]).all():
        ax.semilogy(s, np.clip(v["loss"], 1e-6, None), label=f"{series.source} loss")
    if train is not None and not np.isnan(train.values["loss"]).all():
        ax.semilogy(train.steps, np.clip(train.values["loss"], 1e-6, None), label="train loss")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax = axes[1]
    if ev is not None:
        ax.plot(ev.steps, ev.heldout, label="held-out accuracy", color="tab:green")
        if ev.train is not None:
            ax.plot(ev.steps, ev.train, label="train accuracy", color="tab:olive", ls=":")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax = axes[2]
    ax.plot(s, v["distance_normalized"], label="within group")
    ax.plot(s, v["cross_distance_normalized"], label="cross-group baseline", color="tab:gray")
    ax.set_ylabel("normalized\npathway distance")
    ax = axes[3]
    ax.plot(s, v["consistency"], label="consistency 1 - C")
    ax.plot(s, v["adjacent_cosine"], label="adjacent cosine")
    ax.set_ylabel("smoothness")
    ax = axes[4]
    if series.entropy_layers is not None:
        for layer in range(series.entropy_layers.shape[1]):
            ax.plot(s, series.entropy_layers[:, layer], lw=0.8, label=f"layer {layer}")
    ax.set_ylabel("routing entropy\n/ log E")
    ax = axes[5]
    if series.imbalance_layers is not None:
        for layer in range(series.imbalance_layers.shape[1]):
            ax.plot(s, series.imbalance_layers[:, layer], lw=0.8, label=f"layer {layer}")
    ax.set_ylabel("load imbalance\n(max / mean)")
    ax.set_xlabel("training step")
    for ax in axes:
        _phase_marks(ax, series)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    data = buf.getvalue()
    with open(path, "wb") as fh:
        fh.write(data)
    return data


def build_report(state_dir: str, out_dir: str, run: Optional[str] = None) -> str:
    """Write report.html and one PNG per group; returns the HTML path."""
    os.makedirs(out_dir, exist_ok=True)
    series, evals = load(read_journal(state_dir))
    if run:
        series = {k: v for k, v in series.items() if k[0] == run}
    # One section per (run, group): the probe source when it exists (it has per-sample loss).
    by_group: dict = {}
    for (r, source, group), gs in series.items():
        if group == CROSS_GROUP or group.startswith(BUCKET_PREFIX):
            continue
        if (r, group) not in by_group or source == "probe":
            by_group[(r, group)] = gs
    sections, table_rows = [], []
    for (r, group), gs in sorted(by_group.items()):
        ev = evals.get((r, group))
        train = series.get((r, "train", group)) if gs.source != "train" else None
        name = f"{r}-{group}".replace("/", "_").replace(" ", "_")
        png = plot_group(gs, train, ev, os.path.join(out_dir, f"{name}.png"))
        memo = memorized_step(gs, ev)
        onset = next((s for s, p in gs.phases if p == "generalizing"), None)
        crossing = first_crossing(ev) if ev is not None else None
        facts = [f"memorized at step {memo:.0f}" if memo is not None else "not memorized yet",
                 (f"detected onset at step {onset}" if onset is not None else "no onset detected")
                 + (f" (watching {SIGNAL_TITLES.get(gs.phase_signal, gs.phase_signal)})" if gs.phase_signal else ""),
                 f"held-out accuracy first above 50% at step {crossing:.0f}" if crossing is not None else
                 ("held-out accuracy never above 50%" if ev is not None else "no held-out accuracy logged")]
        why = "".join(f"<li>{html.escape(line)}</li>" for line in evidence_text(gs))
        sections.append(
            f"<h2>{html.escape(r)} · {html.escape(group)} <small>({gs.source})</small></h2>"
            f"<p>{' · '.join(html.escape(f) for f in facts)}</p>"
            + (f"<ul class=evidence>{why}</ul>" if why else "") +
            f'<img alt="{html.escape(group)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
        if ev is not None:
            table = correlation_table(gs, ev, memo)
            for key in METRICS:
                row = table[key]
                table_rows.append(
                    f"<tr><td>{html.escape(r)}</td><td>{html.escape(group)}</td><td>{METRIC_TITLES[key]}</td>"
                    f"<td>{row['n']}</td><td>{format_cell(row['pearson'])}</td><td>{format_cell(row['spearman'])}</td>"
                    f"<td>{format_cell(row['vs_entropy'])}</td><td>{format_cell(row['vs_mean_entropy'])}</td>"
                    f"<td>{format_cell(row['vs_length'])}</td><td>{format_cell(row['vs_step'])}</td>"
                    f"<td>{format_cell(row['partial_entropy'])}</td><td>{format_cell(row['partial_mean_entropy'])}</td>"
                    f"<td>{format_cell(row['partial_step'])}</td></tr>")
    table_html = (
        "<table><tr><th>run</th><th>group</th><th>metric</th><th>n</th><th>Pearson r (acc)</th>"
        "<th>Spearman ρ (acc)</th><th>r with entropy</th><th>r with H(ḡ)</th><th>r with length</th>"
        "<th>r with step</th><th>partial r (acc | entropy)</th><th>partial r (acc | H(ḡ))</th>"
        "<th>partial r (acc | step)</th></tr>" + "".join(table_rows) + "</table>"
        if table_rows else "<p>No held-out accuracy was logged (mon.log_eval), so there is no Table 1.</p>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>grokwatch report</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td:nth-child(-n+3){{text-align:left}}</style></head>
<body><h1>grokwatch report</h1>
<p>Journal: <code>{html.escape(os.path.abspath(state_dir))}</code>. Correlations are over the evaluation points after
each group memorized (training accuracy ≥ 99% when logged, else the detector's memorized step). Dashed lines:
grey = memorized, red = detected generalization onset. Beside each correlation with held-out accuracy stand the
confounders: the metric's correlation with routing entropy and with the step, and the partial correlation with
accuracy controlling for entropy.</p>
<h2>Table 1 — metrics against held-out accuracy</h2>{table_html}
{''.join(sections)}
</body></html>"""
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return path


def read_scores_csv(path: str) -> dict[str, EvalSeries]:
    """A CSV of benchmark scores per checkpoint: a ``step`` column and one column per group."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "step" not in rows[0]:
        raise ValueError(f"{path}: needs a header with a 'step' column and one column per group")
    rows.sort(key=lambda r: float(r["step"]))
    steps = np.array([float(r["step"]) for r in rows])
    out = {}
    for group in rows[0]:
        if group == "step":
            continue
        out[group] = EvalSeries(steps, np.array([float(r[group]) if r[group] not in ("", None) else math.nan
                                                 for r in rows]), None)
    return out


def correlate(state_dir: str, scores_csv: str, source: str = "replay", run: Optional[str] = None) -> list[dict]:
    """Table-1 rows (one per group and metric) joining a journal with per-checkpoint scores."""
    series, _ = load(read_journal(state_dir))
    scores = read_scores_csv(scores_csv)
    rows = []
    for (r, src, group), gs in sorted(series.items()):
        if src != source or (run and r != run) or group not in scores:
            continue
        table = correlation_table(gs, scores[group], None)
        for key in METRICS:
            rows.append(dict(run=r, group=group, metric=key, **table[key]))
    return rows
