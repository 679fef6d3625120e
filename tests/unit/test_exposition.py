"""The exact /metrics text of a fixed state, in both formats: what dashboards, rules and scrapers parse.

A change to a name, a label, a bucket bound, a value's formatting or the signed histograms' sums shows
up here as a diff. After an intended change: GROKWATCH_UPDATE_GOLDEN=1 pytest tests/unit/test_exposition.py,
then read the diff of tests/golden/ before committing it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from wire_factories import make_eval, make_heartbeat, make_hello, make_routing

from grokwatch.collector import pipeline
from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.prometheus import make_registry
from grokwatch.collector.state import State

GOLDEN = Path(__file__).parents[1] / "golden"
CLOCK = 1_000_000.0
# Families whose values are measured time, not state: their lines are left out of the comparison.
TIMED = ("grokwatch_collector_processing_seconds", "grokwatch_collector_ingest_lag_seconds")


def fixed_state() -> State:
    state = State(CollectorConfig(window_samples=8, comparisons_per_sample=4, max_groups=4, seed=7),
                  journal=lambda record: None, clock=lambda: CLOCK)
    rng = np.random.default_rng(11)
    messages = [make_hello(num_layers=3, num_experts=4, top_k=2, world_size=2)]
    for seq in range(1, 7):
        msg = make_routing(rng=rng, seq=seq, step=10 * seq, n=3, num_layers=3, num_experts=4, top_k=2,
                           groups=("math", "code", "math"), concentration=0.5,
                           sample_ids=[f"m{seq}-{i}" for i in range(3)])  # new samples each step
        # all-token counts of 10 forwards of 64 tokens (x K = 2 picks); expert 3 of layer 2 dead; rank 0 of 2:
        # an interval closes at the next step
        counts = np.array([[400, 300, 200, 380], [320, 320, 320, 320], [900, 300, 80, 0]], np.uint64) + seq
        counts[2, 3] = 0
        bias = np.linspace(-0.01, 0.01, 12, dtype=np.float32).reshape(3, 4) * seq  # an aux-loss-free router's
        messages.append(dataclasses.replace(msg, expert_tokens_LE=counts, counted_forwards=10, aux_loss=0.5 + seq,
                                            balance_bias_LE=bias))
    messages += [make_eval(seq=7, step=60, scores={"math": 0.25}),
                 make_heartbeat(seq=8, messages_sent=9, messages_dropped={"queue_full": 1})]
    for msg in messages:
        pipeline.handle(state, dataclasses.replace(msg, wall_time=CLOCK))
    return state


def exposition(openmetrics: bool) -> str:
    text = (generate_openmetrics if openmetrics else generate_latest)(make_registry(fixed_state())).decode()
    return "".join(line + "\n" for line in text.splitlines() if not line.split("{")[0].split(" ")[0].startswith(TIMED)
                   and not any(f" {name}" in line for name in TIMED))


@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
def test_the_exposition_of_a_fixed_state_is_exactly_the_golden_text(fmt):
    got = exposition(fmt == "openmetrics")
    path = GOLDEN / f"metrics.{fmt}"
    if os.environ.get("GROKWATCH_UPDATE_GOLDEN"):
        path.write_text(got)
    assert got == path.read_text()
    families = {f.name: f for f in (parse_openmetrics(got) if fmt == "openmetrics" else parse_text(got))}
    # The signed histograms: no _sum, their sum a gauge of its own (negative here), the count in +Inf.
    for name in ("grokwatch_pathway_adjacent_cosine", "grokwatch_pathway_consistency"):
        assert not [s for s in families[name].samples if s.name.endswith(("_sum", "_count"))]
    [signed] = [s.value for s in families["grokwatch_pathway_consistency_sum_signed"].samples
                if s.labels.get("group") == "math"]
    assert signed < 0  # the case OpenMetrics forbids as a histogram's _sum


def test_the_golden_state_is_the_same_on_every_run():
    assert exposition(False) == exposition(False)
