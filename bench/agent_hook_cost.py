"""Where a sampled step's agent time goes, on the training thread.

    python bench/agent_hook_cost.py [--steps 200] [--device cpu|cuda] [--shape tiny|olmoe-1b-7b]
        [--compile-reduction auto|on|off]

The tiny OLMoE of agent_overhead.py (or, on a GPU, its OLMoE-1B-7B shape,
where every microsecond of host time in a hook lands on the step because the
model synchronizes inside each MoE layer) trains with the agent summarizing
every step (8 samples, or the shape's rows); each agent entry point that runs
on the training thread is wrapped with a timer: the top-level pre-hook
(``start``: sampling, slot layout, arming the layer hooks), the router hooks
(``router hooks``, of which ``gather_layer``), and the top-level post-hook
(``end``: of which ``reduce_all``, the batched reduction, whose
``summaries`` are its stacks, math and writes, and ``submit``, the hand-over
to the sender thread).
Printed as microseconds per sampled step, beside the step's median time.
The sender thread's CPU time per message (``time.thread_time`` around its
``_process``: building, encoding and sending one message) is printed below:
on a machine whose training shares its core with the sender, it adds to the
step too. A diagnostic: the A/B ratio is agent_overhead.py's job.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grokwatch.agent.capture as capture_module  # noqa: E402
import grokwatch.agent.summaries as summaries_module  # noqa: E402
import grokwatch.agent.reduce as reduce_module  # noqa: E402
from agent_overhead import COMPILE_REDUCTION, PULL_SINK, free_port, make_model, start_receiver  # noqa: E402

import grokwatch.agent as gw  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="tiny", choices=["tiny", "olmoe-1b-7b"])
    parser.add_argument("--compile-reduction", choices=sorted(COMPILE_REDUCTION), default="auto",
                        help="the agent's batched reduction through torch.compile (auto: on CUDA only)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    cuda = args.device == "cuda"
    spent: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    C = capture_module.Capture
    C._forward_start = timed("start (pre-hook)", C._forward_start)
    C._forward_end = timed("end (post-hook)", C._forward_end)
    summaries_module.reduce_all = timed("  of which reduce_all", summaries_module.reduce_all)
    reduce_module._reduce_batch = timed("    summaries", reduce_module._reduce_batch)
    capture_module.gather_layer = timed("  of which gather_layer", capture_module.gather_layer)
    sender_module = sys.modules["grokwatch.agent.sender"]
    sender_module.Sender.submit = timed("  of which submit", sender_module.Sender.submit)
    C.disarm = timed("  of which disarm", C.disarm)
    process = sender_module.Sender._process
    sender_cpu = [0.0, 0]

    def process_timed(self, item):
        t = time.thread_time()
        try:
            return process(self, item)
        finally:
            if isinstance(item, sender_module.Pending):
                sender_cpu[0] += time.thread_time() - t
                sender_cpu[1] += 1
    sender_module.Sender._process = process_timed
    router_hook = C._router_hook
    C._router_hook = lambda self, index: timed("router hooks", router_hook(self, index))

    model, vocab, batch, seq = make_model(args.shape, args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    # A bare PULL socket on the last CPU receives (as in agent_overhead.py); training and the sender on the others.
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sink, _ = start_receiver([sys.executable, "-c", PULL_SINK, endpoint])
    mon = gw.attach(model, endpoint, "hook-cost", every_n_steps=1, max_samples_per_step=batch,
                    compile_reduction=COMPILE_REDUCTION[args.compile_reduction])
    gen = torch.Generator().manual_seed(1)
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            spent.clear()
            sender_cpu[:] = [0.0, 0]
        ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(args.device)
        mon.step(step)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    reduction = mon.stats()["reduction"]
    mon.close()
    sink.kill()
    sink.wait()
    print(f"median step {statistics.median(times) * 1e3:.2f} ms over {args.steps} sampled steps "
          f"({args.shape} OLMoE on {args.device}, batch {batch} x {seq}, {batch} samples, torch {torch.__version__}; "
          f"reduction {reduction})")
    for name in ("start (pre-hook)", "router hooks", "  of which gather_layer", "end (post-hook)",
                 "  of which disarm", "  of which reduce_all", "    summaries", "  of which submit"):
        print(f"{name:<26} {spent.get(name, 0.0) / args.steps * 1e6:8.1f} us/step")
    total = sum(v for k, v in spent.items() if not k.startswith("  "))
    print(f"{'total on the training thread':<26} {total / args.steps * 1e6:8.1f} us/step "
          f"({total / sum(times) * 100:.2f} % of the step)")
    per_message = sender_cpu[0] / max(sender_cpu[1], 1)
    print(f"{'sender thread CPU':<26} {per_message * 1e6:8.1f} us/message ({sender_cpu[1]} messages, "
          f"dropped {sum(mon.stats()['dropped'].values())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
