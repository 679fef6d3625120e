"""The collector side runs where torch is not installed; the CLI surface is stable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from blocks import BLOCK_TORCH
from grokwatch.cli import build_parser


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=120)


def test_collector_and_wire_import_without_torch():
    result = run_python(
        "import grokwatch.wire, grokwatch.collector\n"
        "from grokwatch.collector import service, state, view, prometheus, otlp, kernels, ingest, persist\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_wire_contract_imports_only_numpy_and_msgpack():
    """ARCHITECTURE.md: grokwatch.wire may import numpy and msgpack only (both sides load it)."""
    result = run_python(
        "import importlib, pkgutil, grokwatch.wire\n"
        "for m in pkgutil.iter_modules(grokwatch.wire.__path__): importlib.import_module('grokwatch.wire.' + m.name)\n"
        "assert not {'zmq', 'torch', 'numba'} & set(sys.modules), sorted({'zmq', 'torch', 'numba'} & set(sys.modules))\n"
        "print('ok')\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_torch_block_really_blocks():
    result = run_python("import torch\n")
    assert result.returncode != 0 and "blocked" in result.stderr


def test_collector_cli_help_runs_without_torch():
    result = run_python("from grokwatch.cli import main\nmain(['collector', '--help'])\n")
    assert result.returncode == 0 and "--listen" in result.stdout


@pytest.mark.parametrize("command", ["collector", "demo", "report", "version", "replay", "correlate"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, "--help"])
    assert info.value.code == 0
    assert "usage: grokwatch " + command in capsys.readouterr().out


def test_version_command_prints_the_version():
    from grokwatch import __version__

    result = subprocess.run([sys.executable, "-m", "grokwatch.cli", "version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"grokwatch {__version__}"


def test_bad_collector_config_fails_fast_with_one_readable_line(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text('pathway_tau = 3.0\n')
    result = subprocess.run([sys.executable, "-m", "grokwatch.cli", "collector", "--check-config", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stdout.strip().splitlines() == ["grokwatch collector: pathway_tau: a finite number in (0.0, 1.0], got 3.0"]
    good = tmp_path / "ok.toml"
    good.write_text('listen = ["tcp://127.0.0.1:5557"]\ndistance_unit = "string"\n')
    result = subprocess.run([sys.executable, "-m", "grokwatch.cli", "collector", "--check-config", str(good)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unknown_config_key_is_named(tmp_path):
    from grokwatch.collector.config import ConfigError, load_config

    bad = tmp_path / "c.toml"
    bad.write_text('pathway_tua = 0.5\n')
    with pytest.raises(ConfigError, match="pathway_tua: unknown key"):
        load_config(str(bad), environ={})


def test_environment_overrides_file_and_flags_override_environment(tmp_path):
    from grokwatch.collector.config import load_config

    f = tmp_path / "c.toml"
    f.write_text('comparisons_per_sample = 4\nwindow_samples = 10\n')
    cfg = load_config(str(f), overrides={"window_samples": 20}, environ={"GROKWATCH_COMPARISONS_PER_SAMPLE": "8",
                                                                         "GROKWATCH_WINDOW_SAMPLES": "30"})
    assert cfg.comparisons_per_sample == 8 and cfg.window_samples == 20
