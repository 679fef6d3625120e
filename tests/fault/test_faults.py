"""Faults: a collector that restarts, a slow collector, oversize messages, a dead endpoint."""

from __future__ import annotations

import contextlib
import time

import psutil
import pytest
import torch
from helpers import Pusher, scrape, start_collector, value, wait_until
from tiny_models import VOCAB, tiny_model
from wire_factories import make_hello, make_routing

import grokwatch.agent as gw
from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.ingest import Ingest
from grokwatch.collector.state import State
from grokwatch.wire import encode


def train_steps(model, mon, n, tag_prefix="s"):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for i in range(n):
        ids = torch.randint(0, VOCAB, (2, 8))
        mon.tag([f"{tag_prefix}{i}a", f"{tag_prefix}{i}b"], ["g", "g"])
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_collector_restart_mid_training_loses_no_counter_and_resumes(tmp_path):
    c1 = start_collector(tmp_path, listen=("tcp://127.0.0.1:0",))
    endpoint = c1.endpoints[0]
    model = tiny_model("olmoe")
    # No background heartbeats: a message in flight on loopback while a socket closes is lost by
    # nature; this test is about what the agent queued while the collector was away.
    mon = gw.attach(model, endpoint, "restart", every_n_steps=1, heartbeat_interval_s=3600)
    train_steps(model, mon, 5, "a")
    wait_until(lambda: c1.state.samples_total >= 10)
    before = scrape(c1.metrics_port)
    c1.stop()  # snapshot on stop
    # Until the agent's I/O thread has seen the connection close, a message can still go into the dead
    # connection and is lost by nature (the next collector counts it as a gap). On a loaded machine that
    # takes a while: wait for it, as this test is about what the agent queues once the collector is away.
    port = int(endpoint.rsplit(":", 1)[1])
    wait_until(lambda: not any(c.raddr and c.raddr.port == port for c in psutil.Process().net_connections("tcp")))
    train_steps(model, mon, 3, "b")  # collector away: libzmq queues (SNDHWM), nothing raises
    c2 = start_collector(tmp_path, listen=(endpoint,))
    try:
        train_steps(model, mon, 5, "c")
        # The agent reconnects with a backoff of up to 5 s (RECONNECT_IVL_MAX), longer than close()'s
        # 2 s bound on flushing: wait for the replay before closing.
        wait_until(lambda: c2.state.samples_total >= 10 + 16, timeout_s=30)
        mon.close()
        after = scrape(c2.metrics_port)
        for name in ("grokwatch_collector_messages_received_total", "grokwatch_pathway_samples_total",
                     "grokwatch_pathway_distance_count"):
            for labels, v in before[name].items():
                assert after[name][labels] >= v, name
        # Queued while away and replayed: nothing lost, nothing rejected.
        assert value(after, "grokwatch_pathway_samples_total", run="restart", source="train", group="g") == 26
        assert value(after, "grokwatch_collector_messages_lost_total") == 0
        assert mon.stats()["hook_errors"] == 0
    finally:
        c2.stop()


class SlowState(State):
    """A collector whose processing is slower than the arrivals (a double of the real State)."""

    @contextlib.contextmanager
    def admitting(self):
        time.sleep(0.05)  # each message's admission (collector/pipeline.py apply) takes 50 ms longer
        with super().admitting() as state:
            yield state


def test_slow_collector_counts_queue_full_and_accounts_for_every_message():
    state = SlowState(CollectorConfig())
    ingest = Ingest(state, ["tcp://127.0.0.1:0"], queue_capacity=2, max_message_bytes=1 << 20)
    ingest.start()
    pusher = Pusher(ingest.endpoints[0])
    try:
        for seq in range(40):
            pusher.send(encode(make_routing(seq=seq, n=1)))
        wait_until(lambda: state.received_total == 40, timeout_s=15)
        wait_until(lambda: ingest.queue.empty(), timeout_s=15)
        # every message is processed or counted as rejected (the last one may still be in handle())
        wait_until(lambda: state.processing_seconds_count + state.rejected_total.get("queue_full", 0) >= 40)
        rejected = state.rejected_total.get("queue_full", 0)
        assert rejected > 0
        assert state.processing_seconds_count + rejected == 40
        # Each drop once, under its own reason: no frame vanished, so none is lost as well.
        assert state.lost_total == 0
    finally:
        pusher.close()
        ingest.stop()


def test_invalid_and_oversize_messages_of_a_sender_are_not_counted_again_as_lost():
    """A sender's message the collector refuses before applying it (too large, invalid) is one rejection
    under its reason; the sender's next message does not count it again as a sequence gap. A real
    gap (seq 6 never sent) is still lost."""
    import msgpack

    state = State(CollectorConfig())
    big = encode(make_routing(seq=2, n=40))
    # Just over the limit (libzmq itself drops frames over twice the limit, with the connection).
    ingest = Ingest(state, ["tcp://127.0.0.1:0"], queue_capacity=100, max_message_bytes=len(big) - 100)
    ingest.start()
    pusher = Pusher(ingest.endpoints[0])
    try:
        pusher.send(encode(make_routing(seq=0, n=1)))
        pusher.send(encode(make_routing(seq=1, n=1)))
        pusher.send(big)  # too_large
        bad = msgpack.unpackb(encode(make_routing(seq=3, n=1)), raw=False)
        bad["entropy"]["dtype"] = "<f8"
        pusher.send(msgpack.packb(bad, use_bin_type=True))  # invalid: dtype
        pusher.send(encode(make_routing(seq=4, n=1)))
        pusher.send(encode(make_routing(seq=5, n=1)))
        pusher.send(encode(make_routing(seq=7, n=1)))
        wait_until(lambda: state.received_total == 7 and state.processing_seconds_count == 5, timeout_s=15)
        assert state.rejected_total == {"too_large": 1, "dtype": 1}
        assert state.lost_total == 1
    finally:
        pusher.close()
        ingest.stop()


def test_oversize_messages_are_dropped_and_counted_by_the_agent(tmp_path):
    c = start_collector(tmp_path)
    try:
        model = tiny_model("olmoe")
        # No heartbeat during the test (one is over 200 bytes too, and a slow machine would send some).
        mon = gw.attach(model, c.endpoints[0], "big", every_n_steps=1, heartbeat_interval_s=3600)
        wait_until(lambda: mon.sender.sent >= 1)  # the hello (it names the layers: over 200 bytes too)
        mon.sender.max_message_bytes = 200  # any routing message is bigger
        train_steps(model, mon, 3)
        wait_until(lambda: mon.stats()["dropped"].get("too_large", 0) >= 3)  # the sender thread encodes them
        stats = mon.stats()
        mon.close()
        assert stats["dropped"].get("too_large", 0) == 3
    finally:
        c.stop()


def test_a_frame_over_twice_the_limit_costs_its_connection_and_is_counted_lost_at_the_next_message(tmp_path):
    """libzmq drops a connection whose frame is over MAXMSGSIZE before the collector sees it: that frame
    used to vanish from every counter. The disconnect is counted, and the sender's next message (libzmq
    reconnects) counts the frame it never received as lost; up to twice the limit it is too_large."""
    c = start_collector(tmp_path, max_message_bytes=4096)
    pusher = Pusher(c.endpoints[0])
    try:
        pusher.send(encode(make_hello(seq=0)))
        pusher.send(encode(make_routing(seq=1, n=1)))
        wait_until(lambda: c.state.samples_total == 1)
        pusher.send(encode(make_routing(seq=2, n=40)))  # over 8 KiB: the connection goes
        wait_until(lambda: c.state.disconnects_total == 1)
        pusher.send(encode(make_routing(seq=3, n=1)))  # on the connection libzmq opens again
        wait_until(lambda: c.state.samples_total == 2)
        s = scrape(c.metrics_port)
        assert value(s, "grokwatch_collector_disconnects_total") == 1
        assert value(s, "grokwatch_collector_messages_lost_total") == 1
        assert value(s, "grokwatch_collector_messages_received_total") == 3
        pusher.send(encode(make_routing(seq=4, n=20)))  # between 4 and 8 KiB: received and too_large
        wait_until(lambda: c.state.rejected_total.get("too_large") == 1)
        assert c.state.disconnects_total == 1
    finally:
        pusher.close()
        c.stop()


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:1", "ipc:///nonexistent-dir/grokwatch.sock"])
def test_unreachable_endpoints_never_raise_into_training(endpoint):
    model = tiny_model("olmoe")
    mon = gw.attach(model, endpoint, "nowhere", every_n_steps=1, sndhwm=1)
    train_steps(model, mon, 4)
    time.sleep(0.2)
    stats = mon.stats()
    mon.close()
    assert stats["hook_errors"] == 0 and not stats["disabled"]


def test_the_ingest_queue_is_bounded_in_bytes_too():
    """A flood of large messages stops at queue_max_bytes (counted as queue_full, once each), however
    many messages the count bound would still admit."""
    state = SlowState(CollectorConfig())
    one = encode(make_routing(seq=0, n=64))
    ingest = Ingest(state, ["tcp://127.0.0.1:0"], queue_capacity=10_000, max_message_bytes=1 << 22,
                    queue_max_bytes=4 * len(one))
    ingest.start()
    pusher = Pusher(ingest.endpoints[0])
    peak = 0
    try:
        for seq in range(30):
            pusher.send(encode(make_routing(seq=seq, n=64)))
            peak = max(peak, ingest.queued_bytes)
        wait_until(lambda: state.received_total == 30, timeout_s=15)
        assert peak <= 4 * len(one) and ingest.queue_stats()[3] == 4 * len(one)
        wait_until(lambda: state.processing_seconds_count + state.rejected_total.get("queue_full", 0) >= 30,
                   timeout_s=15)
        assert state.rejected_total.get("queue_full", 0) > 0
        assert state.lost_total == 0
    finally:
        pusher.close()
        ingest.stop()


def test_with_no_collector_the_agent_counts_what_was_never_delivered(tmp_path):
    """"sent" is what libzmq took; with nobody listening, close() used to discard it in no counter."""
    from helpers import free_port

    model = tiny_model("olmoe")
    mon = gw.attach(model, f"tcp://127.0.0.1:{free_port()}", "nobody", every_n_steps=1)
    train_steps(model, mon, 4)
    mon.close()
    stats = mon.stats()
    assert stats["sent"] > 0 and stats["dropped"].get("undelivered") == stats["sent"]


def test_with_a_collector_nothing_is_counted_undelivered(tmp_path):
    c = start_collector(tmp_path)
    try:
        model = tiny_model("olmoe")
        mon = gw.attach(model, c.endpoints[0], "somebody", every_n_steps=1)
        train_steps(model, mon, 4)
        wait_until(lambda: c.state.samples_total >= 8)
        mon.close()
        assert "undelivered" not in mon.stats()["dropped"]
    finally:
        c.stop()
