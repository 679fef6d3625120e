"""Round 3's benchmark (issue 28): a real ``OlmoeForCausalLM`` learning ModDocs in mini-batches, with the
pathway metrics computed exactly at every probe step.

    python -m grokwatch.demo.round3 --steps 12000 --seed 0 --log docs/groundtruth/r3-seed0.jsonl

Every block of the model is attention then MoE (the paper's model class, tiny: 4 layers, 8 experts, top-2,
no shared expert); every token of a document is routed. Training: AdamW on mini-batches drawn from the
fixed per-domain pools, loss on the answer tokens only (operands are irreducible noise), plus the model's
own load-balancing loss. Every ``probe_every`` steps one forward over every training and held-out document
gives per domain the training and held-out (swap-clean) accuracy, and on fixed probe sets (``probe_docs``
training and as many fresh documents per domain) every metric of ``probe_metrics`` — one JSON line per
probe step. The pre-registered analysis is ``research/groundtruth_round3.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, cast

import numpy as np
import torch
import torch.nn.functional as F

from grokwatch.demo.moddocs import DOMAINS, EQUATION, ModDocs, make_moddocs
from grokwatch.demo.probe_metrics import checkpoint_metrics


@dataclass(frozen=True, kw_only=True)
class Round3Config:
    domains: tuple[str, ...] = DOMAINS
    p: int = 31
    equations: int = 4
    train_docs: int = 120
    seed: int = 0
    steps: int = 12000
    batch: int = 48
    lr: float = 1e-3
    weight_decay: float = 1.0
    router_weight_decay: float = 0.0  # decayed routers go uniform (docs/groundtruth.md, run G)
    beta2: float = 0.98
    warmup_steps: int = 200
    grad_clip: float = 1.0
    aux_coef: float = 0.001
    # The routers' initial weight scale (OLMoE's initializer_range, 0.02, gives logits of std ≈ 0.2 behind its
    # RMSNorm: near-uniform routing that these runs never leave, pilots r3-pilot*). 0: the model's own init.
    router_init_std: float = 0.0
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    experts: int = 8
    top_k: int = 2
    expert_hidden: int = 128
    probe_every: int = 100
    probe_docs: int = 64  # training and fresh documents per domain in the probe sets
    tau: float = 0.7
    permutations: int = 200
    threads: int = 1
    device: str = "cpu"  # "cuda": research/gpu_groundtruth.sh (the metrics are computed on the host either way)
    checkpoint_every: int = 0  # >0: state dicts into checkpoint_dir (outside git)
    checkpoint_dir: str = ""


def build_model(cfg: Round3Config, vocab_size: int):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    mcfg = OlmoeConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.expert_hidden,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       num_experts=cfg.experts, num_experts_per_tok=cfg.top_k, norm_topk_prob=True,
                       max_position_embeddings=cfg.equations * EQUATION, router_aux_loss_coef=cfg.aux_coef,
                       output_router_logits=True, tie_word_embeddings=False, pad_token_id=None,
                       bos_token_id=None, eos_token_id=None)
    torch.manual_seed(cfg.seed)
    model = OlmoeForCausalLM(mcfg)
    cast(Any, model).to(torch.device(cfg.device))  # (transformers types .to() oddly)
    if cfg.router_init_std > 0:
        with torch.no_grad():
            for w in router_weights(model):
                w.normal_(0.0, cfg.router_init_std)
    try:  # about 5 % faster on this CPU; the default loop is the fallback
        model.set_experts_implementation("grouped_mm")
    except Exception:  # noqa: BLE001 - an older transformers: keep its default
        pass
    return model


def router_weights(model) -> list[torch.Tensor]:
    """Each layer's router weight [E, H] (OlmoeTopKRouter.weight)."""
    return [cast(torch.Tensor, layer.mlp.gate.weight) for layer in model.model.layers]


def build_optimizer(cfg: Round3Config, model):
    """AdamW; the routers decay at ``router_weight_decay`` and the norms' gains not at all (decayed, the
    RMSNorm gains shrink every router's logits alike and routing drifts to uniform in every domain at once:
    pilots r3-pilot3), everything else at ``weight_decay``."""
    router_ids = {id(w) for w in router_weights(model)}
    router = [p for p in model.parameters() if id(p) in router_ids]
    flat = [p for p in model.parameters() if id(p) not in router_ids and p.ndim < 2]
    rest = [p for p in model.parameters() if id(p) not in router_ids and p.ndim >= 2]
    opt = torch.optim.AdamW([{"params": rest}, {"params": router, "weight_decay": cfg.router_weight_decay},
                             {"params": flat, "weight_decay": 0.0}],
                            lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    return opt, sched


def answer_labels(data: ModDocs, ids_NW: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(ids_NW, -100)
    pos = data.answer_positions()
    labels[:, pos] = ids_NW[:, pos]
    return labels


def routing_probs(router_logits_TE: torch.Tensor) -> torch.Tensor:
    """The full routing distribution: transformers' routers hand back raw logits (5.25) or, in some 5.x
    releases, probabilities in that slot (METRICS.md: never a softmax twice)."""
    x = router_logits_TE.float()
    if bool((x >= 0).all()) and bool(torch.allclose(x.sum(-1), torch.ones_like(x[:, 0]), atol=1e-3)):
        return x
    return torch.softmax(x, dim=-1)


@dataclass
class Forward:
    correct_NQ: torch.Tensor  # each answer right
    nll_NQ: torch.Tensor
    g_NLE: np.ndarray  # each document's mean routing per layer
    h_tok_N: np.ndarray  # per-token entropy ÷ log E, mean over tokens and layers


@torch.no_grad()
def evaluate(model, data: ModDocs, ids_NW: torch.Tensor, chunk: int = 512) -> Forward:
    was = model.training
    model.eval()
    pos = data.answer_positions()
    device = next(model.parameters()).device
    correct, nll, g, h = [], [], [], []
    try:
        for start in range(0, ids_NW.shape[0], chunk):
            x = ids_NW[start:start + chunk]
            out = model(x.to(device), output_router_logits=True)
            logits_NQV = out.logits[:, pos - 1].float().cpu()
            target_NQ = x[:, pos]
            correct.append(logits_NQV.argmax(-1) == target_NQ)
            nll.append(F.cross_entropy(logits_NQV.transpose(1, 2), target_NQ, reduction="none"))
            n, w = x.shape
            probs_LNTE = torch.stack([routing_probs(r.cpu()).view(n, w, -1) for r in out.router_logits])
            g.append(probs_LNTE.mean(2).permute(1, 0, 2).numpy().astype(np.float64))
            E = probs_LNTE.shape[-1]
            ent = -(probs_LNTE * probs_LNTE.clamp_min(1e-30).log()).sum(-1) / math.log(E)
            h.append(ent.mean((0, 2)).numpy().astype(np.float64))
    finally:
        model.train(was)
    return Forward(torch.cat(correct), torch.cat(nll), np.concatenate(g), np.concatenate(h))


@dataclass(frozen=True)
class ProbeSets:
    train_idx: torch.Tensor  # rows of data.train
    fresh_idx: torch.Tensor  # rows of data.heldout


def probe_sets(data: ModDocs, per_domain: int, seed: int) -> ProbeSets:
    gen = torch.Generator().manual_seed(10_000 + seed)
    tr, fr = [], []
    for di in range(len(data.domains)):
        for rows, out in ((data.train.domain_N, tr), (data.heldout.domain_N, fr)):
            idx = torch.nonzero(rows == di).flatten()
            if len(idx) < per_domain:
                raise ValueError(f"domain {data.domains[di]}: {len(idx)} documents, {per_domain} wanted a probe set")
            out.append(idx[torch.randperm(len(idx), generator=gen)[:per_domain]])
    return ProbeSets(torch.cat(tr), torch.cat(fr))


def probe(model, data: ModDocs, sets: ProbeSets, cfg: Round3Config, step: int) -> dict:
    """One probe step: accuracies over every document, exact metrics on the probe sets."""
    n_train = data.train.ids_NW.shape[0]
    fw = evaluate(model, data, torch.cat([data.train.ids_NW, data.heldout.ids_NW]))
    tr_correct, ho_correct = fw.correct_NQ[:n_train], fw.correct_NQ[n_train:]
    tr_nll, ho_nll = fw.nll_NQ[:n_train], fw.nll_NQ[n_train:]
    rows = torch.cat([sets.train_idx, n_train + sets.fresh_idx]).numpy()
    domain_N = torch.cat([data.train.domain_N[sets.train_idx], data.heldout.domain_N[sets.fresh_idx]]).numpy()
    fresh_N = np.r_[np.zeros(len(sets.train_idx), bool), np.ones(len(sets.fresh_idx), bool)]
    W_LEH = np.stack([w.detach().float().cpu().numpy() for w in router_weights(model)]).astype(np.float64)
    metrics = checkpoint_metrics(fw.g_NLE[rows], fw.h_tok_N[rows], domain_N, fresh_N, list(data.domains),
                                 tau=cfg.tau, router_W_LEH=W_LEH, seed=cfg.seed * 100_003 + step,
                                 permutations=cfg.permutations)
    for di, name in enumerate(data.domains):
        m = metrics[name]
        tr = data.train.domain_N == di
        ho = data.heldout.domain_N == di
        clean = data.heldout.clean_NQ[ho]
        m["acc_train"] = float(tr_correct[tr].float().mean())
        m["acc_test"] = float(ho_correct[ho][clean].float().mean()) if bool(clean.any()) else math.nan
        m["loss_pool"] = float(tr_nll[tr].mean())
        m["loss_test"] = float(ho_nll[ho].mean())
        m["loss_train"] = float(tr_nll[sets.train_idx[data.train.domain_N[sets.train_idx] == di]].mean())
        m["loss_fresh"] = float(ho_nll[sets.fresh_idx[data.heldout.domain_N[sets.fresh_idx] == di]].mean())
        m["gap"] = m["loss_fresh"] - m["loss_train"]
        # documents whose every answer is right (memorized documents)
        m["docs_memorized"] = float(tr_correct[tr].all(-1).float().mean())
    return metrics


def train(cfg: Round3Config, log_path: Optional[str] = None, echo: bool = True) -> list[dict]:
    torch.set_num_threads(cfg.threads)
    data = make_moddocs(cfg.domains, p=cfg.p, equations=cfg.equations, train_docs=cfg.train_docs, seed=cfg.seed)
    model = build_model(cfg, data.vocab_size)
    model.train()
    opt, sched = build_optimizer(cfg, model)
    sets = probe_sets(data, cfg.probe_docs, cfg.seed)
    gen = torch.Generator().manual_seed(20_000 + cfg.seed)
    pool, pool_domain = data.train.ids_NW, data.train.domain_N
    history: list[dict] = []
    log = open(log_path, "w") if log_path else None
    started = time.perf_counter()
    recent: list[float] = []
    try:
        if log:
            log.write(json.dumps({"config": asdict(cfg), "vocab_size": data.vocab_size,
                                  "train_docs": int(pool.shape[0]), "heldout_docs": int(data.heldout.ids_NW.shape[0]),
                                  "parameters": sum(p.numel() for p in model.parameters())}) + "\n")
        for step in range(cfg.steps + 1):
            if step % cfg.probe_every == 0:
                t0 = time.perf_counter()
                rec: dict[str, Any] = dict(step=step, t=round(t0 - started, 2),
                                           train_loss=float(np.mean(recent)) if recent else None)
                metrics = probe(model, data, sets, cfg, step)
                rec["domains"] = metrics
                rec["probe_s"] = round(time.perf_counter() - t0, 3)
                recent = []
                history.append(rec)
                if log:
                    log.write(json.dumps(rec, allow_nan=True) + "\n")
                    log.flush()
                if echo:
                    print(json.dumps({"step": step, "t": rec["t"], **{
                        d: [round(m["acc_train"], 2), round(m["acc_test"], 2)] for d, m in metrics.items()}}),
                        flush=True)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and cfg.checkpoint_dir:
                os.makedirs(cfg.checkpoint_dir, exist_ok=True)
                torch.save({"config": asdict(cfg), "step": step, "state_dict": model.state_dict()},
                           os.path.join(cfg.checkpoint_dir, f"step-{step:06d}.pt"))
            if step == cfg.steps:
                break
            rows = torch.randint(0, pool.shape[0], (cfg.batch,), generator=gen)
            x = data.redraw_noise(pool[rows], pool_domain[rows], gen)
            out = model(x.to(cfg.device), labels=answer_labels(data, x).to(cfg.device), output_router_logits=True)
            out.loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            recent.append(float(out.loss.detach()))
    finally:
        if log:
            log.close()
    return history


def parse_config(argv=None) -> tuple[Round3Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--log", default=None, help="JSON lines: the config, then one line per probe step")
    parser.add_argument("--quiet", action="store_true")
    for f in fields(Round3Config):
        if f.name == "domains":
            parser.add_argument("--domains", default=None, help="comma-separated, e.g. add,sub,mul,sq,rand,noise")
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(Round3Config)
                 if f.name != "domains" and getattr(args, f.name) is not None}
    if args.domains:
        overrides["domains"] = tuple(args.domains.split(","))
    return Round3Config(**overrides), args


def main(argv=None) -> int:
    cfg, args = parse_config(argv)
    if not args.quiet:
        print(json.dumps(asdict(cfg)), flush=True)
    train(cfg, args.log, echo=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
