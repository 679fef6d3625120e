"""Process helpers the benchmarks share."""

from __future__ import annotations


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
