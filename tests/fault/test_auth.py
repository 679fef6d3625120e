"""CURVE: with keys, only agents whose public key is in the collector's allow-list get a message in;
a stranger's key, or a plain socket, is refused at the handshake and counted — never applied."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import zmq
from helpers import Pusher, scrape, start_collector, value, wait_until
from tiny_models import VOCAB, tiny_model
from wire_factories import make_hello, make_routing

import grokwatch.agent as gw
from grokwatch.collector.config import CollectorConfig, ConfigError
from grokwatch.keys import generate
from grokwatch.wire import encode

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


@pytest.fixture
def keys(tmp_path):
    allowed = tmp_path / "allowed"
    server = generate(str(tmp_path / "server"), "collector")
    agent = generate(str(allowed), "agent")
    stranger = generate(str(tmp_path / "elsewhere"), "stranger")
    return dict(server=server, agent=agent, stranger=stranger, allowed=str(allowed))


def _train(mon, model, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for i in range(steps):
        ids = torch.randint(0, VOCAB, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_only_allowed_keys_get_in_and_refusals_are_counted(tmp_path, keys):
    c = start_collector(tmp_path, curve_secret_key=keys["server"][1], curve_allowed_clients=keys["allowed"])
    try:
        model = tiny_model("olmoe")
        good = gw.attach(model, c.endpoints[0], "allowed", every_n_steps=1, curve_server_key=keys["server"][0],
                         curve_secret_key=keys["agent"][1])
        _train(good, model)
        good.close()
        wait_until(lambda: c.state.samples_total >= 6, timeout_s=20)
        bad = gw.attach(tiny_model("olmoe"), c.endpoints[0], "intruder", every_n_steps=1,
                        curve_server_key=keys["server"][0], curve_secret_key=keys["stranger"][1])
        plain = Pusher(c.endpoints[0])
        # No handshake ever completes for it, so PUSH may have no pipe to queue on: never block on that.
        plain.sock.setsockopt(zmq.SNDTIMEO, 200)
        for msg in (make_hello(run="plain", seq=0), make_routing(run="plain", seq=1)):
            try:
                plain.send(encode(msg))
            except zmq.Again:
                pass
        _train(bad, bad.model)
        wait_until(lambda: c.state.handshake_failures.get("auth", 0) >= 1, timeout_s=20)
        # a plain client: refused for its mechanism ("protocol"), or, when libzmq gives no detail, as a
        # handshake never completed ("incomplete")
        wait_until(lambda: c.state.handshake_failures.get("protocol", 0)
                   + c.state.handshake_failures.get("incomplete", 0) >= 1, timeout_s=20)
        bad.close()
        plain.close()
        s = scrape(c.metrics_port)
        assert set(c.state.shapes) == {"allowed"}
        assert value(s, "grokwatch_collector_handshake_failures_total", reason="auth") >= 1
    finally:
        c.stop()


def test_curve_settings_fail_fast(tmp_path, keys):
    with pytest.raises(ConfigError, match="set both"):
        CollectorConfig(curve_secret_key=keys["server"][1])
    with pytest.raises(ConfigError, match="curve_secret_key"):
        CollectorConfig(curve_secret_key=str(tmp_path / "nope"), curve_allowed_clients=keys["allowed"])
    with pytest.raises(ValueError, match="curve"):
        gw.attach(tiny_model("olmoe"), "tcp://127.0.0.1:1", "x", curve_server_key=keys["server"][0])


def test_keygen_writes_a_pair_with_a_private_secret(tmp_path):
    out = subprocess.run([sys.executable, "-m", "grokwatch.cli", "keygen", "--out", str(tmp_path), "--name", "job"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "job.key").exists() and oct((tmp_path / "job.key_secret").stat().st_mode & 0o777) == "0o600"
