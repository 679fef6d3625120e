"""The collector at its rated load: 64 agents x 10 messages/s x 8 samples, OLMoE shape, peaked routing.

    python bench/rated_load.py [--minutes 10] [--agents 64] [--rate 10] [--samples 8] [--kernel-workers 2]
                               [--scrapers 50]

A real collector process (`grokwatch collector`, state dir on disk: write-ahead log, journal, snapshots
every 30 s) and 64 ZeroMQ PUSH sockets in this process, one per rank of one 64-rank job, each with its
own sender id and sequence numbers, as the agents would. All ranks send each step (10 steps/s) in a
shuffled order, so a step's summaries arrive interleaved with the next one's. Every 0.5 s /metrics is
read: received, processed, lost, rejected, queue, ingest lag (receive minus send time of the latest
message); the collector's RSS every 10 s. Prints the figures docs/benchmarks.md records.

``--scrapers N`` adds N concurrent /metrics clients in a separate process, each scraping every
``--scrape-interval`` seconds (default 1; 0: again as soon as its last scrape is answered, the worst case;
Prometheus scrapes every 15 s), for the whole run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(__file__))
from _proc import free_port, rss_mb  # noqa: E402
from _synthetic import routing_message  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from grokwatch.wire import Heartbeat, Hello, encode  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def read_metrics(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


SCRAPERS = """
import signal, sys, threading, urllib.request
import time
port, n, every = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
done, failed, stop = [0] * n, [0] * n, threading.Event()
def loop(i):
    stop.wait(every * i / n)  # spread over the interval
    while not stop.is_set():
        began = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                r.read()
            done[i] += 1
        except OSError:
            failed[i] += 1
        stop.wait(max(0.0, every - (time.monotonic() - began)))
signal.signal(signal.SIGTERM, lambda *a: stop.set())
threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(n)]
for t in threads:
    t.start()
stop.wait()
print(f"{sum(done)} scrapes served, {sum(failed)} failed")
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--agents", type=int, default=64)
    ap.add_argument("--rate", type=float, default=10.0, help="messages per second per agent (= steps/s)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--kernel-workers", type=int, default=2)
    ap.add_argument("--concentration", type=float, default=0.05, help="Dirichlet: 0.05 peaked (the paper's OLMoE)")
    ap.add_argument("--scrapers", type=int, default=0, help="concurrent /metrics clients")
    ap.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between a client's scrapes (0: none)")
    args = ap.parse_args()

    state = tempfile.mkdtemp(prefix="gw-rated-")
    ingest, mport = free_port(), free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "grokwatch")
    env = dict(os.environ, GROKWATCH_KERNEL_WORKERS=str(args.kernel_workers))
    proc = subprocess.Popen([exe, "collector", "--listen", f"tcp://127.0.0.1:{ingest}", "--metrics-port", str(mport),
                             "--metrics-addr", "127.0.0.1", "--state-dir", state], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            print("collector did not become ready", file=sys.stderr)
            proc.kill()
            return 1
        time.sleep(0.2)

    scrapers = None
    if args.scrapers:
        scrapers = subprocess.Popen([sys.executable, "-c", SCRAPERS, str(mport), str(args.scrapers),
                                     str(args.scrape_interval)],
                                    stdout=subprocess.PIPE, text=True)
    rng = np.random.default_rng(0)
    pool = [routing_message(rng, n=args.samples, concentration=args.concentration, seq=i) for i in range(64)]
    ctx = zmq.Context()
    socks = []
    for r in range(args.agents):
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 2000)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.connect(f"tcp://127.0.0.1:{ingest}")
        socks.append(s)
    seqs = [0] * args.agents
    run = "rated"

    def send(r: int, msg) -> None:
        socks[r].send(encode(msg), copy=False)
        seqs[r] += 1

    def hello(r: int) -> Hello:
        return Hello(run=run, rank=r, sender=f"rank{r}", seq=seqs[r], wall_time=time.time(), world_size=args.agents,
                     host="bench", agent_version="bench", num_layers=16, num_experts=64, top_k=8,
                     distribution="softmax", has_cosines=True, layer_names=None)

    for r in range(args.agents):
        send(r, hello(r))
    time.sleep(0.5)
    import dataclasses

    period = 1.0 / args.rate
    started = time.monotonic()
    end = started + args.minutes * 60
    step, sent_routing, next_read, next_rss = 0, 0, started, started
    lags, lag_times, queue_sizes, rss, reads, effective = [], [], [], [], [], []
    shuffle = random.Random(1)
    while time.monotonic() < end:
        step += 1
        order = list(range(args.agents))
        shuffle.shuffle(order)
        for r in order:
            base = pool[(step + r) % len(pool)]
            ids = tuple(f"r{r}-s{step}-{i}" for i in range(args.samples))
            send(r, dataclasses.replace(base, run=run, rank=r, sender=f"rank{r}", seq=seqs[r], step=step,
                                        wall_time=time.time(), sample_ids=ids))
            sent_routing += 1
        if step % int(10 * args.rate) == 0:  # every 10 s, like the agent: hello then heartbeat
            for r in range(args.agents):
                send(r, hello(r))
                send(r, Heartbeat(run=run, rank=r, sender=f"rank{r}", seq=seqs[r], wall_time=time.time(),
                                  messages_sent=seqs[r] + 1, messages_dropped={}, hook_errors=0, disabled=False))
        now = time.monotonic()
        if now >= next_read:
            next_read = now + 0.5
            m = read_metrics(mport)
            lags.append(m["grokwatch_collector_ingest_lag_seconds"])
            lag_times.append(now - started)
            queue_sizes.append(m["grokwatch_collector_queue_size"])
            ms = [v for k, v in m.items() if k.startswith("grokwatch_pathway_comparisons_effective{")]
            if ms:
                effective.append(min(ms))
            reads.append((now - started, m))
        if now >= next_rss:
            next_rss = now + 10
            rss.append((now - started, rss_mb(proc.pid)))
        wait = started + step * period - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    elapsed = time.monotonic() - started
    total_sent = sum(seqs)
    # Let the collector catch up, then read the final counters.
    settle = time.monotonic() + 60
    while time.monotonic() < settle:
        m = read_metrics(mport)
        if m["grokwatch_collector_messages_received_total"] >= total_sent and m["grokwatch_collector_queue_size"] == 0:
            break
        time.sleep(0.5)
    time.sleep(1.0)
    m = read_metrics(mport)
    scraped = ""
    if scrapers is not None:
        scrapers.terminate()
        scraped = (scrapers.communicate(timeout=30)[0] or "").strip()
    rss.append((time.monotonic() - started, rss_mb(proc.pid)))
    for s in socks:
        s.close()
    ctx.term()
    proc.terminate()
    proc.wait(30)
    shutil.rmtree(state, ignore_errors=True)

    rejected = {k: v for k, v in m.items() if k.startswith("grokwatch_collector_messages_rejected_total") and v}
    lag = np.array(lags)
    print(f"agents {args.agents} x {args.rate:g} msg/s x {args.samples} samples, {args.minutes:g} min "
          f"({elapsed:.0f} s), kernel_workers {args.kernel_workers}, concentration {args.concentration}")
    if scrapers is not None:
        print(f"scrapers {args.scrapers} (every {args.scrape_interval:g} s): {scraped}")
    print(f"offered: {sent_routing / elapsed:.1f} routing msg/s = {sent_routing * args.samples / elapsed:.0f} samples/s")
    print(f"sent {total_sent}  received {m['grokwatch_collector_messages_received_total']:.0f}  "
          f"lost {m['grokwatch_collector_messages_lost_total']:.0f}  rejected {rejected or 0}")
    print(f"routing sent {sent_routing}  samples processed {m['grokwatch_collector_samples_processed_total']:.0f} "
          f"(expected {sent_routing * args.samples})")
    reduced = m.get("grokwatch_collector_reduced_precision_messages_total", 0.0)
    print(f"reduced precision (pairs per sample lowered while behind): {reduced:.0f} of {sent_routing} routing "
          f"messages ({100 * reduced / max(sent_routing, 1):.1f} %)")
    if effective:
        from grokwatch.collector.config import DEFAULT_COMPARISONS

        print(f"pairs per sample in force (read every 0.5 s; configured {DEFAULT_COMPARISONS}): "
              f"mean {np.mean(effective):.1f}, median {np.median(effective):.0f}, min {min(effective):.0f}")
    print(f"ingest lag (scraped every 0.5 s, {len(lag)} reads): median {np.median(lag):.3f} s, "
          f"p99 {np.percentile(lag, 99):.3f} s, max {lag.max():.3f} s; queue max {max(queue_sizes):.0f}")
    worst = np.argsort(lag)[::-1][:5]
    print("largest lags (t s: lag s): " + ", ".join(f"{lag_times[i]:.0f}: {lag[i]:.2f}" for i in sorted(worst)))
    print("collector RSS MB (t s, MB): " + ", ".join(f"{t:.0f}:{v:.0f}" for t, v in rss))
    phases = {k: v for k, v in m.items() if k.startswith("grokwatch_group_phase{") and v == 1}
    print("phases:", ", ".join(k.split("group=")[1].split(",")[0] + "=" + k.split("phase=")[1].split(",")[0]
                               for k in phases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
