"""The kernels off the state lock (collector/pipeline.py): a long message holds only its own stream, so
scrapes answer, other runs go on, and snapshots hold each message whole."""

from __future__ import annotations

import time
import zlib

import numpy as np
import pytest
from helpers import Pusher, scrape, start_collector, value, wait_until
from wire_factories import make_hello, make_routing

from grokwatch.collector import pipeline
from grokwatch.collector.config import CollectorConfig
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
        pipeline.apply(state, encode(make_hello(seq=0)), Limits())
        for seq in range(1, 41):
            pipeline.apply(state, encode(make_routing(seq=seq, n=3, step=seq)), Limits(), dispatch=workers.dispatch)
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


def _same_worker_as(run: str, workers: int = 2) -> str:
    for i in range(100):
        name = f"small-{i}"
        if worker_of(name, workers) == worker_of(run, workers):
            return name
    raise AssertionError("no name found")


@pytest.mark.slow
def test_one_runs_huge_messages_cannot_starve_another_on_the_same_worker(tmp_path):
    """Issue 34: messages at the largest allowed shape under one run left a legitimate run on the same kernel
    worker with 248 of 5,112 samples processed during the attack, and SIGTERM then took 25 s. A worker now
    shares its time fairly between its streams, a stream holds at most BACKLOG_S of kernel work, and the
    rest of a flooding sender's messages wait unadmitted while other senders go on. Nothing is lost: what a stop leaves held
    back is replayed from the write-ahead log at the next start."""
    huge = "huge"
    small = _same_worker_as(huge)
    config = dict(max_layer_experts=1 << 20, window_samples=8, comparisons_per_sample=8, max_message_bytes=8 << 20,
                  kernel_workers=2)
    c = start_collector(tmp_path, **config)
    pusher = Pusher(c.endpoints[0])
    floods, per = 6, 2
    try:
        L, E = HUGE["num_layers"], HUGE["num_experts"]
        pusher.send(encode(make_hello(run=huge, sender="h", seq=0, num_layers=L, num_experts=E, top_k=8)))
        pusher.send(encode(make_hello(run=small, sender="s", seq=0)))
        for seq in range(1, floods + 1):
            pusher.send(encode(make_routing(run=huge, sender="h", seq=seq, n=per, rng=np.random.default_rng(seq),
                                            sample_ids=[f"h{seq}-{i}" for i in range(per)], **HUGE)))
        wait_until(lambda: c.state.streams.get((huge, "train")) is not None
                   and c.state.streams[(huge, "train")].lock.locked(), timeout_s=20)
        for seq in range(1, 21):
            pusher.send(encode(make_routing(run=small, sender="s", seq=seq, n=2, step=seq,
                                            sample_ids=[f"s{seq}-0", f"s{seq}-1"])))

        def small_samples():
            st = c.state.streams.get((small, "train"))
            return int(st.samples_G.sum()) if st is not None else 0

        wait_until(lambda: small_samples() == 40, timeout_s=60)
        huge_done = int(c.state.streams[(huge, "train")].samples_G.sum())
        assert huge_done < per * floods, "the flood was done before the small run's messages: nothing shown"
        started = time.monotonic()
    finally:
        pusher.close()
        c.stop()
    stopped_in = time.monotonic() - started
    assert stopped_in < 30  # the DaemonSet's termination grace period
    c = start_collector(tmp_path, **config)  # what the stop left held back is replayed
    try:
        wait_until(lambda: c.state.samples_total == per * floods + 40, timeout_s=120)
        assert c.state.lost_total == 0 and not c.state.rejected_total
    finally:
        c.stop()


def test_a_view_holds_the_state_lock_only_for_its_copy_never_while_it_waits_for_a_busy_stream():
    """Issue 30: the view rendered under the state's lock, so a scrape waiting (up to 0.5 s) for a stream its
    kernels held kept every admission and snapshot waiting too. Now the lock is held for the copy only: with
    one stream's lock taken (its kernels running), a view waits for that stream alone and the state's lock
    is free meanwhile; the view answers with this exporter's previous reading of that stream, counted in the
    exporter's memo, and the state is not written by it."""
    import threading

    from grokwatch.collector.view import STREAM_WAIT_S, ViewMemo, build_view

    state = State(CollectorConfig(window_samples=8, comparisons_per_sample=2))
    pipeline.handle(state, make_hello())
    pipeline.handle(state, make_routing(seq=1, n=2, step=1))
    memo = ViewMemo()
    first = {f.name: list(f.samples) for f in build_view(state, memo=memo)}
    stream = state.streams[("run-a", "train")]
    before = dict(vars(state))
    views = []
    with stream.lock:  # the kernels hold the stream
        viewer = threading.Thread(target=lambda: views.append(build_view(state, memo=memo)))
        started = time.monotonic()
        viewer.start()
        time.sleep(STREAM_WAIT_S / 5)  # the view is waiting for the stream now
        assert state.lock.acquire(timeout=STREAM_WAIT_S / 5), "the view held the state's lock while it waited"
        acquired = time.monotonic() - started
        state.lock.release()
        viewer.join()
    assert acquired < STREAM_WAIT_S
    second = {f.name: list(f.samples) for f in views[0]}
    assert memo.stale_stream_reads == 1
    assert second["grokwatch_collector_stream_reads_stale_total"][0].value == 1
    assert second["grokwatch_pathway_samples_total"] == first["grokwatch_pathway_samples_total"]  # the last reading
    assert vars(state).keys() == before.keys() and all(vars(state)[k] is v for k, v in before.items())
