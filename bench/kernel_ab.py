"""The kernel of this checkout against another checkout's, paired in one process: both apply the same
messages, with the same random draws, to two copies of one stream's arrays, alternating which goes
first; the results must be identical. For a change of the kernel's signature or structure.

    python bench/kernel_ab.py --other ../before/collector/kernels.py [--messages 400] [--concentration 0.05] [--samples 64]

``--other`` must be a kernels.py of 1506c78's signature (named tuples without the sample keys: no
Samples.id_N/same_round, Windows.id_GW/step_GW, a three-array Sums); ``git show 1506c78:collector/kernels.py``
makes one. The messages' sample ids never repeat (train source), so excluding a sample's own copies changes
nothing and both kernels must agree exactly: the ratio is the cost of the exclusion checks and the journal's
new sums (pathway length, H(ḡ), layer-wise distances).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _synthetic import routing_message  # noqa: E402

from grokwatch.collector import kernels, pairs, pipeline  # noqa: E402
from grokwatch.collector.config import CollectorConfig  # noqa: E402
from grokwatch.collector.pipeline import MIN_MAX_COSINE  # noqa: E402
from grokwatch.collector.state import State  # noqa: E402
from grokwatch.collector.stream import BOUNDS_RU, NB_R  # noqa: E402

ARRAYS = ("win_sym_GWY", "win_len_GW", "win_starts_GWLp", "win_fp_GW", "win_chars_GWC", "win_chars_len_GW",
          "win_filled_G", "win_next_G", "topk_GWLE", "tokens_GW", "entropy_GWL", "hist_GRUp", "hist_sum_GR",
          "layer_sum_GL", "layer_count_GL", "samples_G", "undefined_G", "latest_step_G", "xhist_RUp",
          "xhist_sum_R", "xlayer_sum_L", "xlayer_count_L", "eligible_G", "win_id_GW", "win_step_GW")
SCRATCH = ("sym_Y", "starts_Lp", "chars_C", "peq_AQ", "pv_Q", "mv_Q", "lpeq_LAQ", "lpv_Q", "lmv_Q")
NEW_SCRATCH = SCRATCH + ("x_layer_sum_L", "x_layer_n_L")


def run_new(a, msg, targets, u, ux, tau, G, sums):
    kernels.process_samples(
        kernels.Samples(msg.mean_probs_NLE, msg.topk_counts_NLE, msg.token_counts_N, msg.entropy_NL, msg.adj_cosine_NJ,
                        True, np.zeros(msg.num_samples, np.float32), False, msg.step, targets, u, ux,
                        kernels.sample_keys(msg.sample_ids), False),
        kernels.Windows(a["win_sym_GWY"], a["win_len_GW"], a["win_starts_GWLp"], a["win_fp_GW"], a["win_chars_GWC"],
                        a["win_chars_len_GW"], a["win_filled_G"][:G], a["win_next_G"], a["topk_GWLE"], a["tokens_GW"],
                        a["entropy_GWL"], a["eligible_G"][:G], a["win_id_GW"], a["win_step_GW"]),
        kernels.Series(a["hist_GRUp"], a["hist_sum_GR"], a["layer_sum_GL"], a["layer_count_GL"], a["samples_G"],
                       a["undefined_G"], a["latest_step_G"]),
        kernels.Distances(a["xhist_RUp"], a["xhist_sum_R"], a["xlayer_sum_L"], a["xlayer_count_L"]),
        kernels.Sums(*sums),
        kernels.Scratch(*(a[k] for k in NEW_SCRATCH)),
        kernels.Params(tau, False, MIN_MAX_COSINE, BOUNDS_RU, NB_R, kernels.SELECT_FIRST),
        pairs.empty_plan(msg.mean_probs_NLE.shape[1]))  # the kernel alone (collector/pairs.py: the same result)


def run_old(old, a, msg, targets, u, ux, tau, G, sums):
    old.process_samples(
        old.Samples(msg.mean_probs_NLE, msg.topk_counts_NLE, msg.token_counts_N, msg.entropy_NL, msg.adj_cosine_NJ,
                    True, np.zeros(msg.num_samples, np.float32), False, msg.step, targets, u, ux),
        old.Windows(a["win_sym_GWY"], a["win_len_GW"], a["win_starts_GWLp"], a["win_fp_GW"], a["win_chars_GWC"],
                    a["win_chars_len_GW"], a["win_filled_G"][:G], a["win_next_G"], a["topk_GWLE"], a["tokens_GW"],
                    a["entropy_GWL"], a["eligible_G"][:G]),
        old.Series(a["hist_GRUp"], a["hist_sum_GR"], a["layer_sum_GL"], a["layer_count_GL"], a["samples_G"],
                   a["undefined_G"], a["latest_step_G"]),
        old.Distances(a["xhist_RUp"], a["xhist_sum_R"], a["xlayer_sum_L"], a["xlayer_count_L"]),
        old.Sums(*sums),
        old.Scratch(*(a[k] for k in SCRATCH)),
        old.Params(tau, False, MIN_MAX_COSINE, BOUNDS_RU, NB_R))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--other", required=True)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--concentration", type=float, default=0.05)
    parser.add_argument("--samples", type=int, default=64, help="per message")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("other_kernels", args.other)
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    rng = np.random.default_rng(0)
    msgs = [routing_message(rng, n=args.samples, concentration=args.concentration, seq=i + 1, step=i)
            for i in range(40)]
    # every replay of a message under ids of its own (a sample is never its own earlier copy here)
    msgs_at = (lambda n: dataclasses.replace(msgs[n % len(msgs)],
                                             sample_ids=tuple(f"r{n}-{i}" for i in range(args.samples))))
    config = CollectorConfig(distance_unit="expert", comparisons_per_sample=16)
    state = State(config)
    for msg in msgs[:8]:  # full windows first
        pipeline.handle(state, msg)
    stream = state.streams[("bench", "train")]
    G, L, E = len(stream.labels), stream.num_layers, stream.num_experts
    copies = {side: {k: copy.deepcopy(getattr(stream, k)) for k in ARRAYS + NEW_SCRATCH} for side in ("old", "new")}
    draws = np.random.default_rng(1)
    m = config.comparisons_per_sample
    spent = {"old": [], "new": []}
    for n in range(args.messages + 2):
        msg = msgs_at(n)
        targets = np.array([[stream.index[g], -1] for g in msg.groups], np.int64)
        u, ux = draws.random((msg.num_samples, 2, m)), draws.random((msg.num_samples, m))
        sums = {"old": (np.zeros((G, len(old.STAT_KEYS))), np.zeros((G, L)), np.zeros((G, L, E))),
                "new": (np.zeros((G, len(kernels.STAT_KEYS))), np.zeros((G, L)), np.zeros((G, L, E)),
                        np.zeros((G, L)), np.zeros((G, L)))}
        for side in (("old", "new") if n % 2 else ("new", "old")):
            t = time.perf_counter()
            if side == "old":
                run_old(old, copies["old"], msg, targets, u, ux, config.pathway_tau, G, sums["old"])
            else:
                run_new(copies["new"], msg, targets, u, ux, config.pathway_tau, G, sums["new"])
            if n >= 2:  # the first two compile or load
                spent[side].append(time.perf_counter() - t)
        np.testing.assert_array_equal(sums["old"][0], sums["new"][0][:, : len(old.STAT_KEYS)])
        for x, y in zip(sums["old"][1:], sums["new"][1:3]):
            np.testing.assert_array_equal(x, y)
    for k in ARRAYS:
        if k not in ("win_id_GW", "win_step_GW"):
            np.testing.assert_array_equal(copies["old"][k], copies["new"][k])
    ratios = [b / a for a, b in zip(spent["old"], spent["new"])]
    print(f"{args.messages} messages of {msgs[0].num_samples} samples, identical results; per message: "
          f"other {statistics.median(spent['old']) * 1e3:.3f} ms, this {statistics.median(spent['new']) * 1e3:.3f} ms "
          f"(medians); this / other per message: median {statistics.median(ratios):.3f}, "
          f"quartiles {np.percentile(ratios, 25):.3f}-{np.percentile(ratios, 75):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
