"""The command line as a user meets it: --version, global flags anywhere, bad values refused, misspelt
variables named, JSON logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from grokwatch import __version__
from grokwatch.envvars import known_variables, unknown_variables


def cli(*args, env=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROKWATCH_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "grokwatch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_version_flag():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"grokwatch {__version__}"


@pytest.mark.parametrize("argv", [["--log-level", "DEBUG", "version"], ["version", "--log-level", "DEBUG"],
                                  ["version", "--log-level", "debug", "--log-format", "json"]])
def test_global_flags_before_or_after_the_subcommand(argv):
    from grokwatch.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.log_level == "DEBUG"


def test_the_later_log_level_wins_and_absent_after_keeps_the_first():
    from grokwatch.cli import build_parser

    assert build_parser().parse_args(["--log-level", "ERROR", "version", "--log-level", "debug"]).log_level == "DEBUG"
    assert build_parser().parse_args(["--log-level", "ERROR", "version"]).log_level == "ERROR"


@pytest.mark.parametrize("argv, env", [(["collector", "--log-level", "bogus"], {}),
                                       (["--log-format", "xml", "version"], {}),
                                       (["version"], {"GROKWATCH_LOG_LEVEL": "loud"})])
def test_an_invalid_global_value_is_refused_with_exit_2(argv, env):
    result = cli(*argv, env=env)
    assert result.returncode == 2
    assert "error" in result.stderr and "Traceback" not in result.stderr


def test_a_misspelt_variable_is_named_with_the_nearest_known_one():
    result = cli("version", env={"GROKWATCH_METRIC_PORT": "9999", "GROKWATCH_STATE_DIR": "/tmp"})
    assert result.returncode == 0
    lines = [ln for ln in result.stderr.splitlines() if "GROKWATCH_" in ln]
    assert len(lines) == 1, result.stderr
    assert "GROKWATCH_METRIC_PORT" in lines[0] and "did you mean GROKWATCH_METRICS_PORT?" in lines[0]


def test_every_variable_the_code_reads_is_known():
    """The list behind the warning holds what the agent, the CLI and the collector read (no false warning)."""
    assert unknown_variables({"GROKWATCH_ENDPOINT": "tcp://x:1", "GROKWATCH_RUN": "r", "GROKWATCH_LISTEN": "x",
                              "GROKWATCH_SNAPSHOT_INTERVAL_S": "10", "GROKWATCH_CURVE_SECRET_KEY": "k",
                              "GROKWATCH_LOG_FORMAT": "json"}) == []
    import importlib.util
    import re
    from pathlib import Path

    read = set()
    for package in ("grokwatch", "grokwatch.agent", "grokwatch.collector"):  # the checkout's or the installed files
        for folder in importlib.util.find_spec(package).submodule_search_locations:
            for path in Path(folder).glob("*.py"):
                read |= set(re.findall(r'"(GROKWATCH_[A-Z_]+)"', path.read_text()))
    assert read and read - {"GROKWATCH_"} <= set(known_variables())


def test_json_log_format_is_one_object_a_line():
    result = cli("--log-format", "json", "version", env={"GROKWATCH_RUNN": "x"})
    assert result.returncode == 0
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    record = json.loads(line)
    assert record["level"] == "WARNING" and "GROKWATCH_RUNN" in record["message"] and record["time"].endswith("Z")


def test_the_prebuilt_kernel_cache_is_copied_only_into_an_empty_cache(tmp_path):
    from grokwatch.collector.kernels import seed_cache

    prebuilt = tmp_path / "prebuilt"
    (prebuilt / "sub").mkdir(parents=True)
    (prebuilt / "sub" / "k.nbi").write_text("index")
    target = tmp_path / "cache"
    (target / "sub").mkdir(parents=True)  # importing the kernels makes Numba's (empty) cache directories
    env = {"GROKWATCH_KERNEL_CACHE": str(prebuilt), "NUMBA_CACHE_DIR": str(target)}
    assert seed_cache(env) == 1 and (target / "sub" / "k.nbi").read_text() == "index"
    (target / "sub" / "k.nbi").write_text("newer")
    assert seed_cache(env) == 0 and (target / "sub" / "k.nbi").read_text() == "newer"  # never over a cache in use
    assert seed_cache({"NUMBA_CACHE_DIR": str(target)}) == 0
    assert seed_cache({"GROKWATCH_KERNEL_CACHE": str(tmp_path / "none"), "NUMBA_CACHE_DIR": str(tmp_path / "x")}) == 0


def test_the_variable_list_is_the_collectors_config_and_the_agent_never_imports_the_collector():
    """Issue 30: the agent's attach() warns about unknown GROKWATCH_* variables from a static list (agent ->
    collector would be an import edge against the data path); the list is the collector's config, key by key."""
    import dataclasses
    import subprocess
    import sys

    from grokwatch.collector.config import CollectorConfig
    from grokwatch.envvars import COLLECTOR_KEYS

    assert COLLECTOR_KEYS == tuple(f.name.upper() for f in dataclasses.fields(CollectorConfig))
    code = ("import sys\n"
            "try:\n    import grokwatch.agent\n"  # where the agent is installed (the collector wheel has no torch)
            "except ImportError:\n    pass\n"
            "from grokwatch.envvars import warn_unknown\n"
            "assert warn_unknown({'GROKWATCH_WINDOW_SAMPLE': '8'})\n"
            "bad = sorted(m for m in sys.modules if m.startswith('grokwatch.collector'))\n"
            "print('collector modules:', bad)\n"
            "sys.exit(1 if bad else 0)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
