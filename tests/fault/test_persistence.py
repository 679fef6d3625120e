"""Faults of the state directory: crafted, truncated, foreign or wrong-typed snapshots, an unwritable
directory, a full disk. Each gives one clear line and a defined outcome, counted in
grokwatch_collector_persist_errors_total{what}; never a crash, a /metrics that errors, or code run."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time

import msgpack
import pytest
from helpers import Pusher, scrape, scrape_text, start_collector, value, wait_until
from wire_factories import make_hello, make_routing

from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.persist import MAGIC, SNAPSHOT_NAME, SNAPSHOT_VERSION, Journal, load_snapshot_bytes
from grokwatch.collector.service import snapshot_blob
from grokwatch.collector.state import State
from grokwatch.collector.wal import FILE_MAGIC, WriteAheadLog
from grokwatch.wire import encode


class _Exploit:
    """A pickle that, loaded with plain pickle.load, runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _with_a_real_snapshot(tmp_path):
    c = start_collector(tmp_path)
    try:
        with_pusher(c, [make_hello(seq=0), make_routing(seq=1, n=4)])
        wait_until(lambda: c.state.samples_total == 4)
    finally:
        c.stop()
    return tmp_path / "state" / SNAPSHOT_NAME


def _blob(state) -> bytes:
    """A snapshot file in the collector's own format, of any content."""
    return MAGIC + msgpack.packb({"version": SNAPSHOT_VERSION, "state": state}, use_bin_type=True)


def with_pusher(collector, msgs):
    """Send and wait until the collector has them (the pusher closes with linger 0)."""
    before = collector.state.received_total
    p = Pusher(collector.endpoints[0])
    try:
        for m in msgs:
            p.send(encode(m))
        wait_until(lambda: collector.state.received_total >= before + len(msgs))
    finally:
        p.close()


def _starts_fresh_and_counts(tmp_path, caplog):
    c = start_collector(tmp_path)
    try:
        s = scrape(c.metrics_port)  # /metrics answers
        assert value(s, "grokwatch_collector_persist_errors_total", what="snapshot_read") == 1
        assert value(s, "grokwatch_collector_messages_received_total") == 0
        aside = [p for p in os.listdir(tmp_path / "state") if ".bad-" in p]
        assert len(aside) == 1
        from grokwatch.collector.persist import read_snapshot

        assert read_snapshot(str(tmp_path / "state"))["received_total"] == 0  # a fresh one in its place
        lines = [r for r in caplog.records if "snapshot" in r.getMessage() and r.levelname == "ERROR"]
        assert len(lines) == 1 and "starting fresh" in lines[0].getMessage()
        with_pusher(c, [make_hello(seq=0), make_routing(seq=1, n=3)])  # and it works
        wait_until(lambda: c.state.samples_total == 3)
    finally:
        c.stop()
    return c


def test_an_older_versions_pickle_is_never_loaded_and_is_set_aside(tmp_path, caplog):
    """Snapshots used to be pickles, and a crafted one ran code at start-up. The format is data now; a
    pickle left by an older version is not read at all (not even with an allow-list), moved aside, counted."""
    marker = tmp_path / "pwned"
    (tmp_path / "state").mkdir()
    with open(tmp_path / "state" / "snapshot.pkl", "wb") as fh:
        pickle.dump({"version": 1, "state": {"received_total": _Exploit(marker)}}, fh)
    _starts_fresh_and_counts(tmp_path, caplog)
    assert not marker.exists()
    assert not os.path.exists(tmp_path / "state" / "snapshot.pkl")


@pytest.mark.parametrize("payload", [
    msgpack.ExtType(7, msgpack.packb(["Popen", {"args": "touch pwned"}])),  # a class that is not ours
    msgpack.ExtType(5, msgpack.packb(["|O", [1], b"\x00" * 8])),  # an object array
    msgpack.ExtType(99, b""),  # no such type
], ids=["foreign-class", "object-array", "unknown-ext"])
def test_a_crafted_snapshot_names_nothing_that_runs_and_is_set_aside(tmp_path, caplog, payload):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / SNAPSHOT_NAME).write_bytes(_blob({"received_total": payload}))
    _starts_fresh_and_counts(tmp_path, caplog)


def test_a_truncated_snapshot_is_set_aside_and_counted(tmp_path, caplog):
    path = _with_a_real_snapshot(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _starts_fresh_and_counts(tmp_path, caplog)


@pytest.mark.parametrize("blob", [
    b"not a snapshot at all",
    MAGIC + b"\xc1 torn",
    MAGIC + msgpack.packb({"version": 99, "state": {}}),  # another version
    _blob({"received_total": "many", "rejected_total": [1, 2]}),  # wrong types
    _blob({"streams": {"r": 7}}),  # wrong types, deeper
], ids=["garbage", "torn", "version", "types", "deep-types"])
def test_a_foreign_or_wrong_typed_snapshot_never_crashes_start_up_or_metrics(tmp_path, caplog, blob):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / SNAPSHOT_NAME).write_bytes(blob)
    _starts_fresh_and_counts(tmp_path, caplog)


def test_an_unwritable_state_dir_fails_at_start_up_in_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # root ignores permission bits; a path through a file is unwritable for anyone
    result = subprocess.run([sys.executable, "-m", "grokwatch.cli", "collector", "--listen", "tcp://127.0.0.1:0",
                             "--metrics-port", "0", "--state-dir", str(blocker / "state")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    out = (result.stdout + result.stderr).strip().splitlines()
    assert len(out) == 1 and "state_dir" in out[0] and "not writable" in out[0], out


def test_a_full_disk_is_counted_as_persist_errors_not_rejections_and_leaves_no_temp_file(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    c = start_collector(tmp_path)
    try:
        state_dir = tmp_path / "state"
        assert c.journal._fd is not None
        os.close(c.journal._fd)
        c.journal._fd = os.open("/dev/full", os.O_WRONLY)  # the journal's disk is full
        os.symlink("/dev/full", state_dir / (SNAPSHOT_NAME + ".tmp"))  # the snapshot's temp file: the disk is full
        with_pusher(c, [make_hello(seq=0)] + [make_routing(seq=i, n=2, step=i) for i in range(1, 6)])
        wait_until(lambda: c.state.samples_total == 10)
        with pytest.raises(OSError):
            c.snapshot()
        s = scrape(c.metrics_port)
        assert value(s, "grokwatch_collector_persist_errors_total", what="journal_write") >= 5
        assert value(s, "grokwatch_collector_persist_errors_total", what="snapshot_write") == 1
        assert value(s, "grokwatch_collector_messages_rejected_total", reason="internal") == 0
        assert value(s, "grokwatch_collector_samples_processed_total") == 10
        assert not os.path.lexists(state_dir / (SNAPSHOT_NAME + ".tmp"))
        assert "grokwatch_collector_persist_errors_total" in scrape_text(c.metrics_port)
    finally:
        c.stop()


def _while_the_state_lock_is_held(state: State, then, fail) -> tuple[bool, bool]:
    """One thread holds the state's lock (a message finishing, a snapshot quiesced) and then calls ``then``;
    meanwhile another runs ``fail``, a persistence call that fails on the full disk and counts it. Whether
    each thread ended within 10 s: a counter taken under the persister's own lock deadlocks them."""
    held = threading.Event()

    def holder():
        with state.lock:
            held.set()
            time.sleep(0.3)  # the failing call takes the persister's lock meanwhile
            then()

    def failing():
        held.wait()
        fail()

    threads = [threading.Thread(target=f, daemon=True) for f in (holder, failing)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    return tuple(not t.is_alive() for t in threads)


def test_a_journal_that_fails_on_a_full_disk_never_deadlocks_with_a_message_being_journaled(tmp_path):
    """Found by the collector hanging: a snapshot flushed the journal on a full disk (journal lock, then the
    counter's state lock) while a finishing message journaled its points (state lock, then journal lock)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    state = State(CollectorConfig())
    os.symlink("/dev/full", tmp_path / "journal.jsonl")
    journal = Journal(str(tmp_path), 1 << 20, on_error=state.count_persist_error)
    ended = _while_the_state_lock_is_held(state, then=lambda: journal({"kind": "point"}),
                                          fail=lambda: journal({"kind": "point"}))
    assert ended == (True, True)
    assert state.persist_errors["journal_write"] >= 1


def test_a_write_ahead_log_that_fails_on_a_full_disk_never_deadlocks_with_a_snapshot(tmp_path):
    """The receive thread appends (the log's lock, then on a failure the counter's state lock) while a
    snapshot, quiesced under the state lock, rotates the log (its lock)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    state = State(CollectorConfig())
    log = WriteAheadLog(str(tmp_path), 0, 1 << 20, on_error=state.count_persist_error)
    log.message(time.time(), b"x")  # something written: a rotation opens the next generation
    os.close(log._fd)
    log._fd = os.open("/dev/full", os.O_WRONLY)  # and then the disk is full
    ended = _while_the_state_lock_is_held(state, then=log.rotate, fail=lambda: log.message(time.time(), b"x"))
    assert ended == (True, True)
    assert state.persist_errors["wal_write"] == 1 and log.generation == 1


def test_a_snapshot_is_consistent_even_while_messages_are_processed(tmp_path):
    """Taken quiesced: the total and the per-group samples of the same snapshot agree."""
    c = start_collector(tmp_path)
    try:
        p = Pusher(c.endpoints[0])
        p.send(encode(make_hello(seq=0)))
        for i in range(1, 400):
            p.send(encode(make_routing(seq=i, n=4, step=i)))
        blobs = [snapshot_blob(c.state) for _ in range(30)]
        wait_until(lambda: c.state.received_total >= 400)
        p.close()
    finally:
        c.stop()
    for blob in blobs:
        data = load_snapshot_bytes(blob)
        per_group = sum(g.series.samples_total for st in data["streams"].values() for g in st.groups.values())
        assert per_group == data["samples_total"]


def test_half_open_metrics_clients_cannot_pin_threads_or_keep_scrapes_out(tmp_path, monkeypatch):
    """976 half-open connections used to pin 976 threads for ever. Now at most MAX_CONNECTIONS are served
    at once, each for at most CLIENT_TIMEOUT_S without a request; the rest are closed at once."""
    import socket
    import threading
    import time

    from grokwatch.collector import prometheus as prom

    monkeypatch.setattr(prom, "CLIENT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(prom._Handler, "timeout", 1.0)
    c = start_collector(tmp_path)
    idle = []
    try:
        before = threading.active_count()
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", c.metrics_port))
            idle.append(s)
        time.sleep(0.5)
        assert threading.active_count() - before <= prom.MAX_CONNECTIONS + 2
        wait_until(lambda: threading.active_count() - before <= 2, timeout_s=10)  # timed out and closed
        assert scrape(c.metrics_port)  # and a scrape is served
    finally:
        for s in idle:
            s.close()
        c.stop()


def test_a_snapshot_trims_the_write_ahead_log_it_covers(tmp_path):
    c = start_collector(tmp_path)
    try:
        with_pusher(c, [make_hello(seq=0)] + [make_routing(seq=i, n=2, step=i) for i in range(1, 20)])
        wait_until(lambda: c.state.samples_total == 38)
        wals = lambda: sorted(p for p in os.listdir(tmp_path / "state") if p.startswith("wal."))  # noqa: E731
        assert len(wals()) == 1 and os.path.getsize(tmp_path / "state" / wals()[0]) > len(FILE_MAGIC)
        c.snapshot()
        assert len(wals()) == 1 and os.path.getsize(tmp_path / "state" / wals()[0]) == len(FILE_MAGIC)  # a new one
    finally:
        c.stop()


def test_a_scrape_never_waits_on_a_long_message(tmp_path, monkeypatch):
    """Kernels run under the state lock; eight large messages once made each scrape take 9-11 s (past
    Prometheus' 10 s timeout). A scrape now waits at most SCRAPE_LOCK_WAIT_S, then answers with the
    previous view, counted."""
    import threading
    import time

    from grokwatch.collector import prometheus as prom

    monkeypatch.setattr(prom, "SCRAPE_LOCK_WAIT_S", 0.5)
    c = start_collector(tmp_path)
    try:
        with_pusher(c, [make_hello(seq=0), make_routing(seq=1, n=4)])
        wait_until(lambda: c.state.samples_total == 4)
        assert value(scrape(c.metrics_port), "grokwatch_collector_samples_processed_total") == 4
        time.sleep(0.3)  # past the render duty window (prometheus.RENDER_DUTY): the next scrape renders
        held, release = threading.Event(), threading.Event()

        def long_message():  # what a huge message does to the lock
            with c.state.lock:
                held.set()
                release.wait(10)

        t = threading.Thread(target=long_message)
        t.start()
        held.wait(5)
        started = time.monotonic()
        s = scrape(c.metrics_port)
        took = time.monotonic() - started
        release.set()
        t.join()
        assert took < 3.0
        assert value(s, "grokwatch_collector_samples_processed_total") == 4  # the previous view
        assert value(s, "grokwatch_collector_scrapes_stale_total") == 1
    finally:
        c.stop()


def test_fifty_concurrent_scrapers_share_renders_and_a_lone_scrape_is_never_stale(tmp_path):
    """Issue 29: 50 concurrent scrapers each built the view under the state lock; ingest lagged 27.5 s at
    20 msg/s. Concurrent scrapes now share one render (the state's lock taken once per render)."""
    import threading
    import urllib.request

    c = start_collector(tmp_path)
    stop, served, errors = threading.Event(), [], []

    def scraper():
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=10) as r:
                    r.read()
                served.append(1)
            except OSError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=scraper, daemon=True) for _ in range(50)]
    try:
        app = c._server.metrics_app
        for t in threads:
            t.start()
        p = Pusher(c.endpoints[0])
        p.send(encode(make_hello(seq=0)))
        for seq in range(1, 41):
            p.send(encode(make_routing(seq=seq, n=2, step=seq, sample_ids=[f"a{seq}", f"b{seq}"])))
            time.sleep(0.025)
        wait_until(lambda: c.state.received_total == 41, timeout_s=30)
        stop.set()
        for t in threads:
            t.join(15)
        assert not errors and len(served) > 50
        assert app.renders < len(served) / 2, (app.renders, len(served))  # shared, not one per scrape
        # with nobody else scraping, a scrape renders afresh: it shows what happened before it — once the duty
        # cycle's hold after the storm's last render has passed (9x that render's time: under CI's load the
        # storm's renders took long enough that a scrape within milliseconds of it got their bytes)
        wait_until(lambda: app.clock() >= app._next_render, timeout_s=30)
        p.send(encode(make_routing(seq=41, n=2, step=41, sample_ids=["a41", "b41"])))
        wait_until(lambda: c.state.received_total == 42)
        assert value(scrape(c.metrics_port), "grokwatch_collector_messages_received_total") == 42
        p.close()
    finally:
        stop.set()
        c.stop()


def _damage(stream, what):
    """One corruption of a real stream, as a flipped byte or a bad writer would leave it."""
    import numpy as np

    if what == "window-index":
        stream.win_next_G[0] = stream.window_slots + 5
    elif what == "window-shape":
        stream.win_sym_GWY = stream.win_sym_GWY[:, :-1]
    elif what == "labels-null":
        stream.labels = None
    elif what == "symbol":
        stream.win_sym_GWY[0, 0, 0] = stream.num_experts + 7
    elif what == "layer-starts":
        stream.win_starts_GWLp[0, 0, 1] = 10_000
    elif what == "dtype":
        stream.win_len_GW = stream.win_len_GW.astype(np.float64)
    elif what == "filled":
        stream.win_filled_G[0] = -3
    elif what == "index":
        stream.index = {"math": 5}
    elif what == "shape":
        stream.num_experts = 3


DAMAGES = ["window-index", "window-shape", "labels-null", "symbol", "layer-starts", "dtype", "filled", "index", "shape"]


@pytest.mark.parametrize("what", DAMAGES)
def test_a_damaged_snapshot_is_set_aside_before_a_kernel_sees_it(tmp_path, caplog, what):
    """Issue 34: a window index out of range (one flipped byte) passed the start-up check, and the next routing
    message killed the process with SIGSEGV; labels set to null made every message internal. Every field the
    kernels index by is checked first (collector/schema.py); the collector starts fresh and keeps working."""
    from grokwatch.collector.persist import snapshot_bytes

    path = _with_a_real_snapshot(tmp_path)
    data = load_snapshot_bytes(path.read_bytes())
    _damage(data["streams"][("run-a", "train")], what)
    path.write_bytes(snapshot_bytes(data))
    c = _starts_fresh_and_counts(tmp_path, caplog)
    assert c.state.rejected_total.get("internal", 0) == 0


@pytest.mark.parametrize("field,bad", [("received_total", -5), ("wal_applied", [1]), ("rejected_total", {"x": "y"}),
                                       ("evals", {("r", "g"): (1, "nan")}), ("rng", 7)])
def test_a_snapshot_with_a_bad_counter_is_set_aside(tmp_path, caplog, field, bad):
    from grokwatch.collector.persist import snapshot_bytes

    path = _with_a_real_snapshot(tmp_path)
    data = load_snapshot_bytes(path.read_bytes())
    data[field] = bad
    path.write_bytes(snapshot_bytes(data))
    _starts_fresh_and_counts(tmp_path, caplog)


def test_a_damaged_snapshot_cannot_kill_a_collector_process(tmp_path):
    """The reported case end to end: the damaged window index, a real collector process, a routing message.
    Before: rc -11 (SIGSEGV). Now: the snapshot is set aside, the message processed, a clean exit."""
    from helpers import free_port

    from grokwatch.collector.persist import snapshot_bytes

    path = _with_a_real_snapshot(tmp_path)
    data = load_snapshot_bytes(path.read_bytes())
    _damage(data["streams"][("run-a", "train")], "window-index")
    path.write_bytes(snapshot_bytes(data))
    endpoint, metrics = f"tcp://127.0.0.1:{free_port()}", free_port()
    proc = subprocess.Popen([sys.executable, "-m", "grokwatch.cli", "collector", "--listen", endpoint,
                             "--metrics-port", str(metrics), "--metrics-addr", "127.0.0.1",
                             "--state-dir", str(tmp_path / "state")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def up():
            try:
                return scrape(metrics)
            except OSError:
                return None

        wait_until(up, timeout_s=60)
        p = Pusher(endpoint)
        p.send(encode(make_hello(seq=0)))
        p.send(encode(make_routing(seq=1, n=4)))
        wait_until(lambda: value(scrape(metrics), "grokwatch_collector_samples_processed_total") == 4, timeout_s=20)
        p.close()
        assert value(scrape(metrics), "grokwatch_collector_persist_errors_total", what="snapshot_read") == 1
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait(10)
