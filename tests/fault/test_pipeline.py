"""The kernels off the state lock (collector/pipeline.py): a long message holds only its own stream, so
scrapes answer, other runs go on, and snapshots hold each message whole."""

from __future__ import annotations

import time
import zlib

import numpy as np
from helpers import Pusher, scrape, start_collector, value, wait_until
from wire_factories import make_hello, make_routing

from grokwatch.collector.pipeline import KernelWorkers
from grokwatch.collector.state import State
from grokwatch.wire import encode

HUGE = dict(num_layers=128, num_experts=1024, top_k=8, concentration=50.0)  # near-uniform: ~90k symbols


def worker_of(run: str, workers: int = 2) -> int:
    return zlib.crc32(f"{run}\0train".encode()) % workers


def test_a_long_message_holds_its_stream_only(tmp_path):
    """Before, the kernels ran under the state lock: eight large messages made each scrape take 9-11 s
    and a legitimate run waited behind them. Now, while a huge run's kernels run: a scrape answers at
    once (that stream from its previous reading, counted), and another run's messages are processed."""
    huge, small = "huge", "small-1"
    assert worker_of(huge) != worker_of(small)  # the two runs' streams go to different workers
    c = start_collector(tmp_path, max_layer_experts=1 << 20, window_samples=8, comparisons_per_sample=8,
                        max_message_bytes=8 << 20, kernel_workers=2)
    pusher = Pusher(c.endpoints[0])
    try:
        L, E = HUGE["num_layers"], HUGE["num_experts"]
        pusher.send(encode(make_hello(run=huge, sender="h", seq=0, num_layers=L, num_experts=E, top_k=8)))
        pusher.send(encode(make_hello(run=small, sender="s", seq=0)))
        pusher.send(encode(make_routing(run=huge, sender="h", seq=1, n=1, rng=np.random.default_rng(0), **HUGE)))
        wait_until(lambda: c.state.samples_total == 1, timeout_s=20)
        scrape(c.metrics_port)  # a first reading of the huge stream
        for seq in range(2, 5):  # each compares 4 samples with the window: seconds of kernels
            pusher.send(encode(make_routing(run=huge, sender="h", seq=seq, n=4, rng=np.random.default_rng(seq),
                                            **HUGE)))
        wait_until(lambda: c.state.streams[(huge, "train")].lock.locked(), timeout_s=20)
        started = time.monotonic()
        for seq in range(1, 11):
            pusher.send(encode(make_routing(run=small, sender="s", seq=seq, n=2, step=seq)))
        wait_until(lambda: c.state.samples_total >= 1 + 20, timeout_s=5)  # the small run's twenty samples
        small_done = time.monotonic() - started
        s = scrape(c.metrics_port)
        took = time.monotonic() - started - small_done
        assert c.state.streams[(huge, "train")].lock.locked(), "the huge kernels ended too soon to show anything"
        assert small_done < 3.0 and took < 2.0
        assert value(s, "grokwatch_pathway_samples_total", run=small, source="train", group="math") == 20
        assert value(s, "grokwatch_pathway_samples_total", run=huge, source="train", group="math") == 1
        assert value(s, "grokwatch_collector_stream_reads_stale_total") >= 1
        wait_until(lambda: c.state.samples_total == 1 + 12 + 20, timeout_s=60)
        with c.state.lock:  # finish() counts the samples before it settles, both under the lock
            assert c.state.in_flight == 0 and not c.state.rejected_total.get("internal")
    finally:
        pusher.close()
        c.stop()


def test_the_default_bound_refuses_that_shape(tmp_path):
    c = start_collector(tmp_path)
    pusher = Pusher(c.endpoints[0])
    try:
        L, E = HUGE["num_layers"], HUGE["num_experts"]
        pusher.send(encode(make_hello(run="huge", sender="h", seq=0, num_layers=L, num_experts=E, top_k=8)))
        pusher.send(encode(make_routing(run="huge", sender="h", seq=1, n=1, **HUGE)))
        wait_until(lambda: c.state.rejected_total.get("shape_too_large") == 2)
        assert not c.state.streams and c.state.received_total == 2
    finally:
        pusher.close()
        c.stop()


def test_a_snapshot_waits_for_the_messages_in_the_kernels_and_admits_none_meanwhile():
    """A snapshot between a message's admission (its sequence number counted) and its kernels would hold
    half of it, and a replay after a kill would then skip its samples. The quiesced snapshot holds all."""
    from grokwatch.collector.config import CollectorConfig
    from grokwatch.wire import Limits

    state = State(CollectorConfig(window_samples=8, comparisons_per_sample=8))
    workers = KernelWorkers(state, 1).start()
    taken = []
    try:
        state.apply(encode(make_hello(seq=0)), Limits())
        for seq in range(1, 41):
            state.apply(encode(make_routing(seq=seq, n=3, step=seq)), Limits(), dispatch=workers.dispatch)
            if seq % 5 == 0:
                with state.quiesce():
                    stream = state.streams[("run-a", "train")]
                    taken.append((state.in_flight, state.samples_total, int(stream.samples_G.sum()),
                                  state.senders["s0"].last_seq))
    finally:
        workers.stop()
    assert all(in_flight == 0 for in_flight, *_ in taken)
    assert all(samples == in_window == 3 * last_seq for _, samples, in_window, last_seq in taken)
    assert state.samples_total == 120
