"""The shipped Grafana dashboard drawn from a real Prometheus, as Grafana would (issue 32: no Grafana package
runs here): its variables substituted the way Grafana formats them for a Prometheus data source, every panel's
queries run as range queries, each panel drawn at its grid position into one PNG (matplotlib)."""

from __future__ import annotations

import re
import time
from typing import Optional

from helpers import prom_api

GRID_COLUMNS = 24  # Grafana's grid: 24 columns, rows of ~30 px


def substitute(expr: str, variables: dict[str, list[str]], rate_interval: str) -> str:
    """Grafana's interpolation for Prometheus: a single value as it is, several as a regex group ``(a|b)``
    with each value regex-escaped; ``$__rate_interval`` as given; ``$name`` and ``${name}`` alike."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("${__rate_interval}", rate_interval)
    for name in sorted(variables, key=len, reverse=True):  # $group before $g
        values = variables[name]
        text = values[0] if len(values) == 1 else "(" + "|".join(re.escape(v) for v in values) + ")"
        expr = expr.replace("${" + name + "}", text)
        expr = re.sub(r"\$" + re.escape(name) + r"\b", lambda _: text, expr)
    return expr


def _legend(fmt: Optional[str], metric: dict) -> str:
    if not fmt or fmt == "__auto":
        return ",".join(f"{k}={v}" for k, v in sorted(metric.items()) if k != "__name__") or metric.get("__name__", "")
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt)


def query_panels(dashboard: dict, port: int, variables: dict[str, list[str]], start: float, end: float,
                 step: float = 1.0, rate_interval: str = "1m") -> list[dict]:
    """Every panel with its range-query results: [{title, type, gridPos, series: [(legend, [t], [v])]}]."""
    out = []
    for panel in dashboard["panels"]:
        entry = dict(title=panel["title"], type=panel["type"], gridPos=panel["gridPos"], series=[])
        for target in panel.get("targets", []):
            promql = substitute(target["expr"], variables, rate_interval)
            result = prom_api(port, "query_range", query=promql, start=start, end=end, step=step)["result"]
            for s in result:
                ts = [float(t) for t, _ in s["values"]]
                vs = [float(v) for _, v in s["values"]]
                entry["series"].append((_legend(target.get("legendFormat"), s["metric"]), ts, vs))
        out.append(entry)
    return out


def draw(panels: list[dict], path: str, title: str) -> None:
    """The panels at their grid positions, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(22, height * 0.32))
    fig.suptitle(title, fontsize=11, y=1 + 0.6 / height)
    for p in panels:
        g = p["gridPos"]
        left, width = g["x"] / GRID_COLUMNS + 0.035, g["w"] / GRID_COLUMNS - 0.05
        bottom, h = 1 - (g["y"] + g["h"]) / height + 0.012, g["h"] / height - 0.03
        if p["type"] == "row":
            fig.text(0.01, 1 - (g["y"] + 0.7) / height, p["title"], fontsize=10, weight="bold")
            continue
        ax = fig.add_axes((left, bottom, width, max(h, 0.01)))
        ax.set_title(p["title"], fontsize=8, loc="left")
        ax.tick_params(labelsize=6)
        if not p["series"]:
            ax.text(0.5, 0.5, "No data", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        t0 = min(ts[0] for _, ts, _ in p["series"] if ts)
        if p["type"] == "heatmap":  # one row per series (Grafana's heatmap without calculation), colour by value
            rows = sorted(p["series"], key=lambda s: [int(x) if x.isdigit() else x for x in s[0].split("/")])
            width_t = max(len(ts) for _, ts, _ in rows)
            grid = [list(vs) + [float("nan")] * (width_t - len(vs)) for _, _, vs in rows]
            image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
            ax.set_ylabel("layer/expert", fontsize=6)
            ax.set_yticks(range(0, len(rows), max(1, len(rows) // 8)),
                          [rows[i][0] for i in range(0, len(rows), max(1, len(rows) // 8))])
            fig.colorbar(image, ax=ax, fraction=0.03)
            ax.set_xlabel("samples", fontsize=6)
            continue
        for legend, ts, vs in p["series"][:12]:
            ax.plot([t - t0 for t in ts], vs, "o-", label=legend[:40], linewidth=1, markersize=2)
        if len(p["series"]) <= 12:
            ax.legend(fontsize=5, loc="upper left")
        ax.set_xlabel("seconds", fontsize=6)
    fig.savefig(path, dpi=70, bbox_inches="tight")
    plt.close(fig)


def render(dashboard: dict, port: int, variables: dict[str, list[str]], path: str, seconds: float = 60.0) -> set:
    """Draw the dashboard over the last ``seconds`` into ``path``; returns the titles of panels with data."""
    end = time.time()
    panels = query_panels(dashboard, port, variables, end - seconds, end)
    draw(panels, path, f"{dashboard.get('title', 'dashboard')} — " +
         ", ".join(f"{k}={'|'.join(v)}" for k, v in variables.items()))
    return {p["title"] for p in panels if p["series"]}
