"""grokwatch.wire — the contract between agent and collector (protocol v1).

Imported by both sides; needs only numpy and msgpack. Format: docs/wire.md.

    from grokwatch.wire import Routing, encode, decode, WireError
    msg = decode(encode(routing))   # raises only WireError for bad bytes
"""

from grokwatch.wire.codec import decode, encode, peek_route, peek_sequence
from grokwatch.wire.errors import REASONS, WireError
from grokwatch.wire.limits import DEFAULT_LIMITS, DEFAULT_MAX_MESSAGE_BYTES, Limits
from grokwatch.wire.messages import (
    AGENT_DROP_REASONS,
    DISTRIBUTIONS,
    FRESH_PREFIX,
    KINDS,
    PROTOCOL_VERSION,
    SOURCES,
    Eval,
    Heartbeat,
    Hello,
    Loss,
    Message,
    Routing,
    is_wandb_run,
)

__all__ = [
    "AGENT_DROP_REASONS",
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DISTRIBUTIONS",
    "FRESH_PREFIX",
    "KINDS",
    "PROTOCOL_VERSION",
    "REASONS",
    "SOURCES",
    "Eval",
    "Heartbeat",
    "Hello",
    "Limits",
    "Loss",
    "Message",
    "Routing",
    "WireError",
    "decode",
    "encode",
    "is_wandb_run",
    "peek_route",
    "peek_sequence",
]
