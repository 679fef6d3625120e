"""The benchmark model's training step, dense masked experts against sparse (each expert only its tokens):
paired A/B in one process, the same weights and batch, alternating AB, BA, ...

    python bench/demo_step.py [--steps 20] [--set FIELD=VALUE ...]   # default: ground truth round 2, config A

Prints the median step time of each and the ratio (docs/benchmarks.md). Both compute the same function
(tests/unit/test_demo_model.py); only the time differs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from grokwatch.demo import parse_overrides
from grokwatch.demo.model import GrokMoE, ModelConfig
from grokwatch.demo.train import BenchConfig, answers, build

ROUND2_A = dict(threads=1, route_all_positions=1, equations_per_sample=8, num_experts=16, top_k=2,
                shared_expert_hidden=0, router_scale=8.0, train_fraction=0.4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    cfg = replace(BenchConfig(), **{**ROUND2_A, **parse_overrides(args.set)})
    torch.set_num_threads(cfg.threads)
    data, dense, _, _ = build(replace(cfg, sparse_experts=0))
    sparse = GrokMoE(ModelConfig(**{**dense.cfg.__dict__, "sparse_experts": True}))
    sparse.load_state_dict(dense.state_dict())
    ids = data.samples.ids_NW
    targets = answers(ids)
    times: dict = {"dense": [], "sparse": []}

    def step(name, model):
        t = time.perf_counter()
        loss = F.cross_entropy(model(ids), targets) + cfg.aux_coef * model.aux_loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        times[name].append(time.perf_counter() - t)

    arms = [("dense", dense), ("sparse", sparse)]
    for i in range(args.steps + 2):
        for name, model in arms if i % 2 == 0 else arms[::-1]:
            step(name, model)
    med = {k: statistics.median(v[2:]) for k, v in times.items()}  # the first pair warms up
    print(f"{ids.shape[0]} samples x {ids.shape[1] // 5} equations, {cfg.num_experts} experts top-{cfg.top_k}, "
          f"{cfg.threads} thread(s), {args.steps} pairs (forward + backward)")
    print(f"dense  {med['dense'] * 1e3:8.1f} ms\nsparse {med['sparse'] * 1e3:8.1f} ms\n"
          f"ratio  {med['sparse'] / med['dense']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
