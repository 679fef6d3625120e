"""The deployment files (deploy/prometheus, grafana/) against the collector's real exposition and a real
Prometheus (Debian's package): promtool checks and unit-tests the rules, every metric, label and
recording rule the rules and the dashboard name exists, and a live Prometheus loading the shipped config
and rules records exact means from a real collector, and answers every dashboard query."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.phases import PHASES
from grokwatch.collector.state import State
from grokwatch.collector.view import build_view
from grokwatch.wire import Eval, Heartbeat, Routing, encode
from helpers import Pusher, prom_api, prom_query, prometheus, prometheus_tool, start_collector, wait_until
from wire_factories import make_hello, routing_arrays

ROOT = Path(__file__).resolve().parents[2]
PROM_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
RULES = ROOT / "deploy/prometheus/rules/grokwatch.rules.yml"
RULE_TESTS = ROOT / "deploy/prometheus/tests/grokwatch.rules.test.yml"
DASHBOARD = ROOT / "grafana/dashboards/grokwatch.json"
PROVISIONING = ROOT / "grafana/provisioning"

NAME = re.compile(r"\b(grokwatch_[a-z0-9_]+)\b(?:\{([^}]*)\})?")
RECORDED = re.compile(r"\b(grokwatch:[a-z0-9_:]+)\b")
MATCHER = re.compile(r"(\w+)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")


def rule_list() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_targets(dashboard: dict) -> list[tuple[str, str]]:
    """(panel or annotation title, expr) of every query of every panel and of the annotations."""
    return ([(p["title"], t["expr"]) for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
            + [(a["name"], a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a])


def exported() -> dict[str, set]:
    """Every sample name the collector exposes, with its label names (build_view is the exporters' source)."""
    out = {}
    for fam in build_view(State(CollectorConfig())):
        labels = set(fam.labels)
        if fam.kind == "histogram":
            out.update({fam.name + "_bucket": labels | {"le"}, fam.name + "_sum": labels, fam.name + "_count": labels})
        elif fam.kind == "summary":
            out.update({fam.name + "_sum": labels, fam.name + "_count": labels})
        else:
            out[fam.name] = labels
    return out


# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}


def check_names(expr: str, where: str, names: dict[str, set], recorded: set[str]) -> None:
    for name, matchers in NAME.findall(expr):
        assert name in names, f"{where}: {name} is not exported by the collector"
        for label, _, value in MATCHER.findall(matchers or ""):
            assert label in names[name] | TARGET_LABELS, f"{where}: {name} has no label {label}"
            if label == "phase":
                assert value in PHASES, f"{where}: no phase {value!r}"
    for name in RECORDED.findall(expr):
        assert name in recorded, f"{where}: no recording rule writes {name}"


@pytest.mark.prometheus
def test_promtool_accepts_the_config_and_rules_and_their_unit_tests_pass():
    promtool = prometheus_tool("promtool")
    check = subprocess.run([promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rule_list())} rules found" in check.stdout  # the config loads the rules file
    tests = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_every_metric_label_and_recording_rule_named_by_the_rules_and_the_dashboard_exists():
    """A renamed metric or label would leave an alert that never fires and a panel that stays empty,
    with no error anywhere: the names are checked against the exporter's own families."""
    names = exported()
    rules = rule_list()
    recorded = {r["record"] for r in rules if "record" in r}
    for rule in rules:
        check_names(rule["expr"], rule.get("record") or rule.get("alert"), names, recorded)
    dashboard = json.loads(DASHBOARD.read_text())
    for title, expr in dashboard_targets(dashboard):
        check_names(expr, title, names, recorded)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            check_names(var["query"]["query"], f"variable {var['name']}", names, recorded)
    # The cross-group baseline, and the label values the rules filter on, are the collector's.
    from grokwatch.collector.evidence import CROSS_GROUP
    assert '"_cross"' in RULES.read_text() and CROSS_GROUP == "_cross"


def test_the_dashboard_is_well_formed_and_its_variables_are_defined():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
            assert p["datasource"]["uid"] == "${datasource}" and p["description"], p["title"]
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", json.dumps([panels, dashboard["templating"], dashboard["annotations"]])))
    used -= {"__rate_interval"}  # Grafana's own (at least four scrape intervals): the rates use it, not a fixed [5m]
    assert "[5m]" not in json.dumps(panels)
    assert used <= defined, used - defined
    # "All" groups is the listed groups, whose query leaves the probe's mem@ buckets out (".*" would pull them in).
    [group] = [v for v in dashboard["templating"]["list"] if v["name"] == "group"]
    assert "allValue" not in group and 'group!~"mem@.*"' in group["query"]["query"]
    datasources = yaml.safe_load((PROVISIONING / "datasources/prometheus.yml").read_text())["datasources"]
    assert [d["type"] for d in datasources] == ["prometheus"]
    providers = yaml.safe_load((PROVISIONING / "dashboards/grokwatch.yml").read_text())["providers"]
    assert providers[0]["type"] == "file" and providers[0]["options"]["path"]


def values(result: list) -> dict:
    return {r["metric"].get("group", r["metric"].get("run")): float(r["value"][1]) for r in result}


class Traffic(threading.Thread):
    """What a run's agents send, four times a second until stopped: every sample of a group routes alike
    (distance 0 within the group, one fixed distance across groups), adjacent cosines -0.5 (sums that
    fall), and heartbeats that have dropped one message for every nine sent."""

    L, E, K = 4, 8, 2

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.pusher = Pusher(endpoint)
        self.stop_event = threading.Event()
        rng = np.random.default_rng(7)
        self.group_arrays = {g: routing_arrays(rng, 1, self.L, self.E, self.K, concentration=0.2)
                             for g in ("math", "code")}
        self.seq = 0

    def send(self, msg) -> None:
        self.pusher.send(encode(msg))

    def routing(self, step: int) -> Routing:
        groups = ("math", "math", "code", "code")
        arrays = [np.concatenate([self.group_arrays[g][i] for g in groups]) for i in range(4)]
        tokens_LE = (np.arange(self.L * self.E, dtype=np.uint64).reshape(self.L, self.E) + step) * 16
        return Routing(run="run-a", rank=0, sender="s0", seq=self.seq, wall_time=time.time(), source="train",
                       step=step, top_k=self.K, sample_ids=tuple(f"{step}:{i}" for i in range(4)), groups=groups,
                       token_counts_N=arrays[0], mean_probs_NLE=arrays[1], topk_counts_NLE=arrays[2],
                       entropy_NL=arrays[3], adj_cosine_NJ=np.full((4, self.L - 1), -0.5, np.float32),
                       expert_tokens_LE=tokens_LE, counted_forwards=4, group_token_names=("math", "code"),
                       group_tokens_GLE=np.stack([tokens_LE // 2, tokens_LE // 4]), group_forwards=4)

    def run(self) -> None:
        self.send(make_hello(num_layers=self.L, num_experts=self.E, top_k=self.K))
        step = 0
        while not self.stop_event.is_set():
            step += 1
            self.seq += 1
            self.send(self.routing(step))
            self.seq += 1
            self.send(Heartbeat(run="run-a", rank=0, sender="s0", seq=self.seq, wall_time=time.time(),
                                messages_sent=9 * step, messages_dropped={"queue_full": step}, hook_errors=0))
            if step % 8 == 1:
                self.seq += 1
                self.send(Eval(run="run-a", rank=0, sender="s0", seq=self.seq, wall_time=time.time(), step=step,
                               scores={"math": 0.5, "code": 0.25}))
            self.stop_event.wait(0.25)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)
        self.pusher.close()


# Dashboard panels that the traffic above must fill (the others need the probe, an onset or a fault).
FILLED = {"Phase per group (experimental)", "Pathway distance within groups vs the cross-group baseline (experimental)",
          "Distance over the baseline (experimental)", "Held-out score (your eval)", "Distance per layer (experimental)", "Adjacent-layer cosine (experimental)",
          "Expert load imbalance (max over groups)", "Dead experts (max over groups)",
          "Routing entropy ratio (mean over groups)", "Expert load CV (mean over groups)",
          "Distinct pathways per group", "Load imbalance over all tokens (max/mean tokens per expert)",
          "Dead experts over all tokens", "Load imbalance over all tokens, per group (max over layers)",
          "Dead experts over all tokens, per group (max over layers)", "Tokens per expert, share of the layer (opt-in: expert_load_share_max_series)",
          "Training step", "Messages received and rejected", "Agent messages dropped", "Collector queue",
          "Processing time and ingest lag", "Hook errors (last hour)", "Messages lost in transit"}


@pytest.mark.prometheus
@pytest.mark.slow
def test_a_real_prometheus_with_the_shipped_config_and_rules_records_exact_means_and_answers_the_dashboard(tmp_path):
    collector = start_collector(tmp_path, expert_load_share_max_series=4096)
    traffic = Traffic(collector.endpoints[0])
    try:
        traffic.start()
        config = yaml.safe_load(PROM_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(RULES)]
        [job] = config["scrape_configs"]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{collector.metrics_port}"]}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        with prometheus(tmp_path / "prometheus.yml", tmp_path / "tsdb") as port:
            check_live(collector, port)
            check_drawn(port, tmp_path)
    finally:
        traffic.stop()
        collector.stop()


def check_drawn(port: int, tmp_path) -> None:
    """Issue 32: the dashboard as Grafana would draw it — variables substituted as Grafana formats them
    (multi-value $group as a regex group), every panel's queries as range queries, each panel at its grid
    position in one PNG. Every panel the test stream should fill has data over the range. The picture goes
    to DASHBOARD_PNG when set (docs/img/dashboard.png was made so, and looked at)."""
    import os

    from dashboard_render import render

    path = os.environ.get("DASHBOARD_PNG") or str(tmp_path / "dashboard.png")
    dashboard = json.loads(DASHBOARD.read_text())
    drawn = render(dashboard, port, {"datasource": ["prometheus"], "run": ["run-a"], "source": ["train"],
                                     "group": ["code", "math"]}, path)
    assert FILLED <= drawn, FILLED - drawn
    assert os.path.getsize(path) > 10_000


# Keys Grafana accepts that its typed models do not carry (the Prometheus annotation query's own fields, a
# query variable's display string): dropped by the round trip, and nothing else may be.
UNTYPED = {"step", "titleFormat", "textFormat", "tagKeys", "definition"}


def test_the_dashboard_round_trips_through_grafanas_typed_models():
    """Issue 32: schema drift (a misspelt key, a field Grafana renamed) shows up as a key the typed models
    (grafana-foundation-sdk) do not carry, or a value they change."""
    from grafana_foundation_sdk.models.dashboard import Dashboard

    source = json.loads(DASHBOARD.read_text())
    back = json.loads(json.dumps(Dashboard.from_json(source).to_json(),
                                 default=lambda o: o.to_json() if hasattr(o, "to_json") else str(o)))

    def differences(a, b, path=""):
        if isinstance(a, dict) and isinstance(b, dict):
            for key, value in a.items():
                if key not in b:
                    if key not in UNTYPED:
                        yield f"{path}/{key} dropped"
                else:
                    yield from differences(value, b[key], f"{path}/{key}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                yield from differences(x, y, f"{path}[{i}]")
        elif a != b:
            yield f"{path}: {a!r} became {b!r}"

    assert list(differences(source, back)) == []
    assert len(back["panels"]) == len(source["panels"])


def test_grafana_interpolation_of_multi_value_and_single_value_variables():
    from dashboard_render import substitute

    expr = 'rate(x{run="$run", group=~"$group"}[$__rate_interval]) / y{g="${group}"}'
    assert substitute(expr, {"run": ["a.b"], "group": ["code", "c++"]}, "1m") == \
        'rate(x{run="a.b", group=~"(code|c\\+\\+)"}[1m]) / y{g="(code|c\\+\\+)"}'


def check_live(collector, port: int) -> None:
    """What the live Prometheus records from the Traffic, and answers to the dashboard."""
    def recorded():
        try:
            cross = prom_query(port, 'grokwatch:pathway_distance:mean5m{group="_cross"}')
            ratio = prom_query(port, "grokwatch:agent_messages_dropped:ratio5m")
            cosine = prom_query(port, "grokwatch:pathway_adjacent_cosine:mean5m")
            to_cross = prom_query(port, "grokwatch:pathway_distance_normalized:ratio_to_cross5m")
        except OSError:
            return None
        return cross and ratio and cosine and len(to_cross) == 2

    wait_until(recorded, timeout_s=60, interval_s=0.5)

    rules = [r for g in prom_api(port, "rules")["groups"] for r in g["rules"]]
    assert len(rules) == len(rule_list())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]

    with collector.state.lock:
        stream = collector.state.streams[("run-a", "train")]
        cross = stream.cross.hist["distance"]
        cross_mean = cross.sum / cross.count
        cross_norm = stream.cross.hist["distance_normalized"]
    assert cross_mean > 0
    mean = values(prom_query(port, 'grokwatch:pathway_distance:mean5m{group="_cross"}'))
    assert mean["_cross"] == pytest.approx(cross_mean)
    assert values(prom_query(port, 'grokwatch:pathway_distance_normalized:mean5m{group="_cross"}'))["_cross"] == \
        pytest.approx(cross_norm.sum / cross_norm.count)
    within = values(prom_query(port, 'grokwatch:pathway_distance:mean5m{group!="_cross"}'))
    assert within == {"math": 0.0, "code": 0.0}
    to_cross = values(prom_query(port, "grokwatch:pathway_distance_normalized:ratio_to_cross5m"))
    assert to_cross == {"math": 0.0, "code": 0.0}
    # Negative per-sample means: rate() would have read each fall of the sum as a counter reset. The
    # cross-group baseline has pairs, not samples: no cosine, so no series (not NaN).
    assert values(prom_query(port, "grokwatch:pathway_adjacent_cosine:mean5m")) == \
        pytest.approx({"math": -0.5, "code": -0.5})
    assert values(prom_query(port, "grokwatch:agent_messages_dropped:ratio5m")) == pytest.approx({"run-a": 0.1})
    assert prom_query(port, 'ALERTS{alertname="GrokwatchCollectorDown"}') == []

    dashboard = json.loads(DASHBOARD.read_text())
    filled = set()
    for title, expr in dashboard_targets(dashboard):
        promql = (expr.replace("$run", "run-a").replace("$source", "train").replace("$group", ".*")
                  .replace("$__rate_interval", "1m"))
        if prom_query(port, promql):
            filled.add(title)
    assert FILLED <= filled, FILLED - filled
    # The variables' label_values(metric{...}, label) queries, as Grafana asks Prometheus for them.
    answers = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"]).groups()
        selector = selector.replace("$run", "run-a").replace("$source", "train")
        answers[var["name"]] = prom_api(port, f"label/{label}/values", **{"match[]": selector})
    assert answers == {"run": ["run-a"], "source": ["train"], "group": ["code", "math"]}
