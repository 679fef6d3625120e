"""ZeroMQ CURVE keys, shared by both sides (the collector's allow-list and the agent's client key).
Here, not in ``grokwatch.wire``: the wire contract needs only numpy and msgpack, keys need pyzmq.

    grokwatch keygen --out /etc/grokwatch/keys --name collector   # collector.key, collector.key_secret
    grokwatch keygen --out /etc/grokwatch/keys --name agent       # one per job (or per node)

A ``.key`` file holds a public key, a ``.key_secret`` file the public and the secret key (ZeroMQ's
certificate format, ``zmq.auth``). The collector binds with its secret key and admits the clients
whose public keys are in its allow-list directory; an agent connects with the collector's public key
and its own secret key. Needs only pyzmq (libzmq with CURVE, as its wheels ship).
"""

from __future__ import annotations

import os

import zmq
import zmq.auth


class KeyError_(ValueError):
    """A key file that is missing or not a ZeroMQ certificate (the message names it)."""


def load_public(path: str) -> bytes:
    public, _ = _load(path)
    return public


def load_secret(path: str) -> tuple[bytes, bytes]:
    public, secret = _load(path)
    if not secret:
        raise KeyError_(f"{path}: holds no secret key (use the .key_secret file)")
    return public, secret


def _load(path: str):
    if not zmq.has("curve"):
        raise KeyError_("this libzmq has no CURVE support")
    if not os.path.isfile(path):
        raise KeyError_(f"{path}: no such key file")
    try:
        return zmq.auth.load_certificate(path)
    except Exception as exc:
        raise KeyError_(f"{path}: not a ZeroMQ certificate ({exc})") from None


def generate(directory: str, name: str) -> tuple[str, str]:
    """Write ``name.key`` and ``name.key_secret`` (mode 0600) in ``directory``; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret
