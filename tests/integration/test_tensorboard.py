"""The collector's TensorBoard event files, read back with TensorBoard's own reader."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from blocks import BLOCK_TORCH, block
from grokwatch.collector.tensorboard import raw_histogram
from helpers import scrape, scrape_after, send_all, start_collector, value
from wire_factories import make_eval, make_hello, make_routing


MIXED = ("math", "code") * 3


def _read(path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_scalars_and_histograms_per_run_source_and_group_equal_what_is_exported(tmp_path):
    tb = tmp_path / "tb"
    c = start_collector(tmp_path, tensorboard_dir=str(tb), tensorboard_interval_s=3600)
    rng = np.random.default_rng(5)
    try:
        send_all(c, [make_hello(), make_routing(rng=rng, seq=1, n=6, step=10, concentration=0.3, groups=MIXED)])
        first = scrape(c.metrics_port)
        c.tensorboard.write_once()
        send_all(c, [make_routing(rng=rng, seq=2, n=6, step=20, concentration=0.3, groups=MIXED),
                     make_eval(seq=3, step=20, scores={"math": 0.25})])
        second = scrape_after(c.metrics_port, lambda s: value(s, "grokwatch_collector_messages_received_total") == 4)
    finally:
        c.stop()  # the final write
    acc = _read(tb / "run-a")
    tags = acc.Tags()
    group = dict(run="run-a", source="train", group="math")
    entropy = acc.Scalars("train/math/routing_entropy_ratio/layer0")
    assert [e.step for e in entropy] == [10, 20]
    assert entropy[-1].value == pytest.approx(value(second, "grokwatch_routing_entropy_ratio", **group, layer="0"),
                                              rel=1e-6)
    assert [e.value for e in acc.Scalars("eval/math")] == [pytest.approx(0.25)]
    assert [e.step for e in acc.Scalars("train/math/phase")] == [10, 20]
    # The histogram at step 20 holds only the samples that arrived since step 10.
    hist = acc.Histograms("train/math/pathway_distance")
    assert [h.step for h in hist] == [10, 20]
    n1 = value(first, "grokwatch_pathway_distance_count", **group)
    n2 = value(second, "grokwatch_pathway_distance_count", **group)
    assert hist[0].histogram_value.num == n1 and hist[1].histogram_value.num == n2 - n1
    assert sum(hist[1].histogram_value.bucket) == n2 - n1
    s1 = value(first, "grokwatch_pathway_distance_sum", **group)
    s2 = value(second, "grokwatch_pathway_distance_sum", **group)
    assert acc.Scalars("train/math/pathway_distance_mean")[-1].value == pytest.approx((s2 - s1) / (n2 - n1), rel=1e-5)
    assert "train/_cross/pathway_distance" in tags["histograms"]


def test_raw_histogram_buckets_and_edges():
    raw = raw_histogram([0.0, 1.0, 2.0], [0, 3, 1, 2])
    assert raw["bucket_limits"] == [0.0, 1.0, 2.0, 3.0] and raw["bucket_counts"] == [0, 3, 1, 2]
    assert raw["num"] == 6 and raw["min"] == 0.0 and raw["max"] == 3.0
    assert raw_histogram([0.0, 1.0], [0, 0, 0]) is None


def test_tensorboard_files_are_written_without_torch(tmp_path):
    code = BLOCK_TORCH + (
        "from grokwatch.collector.config import CollectorConfig\n"
        "from grokwatch.collector.state import State\n"
        "from grokwatch.collector.tensorboard import TensorBoardView\n"
        f"v = TensorBoardView(State(CollectorConfig()), {str(tmp_path)!r})\n"
        "v.write_once(); v.shutdown()\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_without_tensorboardx_the_start_is_one_line(tmp_path):
    code = block("tensorboardX") + (
        "from grokwatch.cli import main\n"
        f"main(['collector', '--listen', 'tcp://127.0.0.1:0', '--metrics-port', '0', '--tensorboard', {str(tmp_path)!r}])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "grokwatch[tensorboard]" in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_the_layer_by_expert_load_matrix_is_an_image_at_its_intervals_step(tmp_path):
    """Issue 31: the all-token counts' share matrix as a TensorBoard image (rows layers, columns experts, each
    layer scaled to its busiest expert)."""
    import dataclasses
    import io

    from PIL import Image

    tb = tmp_path / "tb"
    c = start_collector(tmp_path, tensorboard_dir=str(tb), tensorboard_interval_s=3600)
    counts = np.arange(4 * 8, dtype=np.uint64).reshape(4, 8) + 1
    counts[2, 5] = 0  # a dead expert: black
    try:
        for seq, step in ((1, 10), (2, 20)):  # a world of one rank: each step's interval closes at once
            send_all(c, ([make_hello()] if seq == 1 else []) + [dataclasses.replace(
                make_routing(seq=seq, n=2, step=step), expert_tokens_LE=counts * seq, counted_forwards=1)])
            c.tensorboard.write_once()
            c.tensorboard.write_once()  # nothing new: no second image of the interval
    finally:
        c.stop()
    events = _read(tb / "run-a").Images("router/expert_load")
    assert [e.step for e in events] == [10, 20]
    event = events[0]
    assert (event.width, event.height) == (8, 4)
    pixels = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("L"), dtype=np.float64)
    want = counts / counts.max(axis=1, keepdims=True) * 255
    np.testing.assert_allclose(pixels, want, atol=1.0)
    assert pixels[2, 5] == 0
