"""The batched reduction's transient memory, op by op and compiled.

    python bench/reduction_memory.py [--device cpu|cuda] [--layers 16] [--rows 8] [--seq 4096]
        [--experts 64] [--no-compiled]

Runs ``reduce.summarize`` on router logits stacked as the agent stacks them ([L, M, S, E], float32,
the CPU op-by-op layout [L, M, E, S] too) and reads the peak memory around each call: on CPU the
process's peak resident memory (Linux: /proc/self/clear_refs resets VmHWM; large tensors are
mmap'd, so freed memory leaves the resident set), on CUDA the allocator's peak. Printed in
multiples of one float32 copy of the stacked logits — what
reduce.TRANSIENT_COPIES_* estimate, plus the stack itself, to bound each batch by
``attach(reduction_memory_mb=...)``.
"""

from __future__ import annotations

import argparse
import functools
import re

import torch

import grokwatch.agent.reduce as reduce_module


def resident() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def peak() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def transient(fn, *args) -> int:
    """The most memory one call holds beyond what was allocated before it (best of three)."""
    cuda = args[0].is_cuda
    best = None
    for _ in range(3):
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            before = resident()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak
        out = fn(*args)
        if cuda:
            torch.cuda.synchronize()
        grown = (torch.cuda.max_memory_allocated() if cuda else peak()) - before
        del out
        best = grown if best is None else min(best, grown)
    return best


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--no-compiled", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L, M, S, E, K = args.layers, args.rows, args.seq, args.experts, args.top_k
    copy = L * M * S * E * 4
    with torch.device(args.device):
        x_LMSE = torch.randn(L, M, S, E)
        idx = torch.randint(0, E, (L, M, S, K))
        avg = torch.full((M, S), 1.0 / S)
        weight = torch.ones(L, M, S * K)
        router_weights = torch.randn(L, E, 256)
    fixed = dict(distribution="softmax", detect_probs=False, packed=False, top_k=K, num_slots=M)
    print(f"stacked logits [L={L}, M={M}, S={S}, E={E}] float32: {copy / 2**20:.0f} MiB (one copy); "
          f"torch {torch.__version__}, {args.device}")
    if args.device == "cpu" and copy < 64 * 2**20:
        print("(on CPU the resident set only sees mmap'd allocations, tens of MiB and up: use a larger shape)")
    cases = [("op by op, experts last [L, M, S, E]", -1, False),
             ("op by op, experts at -2 [L, M, E, S] (CPU)", -2, False)]
    if not args.no_compiled:
        cases.append((f"compiled (inductor, {'Triton' if args.device == 'cuda' else 'C++'}), experts last", -1, True))
    with torch.inference_mode():
        for name, dim, compiled in cases:
            x = x_LMSE if dim == -1 else x_LMSE.transpose(-1, -2).contiguous()
            fn = functools.partial(reduce_module.summarize, dim=dim, **fixed)
            if compiled:
                fn = torch.compile(fn, fullgraph=True)
                fn(x, idx, avg, weight, None, router_weights, None)  # compile first
            grown = transient(fn, x, idx, avg, weight, None, router_weights, None)
            print(f"{name:<44} {grown / 2**20:8.0f} MiB = {grown / copy:.2f} copies")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
