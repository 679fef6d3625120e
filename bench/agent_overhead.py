"""Training step with vs without the agent: paired A/B in one process.

    python bench/agent_overhead.py [--steps 200] [--device cpu|cuda] [--shape tiny|olmoe-1b-7b]

One model trains; steps alternate A (agent paused: no hooks at all) and B
(agent attached), so that drift (thermal, other load) hits both. The agent
streams to a real collector in a subprocess. B's steps are numbered 0, 2, 4,
… Reported: the ratio of median step times, the median of per-pair ratios,
and the ratio of mean step times (at a cadence of N the median is an
unsampled step; the mean carries the sampled ones at their true share). Reported: median step time of
each, the ratio of medians, and the median of per-pair ratios, for the
agent summarizing every step and at its default cadence.
"""

from __future__ import annotations

import argparse
import signal
import socket
import statistics
import subprocess
import sys
import time

import torch

import grokwatch.agent as gw
from grokwatch.agent.monitor import DEFAULT_EVERY_N_STEPS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(shape: str, device: str, seed: int = 0):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    if shape == "tiny":
        cfg = OlmoeConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                          max_position_embeddings=256, pad_token_id=None, bos_token_id=None, eos_token_id=None)
        batch, seq = 8, 128
    else:  # the OLMoE-1B-7B shape (GPU)
        cfg = OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                          num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                          max_position_embeddings=4096, pad_token_id=None, bos_token_id=None, eos_token_id=None)
        batch, seq = 2, 4096
    kwargs = {"experts_implementation": "grouped_mm"} if shape != "tiny" else {}
    model = OlmoeForCausalLM._from_config(cfg, **kwargs) if kwargs else OlmoeForCausalLM(cfg)
    if shape != "tiny":
        model = model.to(torch.bfloat16)
    model = model.to(device).train()
    return model, cfg.vocab_size, batch, seq


def timed_step(model, opt, ids, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def run(every_n: int, args, endpoint: str) -> dict:
    """One model; steps alternate with the agent paused (A) and attached (B)."""
    model, vocab, batch, seq = make_model(args.shape, args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    mon = gw.attach(model, endpoint, f"bench-{every_n}", every_n_steps=every_n, max_samples_per_step=batch)
    gen = torch.Generator().manual_seed(1)
    ta, tb = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(args.device)
        mon.pause()
        a = timed_step(model, opt, ids, args.device)
        mon.resume()
        mon.step(step)  # B's steps are numbered 0, 1, 2, ...: the cadence applies to them
        b = timed_step(model, opt, ids, args.device)
        if step >= args.warmup:
            ta.append(a)
            tb.append(b)
    stats = mon.stats()
    mon.close()
    ma, mb = statistics.median(ta), statistics.median(tb)
    return dict(every_n=every_n, base_ms=ma * 1e3, agent_ms=mb * 1e3, ratio=mb / ma,
                pair_ratio=statistics.median(b / a for a, b in zip(ta, tb)),
                mean_ratio=statistics.fmean(tb) / statistics.fmean(ta), sent=stats["sent"],
                dropped=sum(stats["dropped"].values()))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="tiny", choices=["tiny", "olmoe-1b-7b"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (the collector gets a core)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    collector = subprocess.Popen([sys.executable, "-m", "grokwatch.cli", "collector", "--listen", endpoint,
                                  "--metrics-port", "0", "--metrics-addr", "127.0.0.1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        print(f"device={args.device} shape={args.shape} steps={args.steps} (paired, alternating)")
        print(f"{'cadence':<22} {'base ms':>9} {'agent ms':>9} {'median ratio':>12} {'pair ratio':>11} "
              f"{'mean ratio':>11} {'sent':>6} {'dropped':>8}")
        for every_n in (1, DEFAULT_EVERY_N_STEPS):
            r = run(every_n, args, endpoint)
            label = "every step" if every_n == 1 else f"every {every_n} (default)"
            print(f"{label:<22} {r['base_ms']:>9.2f} {r['agent_ms']:>9.2f} {r['ratio']:>12.4f} {r['pair_ratio']:>11.4f} "
                  f"{r['mean_ratio']:>11.4f} {r['sent']:>6} {r['dropped']:>8}", flush=True)
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
