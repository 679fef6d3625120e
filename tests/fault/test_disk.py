"""The write-ahead log and the journal on a bad disk: short and failing writes, a disk that fills, inodes
that run out, descriptors that run out, bit rot and crafted files. Every write is whole or counted; a
damaged record costs itself only; recovery needs no restart; no counter goes backwards across a SIGKILL.
The filesystem faults run on a real small tmpfs (skipped where this user cannot mount one)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import Pusher, free_port, scrape, start_collector, value, wait_until
from wire_factories import make_hello, make_routing

from grokwatch.collector import wal
from grokwatch.collector.persist import Journal, read_journal
from grokwatch.collector.wal import DROP, FILE_MAGIC, MESSAGE, WriteAheadLog, encode_record
from grokwatch.wire import encode


class Counted:
    def __init__(self):
        self.what: dict[str, int] = {}

    def __call__(self, what: str) -> None:
        self.what[what] = self.what.get(what, 0) + 1


@pytest.fixture
def small_fs(tmp_path):
    """Mount a tmpfs of a given size and inode count; unmounted at the end."""
    mounted = []

    def mount(size: str = "256k", inodes: int = 64):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={inodes}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(where, name="filler") -> None:
    """Write until the filesystem says it is full."""
    with open(where / name, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with open(where / (name + "-tail"), "wb", buffering=0) as fh:  # the last partial page
        try:
            while True:
                fh.write(b"\0" * 64)
        except OSError:
            pass


def use_inodes(where) -> list:
    paths = []
    while True:
        p = where / f"inode{len(paths)}"
        try:
            p.touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            return paths
        paths.append(p)


def records(state_dir) -> tuple[list, int]:
    bad = Counted()
    out = [(k, i, payload) for k, i, _, payload in wal.read(str(state_dir), on_bad=bad)]
    return out, bad.what.get("wal_read", 0)


def _log(tmp_path, n, **kw) -> WriteAheadLog:
    log = WriteAheadLog(str(tmp_path), 0, 1 << 30, **kw)
    for i in range(n):
        log.message(float(i), f"message {i}".encode())
    return log


# --- bit rot and crafted files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["header", "payload", "sync"])
def test_one_damaged_record_costs_itself_only(tmp_path, where):
    """Before: replay stopped at the first bad record (every later one lost, one INFO line), and a flipped
    payload byte replayed as a different message (no checksum)."""
    _log(tmp_path, 10).close()
    path = tmp_path / "wal.0.bin"
    data = bytearray(path.read_bytes())
    record = len(encode_record(MESSAGE, 0, 0.0, b"message 0"))
    start = len(FILE_MAGIC) + 4 * record  # the fifth record
    data[start + {"header": 6, "payload": record - 2, "sync": 0}[where]] ^= 0x10
    path.write_bytes(bytes(data))
    got, bad = records(tmp_path)
    assert [i for _, i, _ in got] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert all(payload == f"message {i}".encode() for _, i, payload in got)
    assert bad == 1


def test_a_torn_record_in_the_middle_is_skipped_and_the_rest_replayed(tmp_path):
    _log(tmp_path, 3).close()
    path = tmp_path / "wal.0.bin"
    data = path.read_bytes()
    torn = encode_record(MESSAGE, 99, 0.0, b"x" * 100)[:40]
    log = WriteAheadLog(str(tmp_path), 3, 1 << 30)
    log.close()
    (tmp_path / "wal.1.bin").unlink()
    path.write_bytes(data + torn + encode_record(MESSAGE, 3, 3.0, b"message 3"))
    got, bad = records(tmp_path)
    assert [i for _, i, _ in got] == [0, 1, 2, 3] and bad == 1


def test_a_foreign_file_is_moved_aside_and_counted(tmp_path):
    (tmp_path / "wal.0.bin").write_bytes(b"\x01" + b"\0" * 200)  # e.g. the previous version's format
    got, bad = records(tmp_path)
    assert got == [] and bad == 1
    assert not (tmp_path / "wal.0.bin").exists()
    assert len([p for p in os.listdir(tmp_path) if p.startswith("wal.0.bin.bad-")]) == 1
    assert records(tmp_path) == ([], 0)  # once: the next start does not meet it again


def test_an_index_past_the_range_is_rot_not_a_dead_receive_thread(tmp_path):
    """Before: a record index of 2^64-1 made the next index unpackable, and the receive thread died."""
    (tmp_path / "wal.0.bin").write_bytes(FILE_MAGIC + encode_record(MESSAGE, 2**64 - 1, 0.0, b"x")
                                         + encode_record(MESSAGE, 0, 0.0, b"ok"))
    got, bad = records(tmp_path)
    assert [i for _, i, _ in got] == [0] and bad == 1
    counted = Counted()
    (tmp_path / "fresh").mkdir()
    log = WriteAheadLog(str(tmp_path / "fresh"), 2**64, 1 << 30, on_error=counted)
    log.message(0.0, b"x")  # the index does not pack: counted, never raised
    assert counted.what == {"wal_write": 1}


def _collector_with_log(tmp_path, log_bytes: bytes):
    state = tmp_path / "state"
    state.mkdir()
    (state / "wal.0.bin").write_bytes(log_bytes)
    return start_collector(tmp_path)


def test_a_malformed_drop_record_is_counted_and_the_collector_starts(tmp_path):
    """Before: a drop record whose payload was not [reason, sender, seq] made every start exit 2."""
    good = encode(make_hello(seq=0))
    for payload in (b"not json", b'["bogus", null, null]', b'["queue_full", "r0", -5]', b"[1, 2]"):
        d = tmp_path / f"case{abs(hash(payload))}"
        d.mkdir()
        c = _collector_with_log(d, FILE_MAGIC + encode_record(DROP, 0, time.time(), payload)
                                + encode_record(MESSAGE, 1, time.time(), good))
        try:
            s = scrape(c.metrics_port)
            assert value(s, "grokwatch_collector_persist_errors_total", what="wal_read") == 1
            assert value(s, "grokwatch_collector_messages_received_total") == 1  # the hello after it
        finally:
            c.stop()


def test_a_crafted_record_index_leaves_ingest_working(tmp_path):
    c = _collector_with_log(tmp_path, FILE_MAGIC + encode_record(MESSAGE, 2**64 - 1, time.time(), b"x"))
    try:
        p = Pusher(c.endpoints[0])
        p.send(encode(make_hello(seq=0)))
        p.send(encode(make_routing(seq=1, n=2)))
        wait_until(lambda: c.state.samples_total == 2)
        p.close()
        assert c.ingest is not None and all(t.is_alive() for t in c.ingest._threads)
        assert c.state.persist_errors == {"wal_read": 1}
    finally:
        c.stop()


# --- writes that fail -------------------------------------------------------------------------------------------

def test_short_writes_are_continued_to_a_whole_record(tmp_path, monkeypatch):
    """Before: os.write's count was ignored, and a short write left a torn record mid-file."""
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:7]))
    log = _log(tmp_path, 5)
    monkeypatch.setattr(os, "write", real_write)
    log.close()
    got, bad = records(tmp_path)
    assert [i for _, i, _ in got] == [0, 1, 2, 3, 4] and bad == 0


def test_a_write_failing_part_way_is_cut_back_and_counted(tmp_path, monkeypatch):
    counted = Counted()
    log = _log(tmp_path, 2, on_error=counted)
    size = os.path.getsize(tmp_path / "wal.0.bin")
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 20:
            return real_write(fd, bytes(data)[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    log.message(2.0, b"message 2" * 10)
    monkeypatch.setattr(os, "write", real_write)
    assert os.path.getsize(tmp_path / "wal.0.bin") == size  # no torn record
    assert counted.what == {"wal_write": 1}
    log.message(3.0, b"message 3")
    log.close()
    got, bad = records(tmp_path)
    assert [i for _, i, _ in got] == [0, 1, 3] and bad == 0


def test_rotation_opens_the_new_file_before_closing_the_old(tmp_path, monkeypatch):
    """Before: rotate() closed the old descriptor first; with no descriptor left the open failed, and the
    stale number, reused by an accepted connection, received the next record."""
    counted = Counted()
    log = _log(tmp_path, 2, on_error=counted)
    fd = log._fd

    def no_descriptors(*a, **k):
        raise OSError(errno.EMFILE, "Too many open files")

    with monkeypatch.context() as m:
        m.setattr(os, "open", no_descriptors)
        log.rotate()
    assert log._fd == fd and os.fstat(fd)  # still ours, still open
    assert counted.what == {"wal_write": 1} and log.generation == 0
    log.message(2.0, b"message 2")  # written to the old generation
    log.rotate()
    log.message(3.0, b"message 3")
    assert log.generation == 1
    log.close()
    got, bad = records(tmp_path)
    assert [i for _, i, _ in got] == [0, 1, 2, 3] and bad == 0


def test_a_log_that_could_not_open_a_file_opens_one_later(tmp_path, monkeypatch):
    counted, now = Counted(), [0.0]
    with monkeypatch.context() as m:
        m.setattr(os, "open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EMFILE, "Too many open files")))
        log = WriteAheadLog(str(tmp_path), 0, 1 << 30, on_error=counted, clock=lambda: now[0])
        log.message(0.0, b"lost")
    assert not log.healthy and counted.what == {"wal_write": 2}
    log.message(0.5, b"too soon")  # within REOPEN_AFTER_S: no open tried, counted
    assert counted.what == {"wal_write": 3}
    now[0] = 2.0
    log.message(2.0, b"kept")
    assert log.healthy
    log.close()
    got, _ = records(tmp_path)
    assert [p for _, _, p in got] == [b"kept"]


# --- a real small filesystem --------------------------------------------------------------------------------------

def test_a_full_disk_then_space_again_needs_no_restart(small_fs):
    where = small_fs("256k", 64)
    counted = Counted()
    log = WriteAheadLog(str(where), 0, 1 << 30, on_error=counted)
    journal = Journal(str(where), 1 << 30, on_error=counted)
    fill(where)
    for i in range(50):
        log.message(float(i), b"m" * 300)
        journal({"kind": "point", "i": i})
    failed = dict(counted.what)
    assert failed["wal_write"] >= 30 and failed["journal_write"] >= 30  # the pages already held take a few
    assert not log.healthy and not journal.healthy
    os.remove(where / "filler")
    for i in range(50, 60):
        log.message(float(i), b"m" * 300)
        journal({"kind": "point", "i": i})
    assert log.healthy and journal.healthy
    assert counted.what == failed
    log.close()
    journal.close()
    got, bad = records(where)
    indices = [i for _, i, _ in got]
    assert bad == 0  # whole records only, none torn
    assert indices[-10:] == list(range(50, 60)) and len(indices) - 10 + failed["wal_write"] == 50  # each written or counted
    lines = [r["i"] for r in read_journal(str(where))]
    assert lines[-10:] == list(range(50, 60)) and len(lines) - 10 + failed["journal_write"] == 50


def test_no_inodes_then_inodes_again_resumes_rotation_snapshots_and_the_journal(small_fs, tmp_path):
    """Before: a brief shortage of inodes broke the rotation for good ("Bad file descriptor" every 2 s, in no
    metric), the journal file was gone and no later point was written."""
    where = small_fs("4m", 48)
    c = start_collector(tmp_path, state_dir=str(where / "state"), journal_max_bytes=600)
    try:
        p = Pusher(c.endpoints[0])
        p.send(encode(make_hello(seq=0)))
        seq = 0

        def send(n):
            nonlocal seq
            for _ in range(n):
                seq += 1
                p.send(encode(make_routing(seq=seq, n=2, step=seq, sample_ids=[f"s{seq}a", f"s{seq}b"])))
            wait_until(lambda: c.state.samples_total == 2 * seq)

        taken = use_inodes(where)
        send(60)  # the journal's first rotation needs a new file: none
        with pytest.raises(OSError):
            c.snapshot()  # no inode for the temp file; the log's rotation fails too and keeps its old file
        errors = dict(c.state.persist_errors)
        assert errors.get("snapshot_write") == 1 and errors.get("wal_write", 0) >= 1
        assert errors.get("journal_write", 0) >= 1
        for path in taken:
            path.unlink()
        time.sleep(1.1)  # the journal opens again a second after its failure
        send(20)
        c.snapshot()
        assert c.state.persist_errors == errors  # nothing failed since the inodes came back
        assert c.wal is not None and c.wal.healthy and c.journal is not None and c.journal.healthy
        p.close()
    finally:
        c.stop()
    steps = {r["step"] for r in read_journal(str(where / "state")) if r.get("kind") == "point"}
    assert steps and min(steps) > 60  # the points after the shortage are written (and rotated: a small bound)
    wals = [n for n in os.listdir(where / "state") if n.startswith("wal.") and n.endswith(".bin")]
    assert len(wals) == 1  # the snapshots trimmed what they hold


def _collector_process(state_dir, endpoint, metrics_port):
    env = {**os.environ, "GROKWATCH_SNAPSHOT_INTERVAL_S": "3600"}
    return subprocess.Popen([sys.executable, "-m", "grokwatch.cli", "collector", "--listen", endpoint,
                             "--metrics-port", str(metrics_port), "--metrics-addr", "127.0.0.1",
                             "--state-dir", str(state_dir)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


COUNTERS = ("grokwatch_collector_messages_received_total", "grokwatch_collector_samples_processed_total")


def test_a_disk_full_for_a_while_then_sigkill_sends_no_counter_backwards(small_fs):
    """Before: a record torn by the full disk ended the replay, and after a SIGKILL received went 32 -> 11,
    samples 1,120 -> 40; the failed writes were counted nowhere. Now the failures are counted, and the log
    writing again asks for a snapshot at once, which holds what was not logged."""
    where = small_fs("2m", 64)
    endpoint, metrics = f"tcp://127.0.0.1:{free_port()}", free_port()
    proc = _collector_process(where / "state", endpoint, metrics)
    p = Pusher(endpoint)
    seq = 0

    def totals():
        try:
            s = scrape(metrics)
        except OSError:
            return None
        return {n: sum(s.get(n, {}).values()) for n in COUNTERS} | {
            "wal_write": s.get("grokwatch_collector_persist_errors_total", {}).get(
                frozenset({"what": "wal_write"}.items()), 0)}

    def send(n):
        nonlocal seq
        for _ in range(n):
            seq += 1
            p.send(encode(make_routing(seq=seq, n=4, step=seq, sample_ids=[f"s{seq}-{i}" for i in range(4)])))
        wait_until(lambda: (totals() or {}).get(COUNTERS[0], 0) == seq + 1, timeout_s=30)

    try:
        wait_until(lambda: totals() is not None, timeout_s=60)
        p.send(encode(make_hello(seq=0)))
        send(10)
        fill(where)
        send(30)
        assert totals()["wal_write"] >= 30
        os.remove(where / "filler")
        send(10)  # the log writes again and asks for a snapshot
        wait_until(lambda: os.path.getmtime(where / "state" / "snapshot.msgpack") > time.time() - 1.5, timeout_s=10)
        time.sleep(0.5)
        before = totals()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = _collector_process(where / "state", endpoint, metrics)
        wait_until(lambda: totals() is not None, timeout_s=60)
        after = totals()
    finally:
        p.close()
        proc.kill()
        proc.wait(10)
    for name in COUNTERS:
        assert after[name] >= before[name], (name, before, after)
    assert after[COUNTERS[0]] == seq + 1 and after[COUNTERS[1]] == 4 * seq
