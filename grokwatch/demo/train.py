"""The grokking benchmark's training loop (full batch AdamW), with the agent.

    python -m grokwatch.demo.train --steps 3000 --endpoint tcp://127.0.0.1:5557

Every ``eval_every`` steps it computes per-group training accuracy and
held-out accuracy (swap-clean) and sends them with ``log_eval`` — ground truth
for the report, never an input of the metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from grokwatch.demo.data import Dataset, make_dataset
from grokwatch.demo.model import GrokMoE, ModelConfig, answer_loss, answers


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    # "rand": random labels, the negative control in every run (memorized, never generalized).
    groups: tuple[str, ...] = ("add", "sub", "div", "rand")
    p: int = 59
    train_fraction: float = 0.3
    steps: int = 3000
    lr: float = 2e-3
    weight_decay: float = 3.0
    # Weight decay on the router drives its weights to zero and routing to uniform (docs/groundtruth.md).
    router_weight_decay: Optional[float] = 0.0  # None: same as weight_decay
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100
    grad_clip: float = 1.0  # >0: clip the gradient norm (Adam's loss spikes otherwise, runs E-L)
    aux_coef: float = 0.001
    eval_every: int = 25
    seed: int = 0
    threads: int = 2
    hidden: int = 128
    num_moe_layers: int = 3
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 32
    shared_expert_hidden: int = 256
    norm: int = 1  # 1: RMSNorm before each MoE block (see model.py)
    route_all_positions: int = 0  # 1: all four positions through the MoE blocks (see model.py)
    equations_per_sample: int = 1  # k > 1: a sample is k equations of one group (needs route_all_positions)
    router_scale: float = 1.0  # router logits x this (peaked routing, see model.py)
    sparse_experts: int = 0  # 1: each expert computes only its routed tokens (faster when K/E is small)
    # Agent cadence
    every_n_steps: int = 5
    samples_per_step: int = 48
    probe_every_n_steps: int = 25
    probe_size_per_group: int = 32
    save_every: int = 0  # >0: write checkpoints (for grokwatch replay) into checkpoint_dir
    checkpoint_dir: str = ""


@torch.no_grad()
def accuracy(model, data: Dataset, monitor=None) -> dict[str, float]:
    was = model.training
    model.eval()
    saved, model.monitor = model.monitor, None  # evaluation is not summarized
    out = {}
    try:
        for name, split in (("train", data.train), ("test", data.test)):
            pred = model(split.ids_B5).argmax(-1)
            right = pred == split.ids_B5[:, 4]
            for g, op in enumerate(data.groups):
                mask = split.group_B == g
                if name == "test":
                    mask &= split.clean_B
                key = op if name == "test" else f"{op}/train"
                out[key] = float(right[mask].float().mean()) if mask.any() else float("nan")
    finally:
        model.monitor = saved
        model.train(was)
    return out


def save_checkpoint(model: GrokMoE, step: int, directory: str) -> str:
    """A checkpoint ``grokwatch replay`` can load (factory + config + weights)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"step-{step:06d}.pt")
    torch.save({"factory": "grokwatch.demo.model:from_config", "config": asdict(model.cfg),
                "state_dict": model.state_dict(), "step": step}, path)
    return path


def write_samples(data: Dataset, path: str, per_group: int, seed: int = 0) -> None:
    """A replay sample set: training samples, ``per_group`` of each group."""
    gen = torch.Generator().manual_seed(seed)
    with open(path, "w") as fh:
        for g, op in enumerate(data.groups):
            rows = torch.nonzero(data.samples.group_N == g).flatten()
            for r in rows[torch.randperm(len(rows), generator=gen)[:per_group]].tolist():
                fh.write(json.dumps({"id": data.samples.sample_ids[r], "group": op,
                                     "input_ids": data.samples.ids_NW[r].tolist()}) + "\n")


def fresh_documents(data: Dataset, per_group: int, k: int = 1) -> list[tuple[str, str, list[int]]]:
    """The held-back slice the probe routes as fresh documents (METRICS.md §6): ``per_group`` samples of k
    held-out equations per group, never trained on, as (id, group, token ids)."""
    out = []
    for g, op in enumerate(data.groups):
        rows = torch.nonzero(data.test.group_B == g).flatten()[: per_group * k]
        for j in range(len(rows) // k):
            ids = data.test.ids_B5[rows[j * k:(j + 1) * k]].reshape(-1).tolist()
            out.append((f"{op}:fresh{j}", op, ids))
    return out


def build(cfg: BenchConfig):
    torch.manual_seed(cfg.seed)
    if cfg.equations_per_sample > 1 and not cfg.route_all_positions:
        raise ValueError("equations_per_sample > 1 needs route_all_positions=1 (every position routed)")
    data = make_dataset(list(cfg.groups), cfg.p, cfg.train_fraction, cfg.seed, cfg.equations_per_sample)
    mcfg = ModelConfig(vocab_size=data.vocab_size, num_outputs=cfg.p, hidden=cfg.hidden,
                       num_moe_layers=cfg.num_moe_layers, num_experts=cfg.num_experts, top_k=cfg.top_k,
                       expert_hidden=cfg.expert_hidden, shared_expert_hidden=cfg.shared_expert_hidden,
                       norm=bool(cfg.norm), route_all_positions=bool(cfg.route_all_positions),
                       router_scale=cfg.router_scale, sparse_experts=bool(cfg.sparse_experts))
    model = GrokMoE(mcfg)
    router = [p for n, p in model.named_parameters() if ".router." in n]
    rest = [p for n, p in model.named_parameters() if ".router." not in n]
    rwd = cfg.weight_decay if cfg.router_weight_decay is None else cfg.router_weight_decay
    opt = torch.optim.AdamW([{"params": rest}, {"params": router, "weight_decay": rwd}], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    return data, model, opt, sched


def train(cfg: BenchConfig, *, endpoint: Optional[str] = None, run: str = "grokking",
          on_eval: Optional[Callable[[int, dict], None]] = None, log_path: Optional[str] = None) -> list[dict]:
    """Train; with ``endpoint`` the agent streams to a collector there."""
    torch.set_num_threads(cfg.threads)
    data, model, opt, sched = build(cfg)
    mon = None
    if endpoint:
        import grokwatch.agent as gw

        mon = gw.attach(model, endpoint, run, num_layers=cfg.num_moe_layers, num_experts=cfg.num_experts,
                        top_k=cfg.top_k, every_n_steps=cfg.every_n_steps,
                        max_samples_per_step=cfg.samples_per_step,
                        probe_every_n_steps=cfg.probe_every_n_steps,
                        probe_size=cfg.probe_size_per_group * len(cfg.groups), probe_fn=answer_loss,
                        max_docs_per_sample=1)
        model.monitor = mon
        mon.probe_fresh(fresh_documents(data, cfg.probe_size_per_group, cfg.equations_per_sample))
    ids, sids = data.samples.ids_NW, data.samples.sample_ids
    groups = [cfg.groups[g] for g in data.samples.group_N.tolist()]
    targets = answers(ids)
    k = ids.shape[1] // 5 if ids.shape[1] > 5 else 1
    history = []
    log = open(log_path, "w") if log_path else None
    started = time.perf_counter()
    try:
        for step in range(cfg.steps + 1):
            if step % cfg.eval_every == 0:
                acc = accuracy(model, data)
                record = dict(step=step, t=time.perf_counter() - started, **acc)
                history.append(record)
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if mon is not None:
                    mon.log_eval(step, acc)
                if on_eval:
                    on_eval(step, record)
            if cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint(model, step, cfg.checkpoint_dir)
            if step == cfg.steps:
                break
            if mon is not None:
                mon.step(step)
                mon.tag(sids, groups)
            logits = model(ids)
            loss_B = F.cross_entropy(logits, targets, reduction="none").view(ids.shape[0], k).mean(1)
            assert model.aux_loss is not None  # set by the forward
            loss = loss_B.mean() + cfg.aux_coef * model.aux_loss
            if mon is not None:  # the train source's loss evidence, per group of the tagged rows (sampled steps)
                mon.step(step, loss=loss_B)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    finally:
        if mon is not None:
            mon.close()
        if log:
            log.close()
    return history


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "The grokwatch demo").splitlines()[0])
    parser.add_argument("--endpoint", default=None)
    parser.add_argument("--run", default="grokking")
    parser.add_argument("--log", default=None, help="write eval points as JSON lines here")
    for f in BenchConfig.__dataclass_fields__.values():
        if f.type in ("int", "float", "Optional[float]", "str"):
            parser.add_argument("--" + f.name.replace("_", "-"), type={"int": int, "str": str}.get(f.type, float),
                                default=None)
    parser.add_argument("--groups", default=None, help="comma-separated operations, e.g. add,sub,div")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k in BenchConfig.__dataclass_fields__}
    if args.groups:
        overrides["groups"] = tuple(args.groups.split(","))
    cfg = BenchConfig(**overrides)
    print(json.dumps(asdict(cfg)), flush=True)

    def show(step, rec):
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) and math.isfinite(v) else v)
                          for k, v in rec.items()}), flush=True)

    train(cfg, endpoint=args.endpoint, run=args.run, on_eval=show, log_path=args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
