"""Strangers on the ingest port (issue 29): connections that send the first bytes of a ZMTP greeting and
stall, by the thousand, before any CURVE handshake. Before: ~1,100 of them exhausted the 1,024 descriptors;
/metrics answered nothing, the log's rotation failed and a write-ahead record went to an attacker's socket,
the receive thread died while /readyz said ready, and 300 of 390 messages were neither received nor lost."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from helpers import Pusher, free_port, scrape, start_collector, value, wait_until
from wire_factories import make_hello, make_routing

from grokwatch.wire import encode

GREETING_START = b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f"  # ZMTP 3 signature; the rest never comes


def _stall(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(GREETING_START[:2])
        out.append(s)
    return out


def _readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def test_stalled_greetings_are_capped_timed_out_and_counted(tmp_path):
    # The handshake timeout well above the time 150 connections take to open: with 1 s, a loaded CI machine
    # opened them so slowly that the first ones timed out and freed their slots before the last came, and
    # fewer than 110 met the cap (CI, 2026-12-06)
    c = start_collector(tmp_path, max_ingest_connections=40, handshake_timeout_s=5.0)
    stalled = []
    try:
        started = time.monotonic()
        stalled = _stall(_port(c.endpoints[0]), 150)
        assert time.monotonic() - started < 5.0, "the connections took longer to open than the handshake timeout"
        # a bound, not a figure: in a fresh clone's CI run 110 caps took over 10 s once on this shared machine
        wait_until(lambda: c.state.handshake_failures.get("connection_cap", 0) >= 110, timeout_s=30)
        assert c.state.ingest_connections <= 40
        assert scrape(c.metrics_port) and _readyz(c.metrics_port)[0] == 200
        # the stalled ones time out (handshake_timeout_s); then an agent gets in and every message arrives
        wait_until(lambda: c.state.handshake_failures.get("incomplete", 0) == 40 and c.state.ingest_connections == 0,
                   timeout_s=30)
        p = Pusher(c.endpoints[0])
        p.send(encode(make_hello(seq=0)))
        for seq in range(1, 51):
            p.send(encode(make_routing(seq=seq, n=2, step=seq, sample_ids=[f"a{seq}", f"b{seq}"])))
        wait_until(lambda: c.state.received_total == 51, timeout_s=20)
        p.close()
        s = scrape(c.metrics_port)
        assert value(s, "grokwatch_collector_messages_lost_total") == 0
        assert value(s, "grokwatch_collector_handshake_failures_total", reason="connection_cap") == 110
        assert value(s, "grokwatch_collector_loop_errors_total", thread="receive") == 0
        assert all(t.is_alive() for t in c.ingest._threads)
    finally:
        for s in stalled:
            s.close()
        c.stop()


@pytest.mark.slow
def test_a_thousand_stalled_strangers_cannot_stop_ingest_or_metrics(tmp_path):
    """The reported case: a collector started with the soft limit of 1,024 descriptors, 1,100 stalled
    connections, an agent sending meanwhile. The collector raises its soft limit to the hard one, caps
    ingest connections below it, drops stalled greetings after the handshake timeout."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096 or soft < 2400:
        pytest.skip(f"descriptor limits {soft}/{hard}: too low to stage 1,100 connections from the test")
    endpoint, metrics = f"tcp://127.0.0.1:{free_port()}", free_port()
    env = {**os.environ, "GROKWATCH_HANDSHAKE_TIMEOUT_S": "2", "GROKWATCH_SNAPSHOT_INTERVAL_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "grokwatch.cli", "collector", "--listen", endpoint,
                             "--metrics-port", str(metrics), "--metrics-addr", "127.0.0.1",
                             "--state-dir", str(tmp_path / "state")], env=env,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stalled = []
    p = None
    try:
        wait_until(lambda: _readyz(metrics)[0] == 200 if _up(metrics) else False, timeout_s=60)
        p = Pusher(endpoint)
        p.send(encode(make_hello(seq=0)))
        stalled = _stall(_port(endpoint), 1100)
        for seq in range(1, 391):
            p.send(encode(make_routing(seq=seq, n=2, step=seq, sample_ids=[f"a{seq}", f"b{seq}"])))
            if seq % 100 == 0:
                time.sleep(0.5)  # snapshots rotate the log meanwhile
        # received counts a message at admission, samples_processed after its kernels (a worker thread):
        # on a loaded machine the kernels trail admission by seconds — wait for both, then nothing lost
        wait_until(lambda: (value(scrape(metrics), "grokwatch_collector_messages_received_total") == 391
                            and value(scrape(metrics), "grokwatch_collector_samples_processed_total") == 780),
                   timeout_s=60)
        s = scrape(metrics)
        assert value(s, "grokwatch_collector_messages_lost_total") == 0
        assert value(s, "grokwatch_collector_samples_processed_total") == 780
        assert sum(s["grokwatch_collector_persist_errors_total"].values()) == 0
        assert sum(s["grokwatch_collector_loop_errors_total"].values()) == 0
        assert _readyz(metrics)[0] == 200
        wait_until(lambda: value(scrape(metrics), "grokwatch_collector_handshake_failures_total",
                                 reason="incomplete") >= 1000, timeout_s=30)
        from grokwatch.collector.wal import _SYNC_BYTES

        for sock in stalled:  # a stranger gets libzmq's greeting at most: never a write-ahead record
            sock.setblocking(False)
            got = b""
            try:
                while chunk := sock.recv(65536):
                    got += chunk
            except (BlockingIOError, ConnectionResetError):
                pass
            assert _SYNC_BYTES not in got and len(got) <= 64, got[:80]
    finally:
        for sock in stalled:
            sock.close()
        if p is not None:
            p.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0


def _up(port: int) -> bool:
    try:
        scrape(port)
        return True
    except OSError:
        return False


def test_the_descriptor_limit_is_raised_to_the_hard_limit():
    from grokwatch.collector.ingest import raise_descriptor_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = ("import resource; from grokwatch.collector.ingest import raise_descriptor_limit; "
            "print(raise_descriptor_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard)))
    got, now = map(int, r.stdout.split())
    assert got == now == (hard if hard != resource.RLIM_INFINITY else max(256, 1 << 20))
    assert raise_descriptor_limit() >= soft


def test_readyz_says_what_is_not_working_and_recovers(tmp_path):
    """Before: /readyz answered 200 while the receive thread was dead and while nothing could be written."""
    c = start_collector(tmp_path)
    try:
        assert _readyz(c.metrics_port) == (200, "ok\n")
        assert c.wal is not None and c.wal._fd is not None
        good_fd = c.wal._fd
        c.wal._fd = os.open("/dev/full", os.O_WRONLY)
        p = Pusher(c.endpoints[0])
        p.send(encode(make_hello(seq=0)))
        wait_until(lambda: c.state.received_total == 1)
        code, body = _readyz(c.metrics_port)
        assert code == 503 and "write-ahead log" in body
        os.close(c.wal._fd)
        c.wal._fd = good_fd
        p.send(encode(make_routing(seq=1, n=2)))
        wait_until(lambda: c.state.received_total == 2)
        assert _readyz(c.metrics_port) == (200, "ok\n")
        p.close()
    finally:
        c.stop()


def test_an_unexpected_error_in_the_receive_loop_is_counted_and_survived(tmp_path, monkeypatch):
    c = start_collector(tmp_path)
    try:
        assert c.ingest is not None
        real, calls = c.ingest._accept, []

        def once_broken(data):
            calls.append(1)
            if len(calls) == 1:
                raise KeyError("a bug")
            real(data)

        monkeypatch.setattr(c.ingest, "_accept", once_broken)
        p = Pusher(c.endpoints[0])
        p.send(encode(make_hello(seq=0)))
        p.send(encode(make_hello(seq=1)))
        wait_until(lambda: c.state.received_total == 1)
        p.close()
        s = scrape(c.metrics_port)
        assert value(s, "grokwatch_collector_loop_errors_total", thread="receive") == 1
        assert all(t.is_alive() for t in c.ingest._threads) and _readyz(c.metrics_port)[0] == 200
    finally:
        c.stop()


@pytest.mark.slow
def test_thousands_of_idle_metrics_connections_cannot_keep_a_scrape_out(tmp_path):
    """Issue 34: 3,015 idle connections to /metrics filled the 64 connection slots, and 5 of 23 legitimate
    concurrent scrapes failed or took over a second. Idle connections now wait in a room that costs no
    thread; a scrape gets a worker as soon as it sends its request."""
    import threading

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if min(hard, 1 << 20) < 8192:
        pytest.skip(f"descriptor limit {hard}: too low for 3,000 connections on both sides in one process")
    c = start_collector(tmp_path)  # raises this process's soft limit to the hard one
    # The idle clients are another process, as an attacker's would be (in this one, the accept thread
    # would share the interpreter's lock with the loop that connects).
    code = ("import resource, socket, sys, time\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)\n"
            "idle = [socket.create_connection(('127.0.0.1', int(sys.argv[1]))) for _ in range(3000)]\n"
            "print('ready', flush=True)\n"
            "time.sleep(120)\n")
    idle = subprocess.Popen([sys.executable, "-c", code, str(c.metrics_port)], stdout=subprocess.PIPE, text=True)
    try:
        assert idle.stdout is not None and idle.stdout.readline().strip() == "ready"
        times, errors = [], []

        def one_scrape():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=10) as r:
                    assert r.status == 200 and b"grokwatch_collector_messages_received_total" in r.read()
                times.append(time.monotonic() - started)
            except Exception as exc:  # noqa: BLE001 — any failure is the finding
                errors.append(exc)

        threads = [threading.Thread(target=one_scrape) for _ in range(23)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors and len(times) == 23
        assert max(times) < 2.0, sorted(times)  # well inside Prometheus' 10 s scrape timeout
        assert _readyz(c.metrics_port)[0] == 200
        assert threading.active_count() < 200  # the idle ones hold no thread
    finally:
        idle.kill()
        idle.wait(10)
        c.stop()
