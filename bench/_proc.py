"""Process helpers the benchmarks share."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on loopback now (the benchmarks' and the tests' one way to pick one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """A process's resident set (VmRSS) in MB, or NaN when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
