"""Every configuration value bounded and finite (issue 29): hostile values for every key, from a file and from
the environment, give one ConfigError naming the key — never a traceback, never a value that passes
--check-config and then fails at start, never an infinite timer or a loop of 10^12."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from grokwatch.collector.config import BOUNDS, CollectorConfig, ConfigError, load_config

FIELDS = {f.name: f for f in dataclasses.fields(CollectorConfig)}
NUMERIC = sorted(k for k, f in FIELDS.items() if f.type in ("int", "float"))
HOSTILE = [math.inf, -math.inf, math.nan, 1e12, 2**62, 2**64, -1, -1e-9, 0, 3.5, 1e-300, "abc", "", True, [1], {"a": 1}]


def test_every_numeric_key_has_bounds():
    assert set(NUMERIC) == set(BOUNDS), set(NUMERIC) ^ set(BOUNDS)


def _outcome(load, key):
    try:
        config = load()
    except ConfigError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith(key), msg  # one line, naming the key
        return "refused"
    value = getattr(config, key)
    lo, hi, ends = BOUNDS[key]
    assert isinstance(value, (int, float)) and not isinstance(value, bool)
    assert (lo <= value <= hi) and value == value, (key, value)
    assert math.isfinite(value) or (hi == math.inf and key.startswith("phase_") and key.endswith("_tol"))
    return "accepted"


@pytest.mark.parametrize("key", NUMERIC)
def test_every_key_refuses_hostile_values_in_one_line(key, tmp_path):
    outcomes = []
    for i, bad in enumerate(HOSTILE):
        outcomes.append(_outcome(lambda bad=bad: CollectorConfig(**{key: bad}), key))
        env = {"GROKWATCH_" + key.upper(): str(bad)}
        outcomes.append(_outcome(lambda env=env: load_config(environ=env), key))
        if isinstance(bad, float) and not math.isfinite(bad):
            text = f"{key} = {'nan' if bad != bad else ('inf' if bad > 0 else '-inf')}\n"
        elif isinstance(bad, str):
            text = f'{key} = "{bad}"\n'
        elif isinstance(bad, bool):
            text = f"{key} = true\n"
        elif isinstance(bad, dict):
            text = f"{key} = {{a = 1}}\n"
        else:
            text = f"{key} = {bad}\n"
        path = tmp_path / f"c{i}.toml"
        path.write_text(text)
        outcomes.append(_outcome(lambda path=path: load_config(str(path), environ={}), key))
    assert "refused" in outcomes  # every key has a range to leave


def test_epsilons_are_bounded_too():
    for bad in ("a=nan", "a=inf", "a=-1", "a=x"):
        with pytest.raises(ConfigError, match="^memorization_epsilon"):
            load_config(environ={"GROKWATCH_MEMORIZATION_EPSILON": bad})


@pytest.mark.parametrize("text", ["seed = -1", "max_message_bytes = 4611686018427387904", "queue_capacity = inf",
                                  "snapshot_interval_s = 1e12", "comparisons_per_sample = 1e12", "pathway_tau = nan"])
def test_check_config_refuses_what_start_would_in_one_line(tmp_path, text):
    """Before: `inf` in an integer key gave a 23-26-line traceback from --check-config too; seed = -1 and
    max_message_bytes = 2^62 passed --check-config and failed at start."""
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    for args in (["--check-config", str(path)],
                 ["--config", str(path), "--metrics-port", "0", "--listen", "tcp://127.0.0.1:0"]):
        r = subprocess.run([sys.executable, "-m", "grokwatch.cli", "collector", *args], capture_output=True,
                           text=True, timeout=60)
        out = (r.stdout + r.stderr).strip().splitlines()
        assert r.returncode == 2 and len(out) == 1, out
        assert text.split()[0] in out[0]


def test_config_check_is_the_verb_form_of_check_config_and_show_prints_a_file_that_reads_back(tmp_path):
    """Issue 32: `grokwatch config check FILE` (as `promtool check config`) refuses what start would, in one
    line; `grokwatch config show` prints the effective settings (file, then GROKWATCH_* variables) as TOML
    that loads back to the same config."""
    import os

    bad = tmp_path / "bad.toml"
    bad.write_text("queue_capacity = inf\n")
    r = subprocess.run([sys.executable, "-m", "grokwatch.cli", "config", "check", str(bad)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and len((r.stdout + r.stderr).strip().splitlines()) == 1 and "queue_capacity" in r.stdout
    good = tmp_path / "good.toml"
    good.write_text('window_samples = 128\nphase_consistency_abs_tol = inf\nmemorization_epsilon = {math = 0.5}\n'
                    'listen = ["tcp://127.0.0.1:5999"]\n')
    r = subprocess.run([sys.executable, "-m", "grokwatch.cli", "config", "check", str(good)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"{good}: ok"
    env = {**os.environ, "GROKWATCH_COMPARISONS_PER_SAMPLE": "7"}
    r = subprocess.run([sys.executable, "-m", "grokwatch.cli", "config", "show", "--config", str(good)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    shown = tmp_path / "shown.toml"
    shown.write_text(r.stdout)
    again = load_config(str(shown), environ={})
    assert again == load_config(str(good), environ={"GROKWATCH_COMPARISONS_PER_SAMPLE": "7"})
    assert again.window_samples == 128 and again.comparisons_per_sample == 7
    # and where each value came from
    lines = dict(line.split(" = ", 1) for line in r.stdout.splitlines() if not line.startswith("#"))
    assert lines["window_samples"] == f"128  # file {good}"
    assert lines["comparisons_per_sample"] == "7  # env GROKWATCH_COMPARISONS_PER_SAMPLE"
    assert lines["pathway_tau"].endswith("# default")


def test_collector_print_config_says_where_each_value_came_from_flags_included(tmp_path):
    """Issue 32: `grokwatch collector ... --print-config` prints what that very command line would run with —
    the flags over GROKWATCH_* variables over the --config file over the defaults — each value with its
    source, as TOML that loads back to the same settings; a flag out of range is refused in one line."""
    import os

    path = tmp_path / "c.toml"
    path.write_text('window_samples = 128\nstate_dir = "/from/file"\nmetrics_port = 9100\n')
    env = {**os.environ, "GROKWATCH_COMPARISONS_PER_SAMPLE": "7", "GROKWATCH_METRICS_PORT": "9200"}
    r = subprocess.run([sys.executable, "-m", "grokwatch.cli", "collector", "--config", str(path), "--state-dir",
                        str(tmp_path / "state"), "--listen", "tcp://127.0.0.1:5998", "--print-config"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" = ", 1) for line in r.stdout.splitlines() if not line.startswith("#"))
    assert lines["state_dir"] == f'"{tmp_path / "state"}"  # flag'  # the flag beats the file
    assert lines["listen"] == '["tcp://127.0.0.1:5998"]  # flag'
    assert lines["metrics_port"] == "9200  # env GROKWATCH_METRICS_PORT"  # the variable beats the file
    assert lines["window_samples"] == f"128  # file {path}"
    assert lines["comparisons_per_sample"] == "7  # env GROKWATCH_COMPARISONS_PER_SAMPLE"
    assert lines["pathway_tau"].endswith("# default")
    assert not (tmp_path / "state").exists()  # printed, not started
    shown = tmp_path / "shown.toml"
    shown.write_text(r.stdout)
    assert load_config(str(shown), environ={}) == load_config(
        str(path), environ={"GROKWATCH_COMPARISONS_PER_SAMPLE": "7", "GROKWATCH_METRICS_PORT": "9200"},
        overrides={"state_dir": str(tmp_path / "state"), "listen": ("tcp://127.0.0.1:5998",)})
    r = subprocess.run([sys.executable, "-m", "grokwatch.cli", "collector", "--metrics-port", "99999",
                        "--print-config"], capture_output=True, text=True, timeout=60)
    out = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == 2 and len(out) == 1 and "metrics_port" in out[0]
