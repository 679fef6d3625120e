"""Dashboards and alerts depend on these names, types and label sets: freeze them."""

from __future__ import annotations

import numpy as np
from wire_factories import make_heartbeat, make_hello, make_routing

from grokwatch.collector import pipeline
from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.prometheus import PrometheusCollector
from grokwatch.collector.state import State
from grokwatch.collector.view import SPECS, HistogramValue, SummaryValue, build_view

G = ("run", "source", "group")
GL = ("run", "source", "group", "layer")

FROZEN = {
    "grokwatch_pathway_distance": ("histogram", G),
    "grokwatch_pathway_distance_normalized": ("histogram", G),
    "grokwatch_pathway_consistency": ("histogram", G),
    "grokwatch_pathway_adjacent_cosine": ("histogram", G),
    "grokwatch_probe_loss": ("histogram", G),
    "grokwatch_pathway_consistency_sum_signed": ("gauge", G),
    "grokwatch_pathway_adjacent_cosine_sum_signed": ("gauge", G),
    "grokwatch_pathway_layer_distance": ("summary", GL),
    "grokwatch_pathway_samples_total": ("counter", G),
    "grokwatch_pathway_consistency_undefined_total": ("counter", G),
    "grokwatch_expert_load_imbalance_ratio": ("gauge", GL),
    "grokwatch_expert_load_cv": ("gauge", GL),
    "grokwatch_dead_experts": ("gauge", GL),
    "grokwatch_routing_entropy_ratio": ("gauge", GL),
    "grokwatch_router_zloss": ("gauge", GL),
    "grokwatch_expert_load_share_percentile": ("gauge", GL + ("percentile",)),
    "grokwatch_expert_load_share_std": ("gauge", GL),
    "grokwatch_expert_load_diversity": ("gauge", GL),
    "grokwatch_expert_load_rank_expert": ("gauge", GL + ("end", "rank")),
    "grokwatch_expert_load_rank_share": ("gauge", GL + ("end", "rank")),
    "grokwatch_distinct_pathways": ("gauge", G),
    "grokwatch_memorized_samples": ("gauge", G),
    "grokwatch_group_latest_step": ("gauge", G),
    "grokwatch_group_phase": ("gauge", G + ("phase",)),
    "grokwatch_group_memorized_step": ("gauge", G),
    "grokwatch_group_onset_step": ("gauge", G),
    "grokwatch_group_transfer": ("gauge", G),
    "grokwatch_group_transfer_z": ("gauge", G),
    "grokwatch_group_transfer_js": ("gauge", G),
    "grokwatch_group_transfer_js_z": ("gauge", G),
    "grokwatch_group_fresh_loss_gap": ("gauge", G),
    "grokwatch_router_all_tokens_load_imbalance_ratio": ("gauge", ("run", "layer")),
    "grokwatch_router_all_tokens_load_cv": ("gauge", ("run", "layer")),
    "grokwatch_router_all_tokens_rank_load_imbalance_max": ("gauge", ("run", "layer")),
    "grokwatch_router_all_tokens_dead_experts": ("gauge", ("run", "layer")),
    "grokwatch_router_all_tokens_dropped_pick_fraction": ("gauge", ("run", "layer")),
    "grokwatch_router_all_tokens_group_load_imbalance_ratio": ("gauge", ("run", "group", "layer")),
    "grokwatch_router_all_tokens_group_load_cv": ("gauge", ("run", "group", "layer")),
    "grokwatch_router_all_tokens_group_dead_experts": ("gauge", ("run", "group", "layer")),
    "grokwatch_expert_load_share": ("gauge", ("run", "layer", "expert")),
    "grokwatch_router_aux_loss": ("gauge", ("run",)),
    "grokwatch_router_balance_bias_std": ("gauge", ("run", "layer")),
    "grokwatch_router_balance_bias_drift": ("gauge", ("run", "layer")),
    "grokwatch_router_all_tokens_interval_step": ("gauge", ("run",)),
    "grokwatch_router_all_tokens_interval_ranks": ("gauge", ("run",)),
    "grokwatch_router_routed_tokens_total": ("counter", ("run",)),
    "grokwatch_router_counted_forwards_total": ("counter", ("run",)),
    "grokwatch_run_info": ("gauge", ("run", "distribution", "layers", "experts", "top_k", "agent_version")),
    "grokwatch_routing_entropy_ceiling": ("gauge", ("run",)),
    "grokwatch_train_step": ("gauge", ("run",)),
    "grokwatch_build_info": ("gauge", ("version",)),
    "grokwatch_eval_score": ("gauge", ("run", "group")),
    "grokwatch_eval_step": ("gauge", ("run", "group")),
    "grokwatch_collector_messages_received_total": ("counter", ()),
    "grokwatch_collector_messages_rejected_total": ("counter", ("reason",)),
    "grokwatch_collector_messages_lost_total": ("counter", ()),
    "grokwatch_collector_samples_processed_total": ("counter", ()),
    "grokwatch_collector_queue_size": ("gauge", ()),
    "grokwatch_collector_queue_capacity": ("gauge", ()),
    "grokwatch_collector_queue_bytes": ("gauge", ()),
    "grokwatch_collector_queue_capacity_bytes": ("gauge", ()),
    "grokwatch_collector_processing_seconds": ("summary", ()),
    "grokwatch_collector_ingest_lag_seconds": ("gauge", ()),
    "grokwatch_collector_persist_errors_total": ("counter", ("what",)),
    "grokwatch_collector_scrapes_stale_total": ("counter", ()),
    "grokwatch_collector_stream_reads_stale_total": ("counter", ()),
    "grokwatch_collector_disconnects_total": ("counter", ()),
    "grokwatch_collector_handshake_failures_total": ("counter", ("reason",)),
    "grokwatch_collector_ingest_connections": ("gauge", ()),
    "grokwatch_collector_reduced_precision_messages_total": ("counter", ()),
    "grokwatch_pathway_comparisons_effective": ("gauge", ("run", "source")),
    "grokwatch_collector_loop_errors_total": ("counter", ("thread",)),
    "grokwatch_agent_messages_sent_total": ("counter", ("run", "rank")),
    "grokwatch_agent_messages_dropped_total": ("counter", ("run", "rank", "reason")),
    "grokwatch_agent_hook_errors_total": ("counter", ("run", "rank")),
}


def populated_state():
    state = State(CollectorConfig())
    pipeline.handle(state, make_hello())
    pipeline.handle(state, make_routing(seq=1, source="train"))
    pipeline.handle(state, make_routing(seq=2, source="probe", loss=True, rng=np.random.default_rng(1)))
    pipeline.handle(state, make_heartbeat(seq=3))
    return state


def test_exported_names_types_and_labels_are_frozen():
    assert {"grokwatch_" + spec.name: (spec.kind, spec.labels) for spec in SPECS} == FROZEN  # as declared
    fams = {f.name: (f.kind, f.labels) for f in build_view(populated_state())}
    assert fams == FROZEN  # as rendered


def test_each_sample_holds_the_value_type_of_its_kind():
    """The exporters read histograms and summaries by field: a sample of another type would be a bug."""
    want = {"histogram": HistogramValue, "summary": SummaryValue}
    for fam in build_view(populated_state()):
        for sample in fam.samples:
            assert len(sample.labels) == len(fam.labels), fam.name
            if fam.kind in want:
                assert isinstance(sample.value, want[fam.kind]), fam.name
            else:
                assert not isinstance(sample.value, tuple), fam.name


def test_prometheus_families_carry_the_frozen_label_sets():
    for fam in PrometheusCollector(populated_state()).collect():
        full = fam.name + ("_total" if fam.type == "counter" else "")
        kind, labels = FROZEN[full]
        assert fam.type == kind
        for sample in fam.samples:
            extra = {"le"} if sample.name.endswith("_bucket") else set()
            assert set(sample.labels) == set(labels) | extra, (sample.name, sample.labels)
