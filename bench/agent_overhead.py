"""Training step with vs without the agent: paired A/B in one process.

    python bench/agent_overhead.py [--steps 200] [--device cpu|cuda] [--shape tiny|olmoe-1b-7b]
        [--compile-reduction auto|on|off] [--cadences 0,1,1:off,10,10:probe] [--compile BACKEND]
        [--probe-every 20] [--probe-size N] [--probe-fresh N]

One model trains; steps come in pairs, A (agent paused: no hooks at all) and
B (agent attached), ordered AB, BA, AB, ... so that drift (thermal, other
load) and any bias of a pair's first or second step cancel. The agent streams
to a real collector in a subprocess (``--receiver pull``: a bare PULL socket
instead), pinned to the last CPU with training on the others, as a sidecar
with its own CPU would be (``--pin off``: the OS places both). A control with the agent paused in both
steps (A/A) shows what the design can resolve. For the agent summarizing every
step and at its default cadence: the median step time of each, the ratio of
medians, the median of per-pair ratios with its 95 % bootstrap interval, and
the ratio of means (at a cadence
of N the median is an unsampled step; the mean carries the sampled ones at
their true share). ``--cadences`` picks them (default 0,1,10; ``1:off`` is
every step with the reduction op by op, whatever ``--compile-reduction``
says for the others: both ways in one process). ``N:probe`` attaches with the probe on (every
``--probe-every`` steps, ``--probe-size`` remembered training rows and ``--probe-fresh`` fresh documents
through ``probe_fresh``): its rows split the pairs into probe steps and the others, so the probe's extra
forward shows where it runs and nowhere else. B's timed region includes ``mon.step()``, where the probe runs.
``N:nocounts`` attaches with ``expert_counts=False``: beside ``N`` it shows the all-token counts' cost.
``N:groups`` tags every row of B's forwards with one of four groups (``tag(groups=...)`` before each): the
counts split by row group as well.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch
from _proc import free_port

import grokwatch.agent as gw
from grokwatch.agent.config import DEFAULT_EVERY_N_STEPS

PULL_SINK = """
import sys, zmq
sock = zmq.Context().socket(zmq.PULL)
sock.bind(sys.argv[1])
while True:
    sock.recv()
"""


# attach(compile_reduction=...): auto is attach()'s default (compiled on CUDA, op by op on CPU).
COMPILE_REDUCTION = {"auto": None, "on": True, "off": False}

# Per shape: vocabulary, rows per step, tokens per row.
GROUPS = ("math", "code", "chem", "law")  # N:groups: the rows' groups
DIMS = {"tiny": (256, 8, 128), "olmoe-1b-7b": (50304, 2, 4096)}


def make_model(shape: str, device: str, seed: int = 0):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    vocab, batch, seq = DIMS[shape]
    if shape == "tiny":
        cfg = OlmoeConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                          max_position_embeddings=256, pad_token_id=None, bos_token_id=None, eos_token_id=None)
        return OlmoeForCausalLM(cfg).to(device).train(), vocab, batch, seq
    # The OLMoE-1B-7B shape (16 layers, 64 experts, top-8), built on the device in bf16:
    # random init of 7B parameters on the host would take minutes.
    cfg = OlmoeConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                      max_position_embeddings=4096, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    with torch.device(device):
        try:
            model = OlmoeForCausalLM._from_config(cfg, dtype=torch.bfloat16, experts_implementation="grouped_mm")
        except (TypeError, ValueError):  # an older transformers without the kernel switch
            model = OlmoeForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    return model.train(), vocab, batch, seq


def start_receiver(command: list[str], pin: bool = True) -> tuple[subprocess.Popen, Optional[int]]:
    """The receiving process, on the last CPU with this process (training, and the sender thread that
    attach() starts later, inheriting it) on the others, as a sidecar with its own CPU would be; with
    fewer than 2 CPUs or ``pin`` off, the OS places both. Returns the process and its CPU (None: shared)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(cpus) < 2:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), None
    os.sched_setaffinity(0, cpus[:-1])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=lambda: os.sched_setaffinity(0, cpus[-1:]))
    return process, cpus[-1]


def bootstrap_median_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the median: how far the median pair ratio can be trusted
    on a machine whose speed drifts (the control's interval shows the floor)."""
    rng = random.Random(seed)
    n = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def summary(every_n: int, ta: list[float], tb: list[float], stats: dict, peaks=None) -> dict:
    """One cadence's row: medians, ratios (with the pair ratio's interval), the agent's counters, and
    every step time (seconds in, milliseconds out); on CUDA the highest per-step peak of allocated
    memory of each arm (``peaks``: {"A": bytes, "B": bytes} per step)."""
    ma, mb = statistics.median(ta), statistics.median(tb)
    peak = {}
    if peaks and peaks["A"] and peaks["B"]:
        peak = dict(peak_mib_base=max(peaks["A"]) / 2**20, peak_mib_agent=max(peaks["B"]) / 2**20)
    ratios = [b / a for a, b in zip(ta, tb)]
    return dict(every_n=every_n, pairs=len(ta), base_ms=ma * 1e3, agent_ms=mb * 1e3, ratio=mb / ma,
                pair_ratio=statistics.median(ratios), pair_ratio_ci=bootstrap_median_ci(ratios),
                mean_ratio=statistics.fmean(tb) / statistics.fmean(ta), sent=stats["sent"],
                dropped=sum(stats["dropped"].values()), hook_errors=stats["hook_errors"],
                reduction=stats.get("reduction", "-") if every_n else "-",
                reduction_compile_s=stats.get("reduction_compile_s"),
                base_ms_all=[a * 1e3 for a in ta], agent_ms_all=[b * 1e3 for b in tb], **peak)


def timed_step(model, opt, ids, device, peaks: Optional[list] = None, before=None) -> float:
    """One training step's wall time (``before()`` first, inside it: the agent's step call); on CUDA its peak
    allocated memory is appended to ``peaks``."""
    if device == "cuda":
        torch.cuda.synchronize()
        if peaks is not None:
            torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    if before is not None:
        before()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    if device == "cuda" and peaks is not None:
        peaks.append(torch.cuda.max_memory_allocated())
    return elapsed


def run(every_n: int, reduction: str, args, endpoint: str, model, vocab: int, batch: int, seq: int,
        zloss: bool = True, probe: bool = False, counts: bool = True, groups: bool = False) -> dict:
    """Pairs of steps, one with the agent paused (A: no hooks at all) and one
    attached (B), in the order AB, BA, AB, ... so that a bias of the first or
    second step of a pair cancels. ``every_n=0`` is the control: the agent is
    paused in both (A/A), which shows the floor of what the design can resolve."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    probe_kw = dict(probe_every_n_steps=args.probe_every, probe_size=args.probe_size or batch) if probe else {}
    mon = gw.attach(model, endpoint, f"bench-{every_n}{'-probe' if probe else ''}", every_n_steps=max(every_n, 1),
                    max_samples_per_step=batch, compile_reduction=COMPILE_REDUCTION[reduction], router_zloss=zloss,
                    expert_counts=counts, **probe_kw)
    gen = torch.Generator().manual_seed(1)
    if probe and args.probe_fresh:
        mon.probe_fresh([(f"fresh-{i}", "default", torch.randint(0, vocab, (seq,), generator=gen).tolist())
                         for i in range(args.probe_fresh)])
    ta, tb, probe_pair = [], [], []
    peaks: dict[str, list] = {"A": [], "B": []}
    deadline = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            deadline = time.monotonic() + args.max_seconds
        elif deadline is not None and time.monotonic() > deadline:
            break  # a time box for leased devices; the pairs measured so far are reported
        ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(args.device)
        times = {}
        for arm in ("AB" if step % 2 == 0 else "BA"):
            before = None
            if arm == "A" or every_n == 0:
                mon.pause()
            else:
                mon.resume()
                # B's steps are numbered 0, 1, 2, ...: the cadence (and the probe's) applies to them
                if groups:  # every row tagged with one of four groups: the counts split by group too
                    before = lambda s=step: (mon.step(s), mon.tag(groups=[GROUPS[(s + r) % 4]  # noqa: E731
                                                                          for r in range(batch)]))
                else:
                    before = lambda s=step: mon.step(s)  # noqa: E731
            times[arm] = timed_step(model, opt, ids, args.device, peaks[arm] if step >= args.warmup else None,
                                    before)
        if step >= args.warmup:
            ta.append(times["A"])
            tb.append(times["B"])
            probe_pair.append(probe and step % args.probe_every == 0)
    stats = mon.stats()
    mon.close()
    del opt
    row = summary(every_n, ta, tb, stats, peaks)
    if probe:
        for name, keep in (("probe_steps", True), ("other_steps", False)):
            ratios = [b / a for a, b, p in zip(ta, tb, probe_pair) if p == keep]
            row[name] = dict(pairs=len(ratios), pair_ratio=statistics.median(ratios) if ratios else None,
                             pair_ratio_ci=bootstrap_median_ci(ratios) if len(ratios) > 1 else None)
    return row


def run_compiled(every_n: int, reduction: str, args, endpoint: str, vocab: int, batch: int, seq: int) -> dict:
    """The same pairs for ``torch.compile``d training. Compiled code keeps calling the hooks it was
    traced with, so pausing cannot make a hook-free A: two models from the same seed, each compiled,
    the agent attached to B only (``every_n=0``: to neither, the control). Run with dynamo guarding
    on module hooks (not its default; see below)."""
    import torch._dynamo

    torch._dynamo.reset()
    # Two instances of one class share compiled code, and dynamo does not guard on hooks by default:
    # B would run A's code, traced without the agent's hooks. Guarding on hooks gives each its own.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    model_a = make_model(args.shape, args.device)[0]
    model_b = make_model(args.shape, args.device)[0]
    mon = (gw.attach(model_b, endpoint, f"bench-compiled-{every_n}", every_n_steps=every_n, max_samples_per_step=batch,
                     compile_reduction=COMPILE_REDUCTION[reduction])
           if every_n else None)
    arms = {"A": (torch.compile(model_a, backend=args.compile), torch.optim.AdamW(model_a.parameters(), lr=1e-5)),
            "B": (torch.compile(model_b, backend=args.compile), torch.optim.AdamW(model_b.parameters(), lr=1e-5))}
    gen = torch.Generator().manual_seed(1)
    ta, tb = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(args.device)
        times = {}
        for arm in ("AB" if step % 2 == 0 else "BA"):
            if arm == "B" and mon is not None:
                mon.step(step)
            times[arm] = timed_step(*arms[arm], ids, args.device)
        if step >= args.warmup:
            ta.append(times["A"])
            tb.append(times["B"])
    stats = mon.stats() if mon is not None else dict(sent=0, dropped={}, hook_errors=0)
    if mon is not None:
        mon.close()
    return summary(every_n, ta, tb, stats)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="tiny", choices=["tiny", "olmoe-1b-7b"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (the collector gets a core)")
    parser.add_argument("--receiver", choices=["collector", "pull"], default="collector",
                        help="collector: the real collector (its CPU counts where it shares a core with training); "
                             "pull: a bare PULL socket, for the agent's own cost")
    parser.add_argument("--pin", choices=["on", "off"], default="on",
                        help="on: the collector runs on the last CPU and training (with the agent's sender thread) "
                             "on the others, as a sidecar with its own CPU would; off: the OS places both")
    parser.add_argument("--batch", type=int, help="rows per step (default: the shape's)")
    parser.add_argument("--seq", type=int, help="tokens per row (default: the shape's)")
    parser.add_argument("--max-seconds", type=float,
                        help="stop measuring a cadence after this (default: 75 on CUDA, so that the default "
                             "three cadences run unattended in under 5 minutes; else no limit)")
    parser.add_argument("--json", help="also write every step time and the summary here")
    parser.add_argument("--compile", metavar="BACKEND",
                        help="torch.compile both arms with this backend (inductor, aot_eager, ...): two models")
    parser.add_argument("--probe-every", type=int, default=20, help="N:probe cadences: probe_every_n_steps")
    parser.add_argument("--probe-size", type=int, default=0, help="N:probe: probe_size (default: the batch)")
    parser.add_argument("--probe-fresh", type=int, default=8, help="N:probe: fresh documents (probe_fresh)")
    parser.add_argument("--compile-reduction", choices=sorted(COMPILE_REDUCTION), default="auto",
                        help="the agent's batched reduction through torch.compile (auto: on CUDA only)")
    parser.add_argument("--cadences", default=f"0,1,{DEFAULT_EVERY_N_STEPS}",
                        help="comma-separated every_n_steps to measure (0: the A/A control); N:on or N:off "
                             "overrides --compile-reduction for that one (e.g. 0,1,1:off,10); N:nozloss attaches "
                             "with router_zloss=False (the z-loss's cost: 1,1:nozloss,10,10:nozloss); N:probe turns "
                             "the probe on (--probe-every, --probe-size, --probe-fresh); N:nocounts attaches with "
                             "expert_counts=False (the all-token counts' cost: 1,1:nocounts,10,10:nocounts)")
    args = parser.parse_args()
    if args.max_seconds is None:
        args.max_seconds = 75.0 if args.device == "cuda" else float("inf")
    cadences = []
    for spec in args.cadences.split(","):
        n, *flags = spec.split(":")
        zloss, probe, counts = "nozloss" not in flags, "probe" in flags, "nocounts" not in flags
        groups = "groups" in flags
        flags = [f for f in flags if f not in ("nozloss", "probe", "nocounts", "groups")]
        reduction = flags[0] if flags else args.compile_reduction
        if reduction not in COMPILE_REDUCTION or len(flags) > 1:
            parser.error(f"--cadences: {spec!r}: the reduction is one of {sorted(COMPILE_REDUCTION)}")
        if probe and (args.compile or int(n) == 0):
            parser.error(f"--cadences: {spec!r}: the probe needs the agent on (N > 0) and no --compile")
        cadences.append((int(n), reduction, zloss, probe, counts, groups))
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    if args.receiver == "collector":
        command = [sys.executable, "-m", "grokwatch.cli", "collector", "--listen", endpoint, "--metrics-port", "0",
                   "--metrics-addr", "127.0.0.1"]
    else:  # a bare PULL socket that receives and discards: the agent's own cost, nothing of the collector's
        command = [sys.executable, "-c", PULL_SINK, endpoint]
    collector, receiver_cpu = start_receiver(command, pin=args.pin == "on")
    try:
        time.sleep(3)
        # Under --compile each cadence builds and compiles its own two models.
        model = None if args.compile else make_model(args.shape, args.device)[0]
        vocab, batch, seq = DIMS[args.shape]
        batch, seq = args.batch or batch, args.seq or seq
        info = dict(device=args.device, shape=args.shape, steps=args.steps, warmup=args.warmup, batch=batch, seq=seq,
                    torch=torch.__version__, receiver=args.receiver,
                    receiver_cpu="shared" if receiver_cpu is None else receiver_cpu, compile=args.compile or "off",
                    compile_reduction=args.compile_reduction)
        if args.device == "cuda":
            info["gpu"] = torch.cuda.get_device_name()
        print(" ".join(f"{k}={v}" for k, v in info.items()), "(paired, alternating)")
        print(f"{'cadence':<22} {'pairs':>5} {'base ms':>9} {'agent ms':>9} {'median ratio':>12} {'pair ratio':>11} "
              f"{'95% CI':>15} {'mean ratio':>11} {'sent':>6} {'dropped':>8}  reduction")
        results = []
        for every_n, reduction, zloss, probe, counts, groups in cadences:
            r = (run_compiled(every_n, reduction, args, endpoint, vocab, batch, seq) if args.compile
                 else run(every_n, reduction, args, endpoint, model, vocab, batch, seq, zloss, probe, counts, groups))
            r["zloss"], r["probe"], r["expert_counts"], r["groups"] = zloss, probe, counts, groups
            results.append(r)
            label = {0: "control (A/A)", 1: "every step", DEFAULT_EVERY_N_STEPS: f"every {every_n} (default)"}.get(
                every_n, f"every {every_n}") + ("" if zloss else ", no z-loss") + ("" if counts else ", no counts") + (
                ", groups" if groups else "") + (
                f", probe/{args.probe_every}" if probe else "")
            print(f"{label:<22} {r['pairs']:>5} {r['base_ms']:>9.2f} {r['agent_ms']:>9.2f} {r['ratio']:>12.4f} "
                  f"{r['pair_ratio']:>11.4f} {r['pair_ratio_ci'][0]:>7.4f}-{r['pair_ratio_ci'][1]:<7.4f} "
                  f"{r['mean_ratio']:>11.4f} {r['sent']:>6} {r['dropped']:>8}  {r['reduction']}"
                  + (f" (first call {r['reduction_compile_s']:.1f} s)" if r["reduction_compile_s"] else ""), flush=True)
            for part in ("probe_steps", "other_steps"):
                if part in r and r[part]["pair_ratio"] is not None:
                    ci = r[part]["pair_ratio_ci"] or (math.nan, math.nan)
                    print(f"{'':<22} {part.replace('_', ' ')}: {r[part]['pairs']} pairs, pair ratio "
                          f"{r[part]['pair_ratio']:.4f} ({ci[0]:.4f}-{ci[1]:.4f})", flush=True)
            if "peak_mib_base" in r:
                print(f"{'':<22} peak memory a step: {r['peak_mib_base']:.0f} MiB base, {r['peak_mib_agent']:.0f} "
                      f"MiB with the agent ({r['peak_mib_agent'] - r['peak_mib_base']:+.0f} MiB)", flush=True)
            if args.json:  # after every cadence: a run cut short by a time limit keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(dict(info, results=results), f)
        if any("peak_mib_agent" in r for r in results):
            peak = max(max(r["peak_mib_base"], r["peak_mib_agent"]) for r in results if "peak_mib_agent" in r)
            print(f"peak GPU memory {peak / 2**10:.1f} GiB (the highest step)")
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
