"""A PULL socket that decodes what the agent sends: the integration tests' receiving end, and the
worked-example drivers' (tests/integration/*_driver.py, run in subprocesses)."""

from __future__ import annotations

import time

import zmq

from grokwatch.wire import Routing, decode


class Sink:
    """A PULL socket on loopback that decodes everything it receives."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.messages = []

    def drain(self, timeout_s: float = 3.0, until=None):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                self.messages.append(decode(self.sock.recv()))
                continue
            if until is not None and until(self.messages):
                break
        return self.messages

    def routing(self, source=None):
        return [m for m in self.messages if isinstance(m, Routing) and (source is None or m.source == source)]

    def wait_routing(self, n: int = 1, source=None, timeout_s: float = 3.0) -> list[Routing]:
        """Drain until ``n`` routing messages (of ``source``) have come and nothing more is arriving, then
        all of them (at least ``n`` unless the wait timed out)."""
        self.drain(timeout_s, until=lambda ms: len(self.routing(source)) >= n)
        return self.routing(source)

    def close(self):
        self.sock.close(0)
        self.ctx.term()
