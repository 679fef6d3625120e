"""Facts about the agent that several of its parts read, each with one owner (issue 30).

``Identity``: this process's rank and world size. The monitor owns it (from torch.distributed at attach, or
learned later); the sampler numbers untagged rows with it and the sender's messages carry it, both by reading
this one object. The errors and the disabled flag have theirs in ``capture.Faults``; whether the routers'
weights give cosines, ``Capture.has_cosines``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Identity:
    rank: int = 0
    world_size: int = 1
