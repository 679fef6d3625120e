"""Read a W&B run file (``run-<id>.wandb``, what wandb writes in offline mode) back into its records.

The file is a LevelDB log (the format W&B documents for its transaction log): a 7-byte header (":W&B", magic
0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header (CRC-32, length, type: 1 full,
2 first, 3 middle, 4 last; a block's last < 7 bytes are padding), each record a ``wandb_internal_pb2.Record``;
``records`` returns the complete ones (the file may still be being written).
wandb 0.2x writes it from its Go core and no longer ships a Python reader."""

from __future__ import annotations

import glob
import json
import struct
import time
import zlib

BLOCK = 32 * 1024


def records(path: str) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    if len(data) < 7:
        return []  # not yet written
    assert data[:4] == b":W&B", data[:7]
    pos, out, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            break  # a chunk still being written: the records before it
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        assert crc == zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF, f"bad chunk at {pos}"
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def read_run(wandb_dir: str, run_id: str, timeout_s: float = 30.0) -> dict:
    """The offline run ``run_id`` under ``wandb_dir``: its history rows, metric definitions and alerts. The file
    is written by wandb's own service process, which may still be writing when ``run.finish()`` has returned:
    read once it holds the run's ``exit`` record (the last wandb writes), within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        paths = glob.glob(f"{wandb_dir}/wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
        recs = records(paths[0]) if len(paths) == 1 else []
        if any(rec.WhichOneof("record_type") == "exit" for rec in recs) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(paths) == 1, paths
    history, metrics, alerts, run, config = [], [], [], None, {}
    for rec in recs:
        kind = rec.WhichOneof("record_type")
        for item in (rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else ()):
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "metric":
            metrics.append(rec.metric)
        elif kind == "alert":
            alerts.append(rec.alert)
        elif kind == "run":
            run = rec.run
    return dict(history=history, metrics=metrics, alerts=alerts, run=run, config=config)


def offline(tmp_dir: str, **kwargs) -> dict:
    """``wandb.init`` keywords of a quiet offline run written under ``tmp_dir`` (the training's side in the tests)."""
    import wandb

    return dict(mode="offline", dir=tmp_dir, settings=wandb.Settings(silent=True, console="off",
                                                                       x_disable_stats=True), **kwargs)
