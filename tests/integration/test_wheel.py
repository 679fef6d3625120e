"""The package as a new user installs it: built wheel and sdist, clean venvs per extra set, no editable
install, the lowest and highest supported Python. Slow (venvs and installs from the package index)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

from helpers import free_port
from static_tools import COLLECTOR_SIDE, check_tools_resolve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("grokwatch", "grokwatch/demo", "grokwatch/agent", "grokwatch/wire", "grokwatch/collector")
# The unit tests that need neither torch nor transformers (the collector side).
# The Numba kernels (test_kernels.py, test_metric_names.py compile them) run in the main suite only.
TORCH_FREE_UNIT_TESTS = ("test_wire.py", "test_phases.py", "test_analysis.py", "test_cli.py")  # no Numba compile


def run(cmd, timeout=900, env_extra=None, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GROKWATCH_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env.update(env_extra or {})
    kw.setdefault("cwd", tempfile.gettempdir())  # never the checkout: its grokwatch/ folder would shadow the wheel
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env, **kw)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    src = tmp_path_factory.mktemp("src") / "grokwatch"
    # From what git tracks (as a clean clone has it), not from this checkout's build leftovers.
    files = run(["git", "ls-files", "-z"], cwd=ROOT).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist", "--outdir", out, src])
    return out


def venv(path: Path, python: str = sys.executable) -> Path:
    run([python, "-m", "venv", path])
    run([path / "bin" / "python", "-m", "pip", "install", "-q", "--upgrade", "pip"])
    return path / "bin"


def wheel_of(dist: Path) -> Path:
    (wheel,) = dist.glob("grokwatch-*.whl")
    return wheel


def test_the_wheel_and_sdist_hold_every_package_the_license_and_py_typed(dist):
    names = set(zipfile.ZipFile(wheel_of(dist)).namelist())
    for package in PACKAGES:
        assert f"{package}/__init__.py" in names, package
        assert f"{package}/py.typed" in names, package
    assert "grokwatch/demo/train.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = next(zipfile.ZipFile(wheel_of(dist)).read(n).decode() for n in names if n.endswith("METADATA"))
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Dist: tomli>=1.1; python_version < \"3.11\"" in metadata
    assert "datasketches" not in metadata
    for extra in ("collector", "report", "lightning", "otlp-grpc", "tensorboard"):
        assert f"Provides-Extra: {extra}" in metadata
    collector_deps = [ln for ln in metadata.splitlines() if 'extra == "collector"' in ln]
    assert collector_deps and not any("matplotlib" in ln for ln in collector_deps)
    (sdist,) = dist.glob("grokwatch-*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert "LICENSE" in members and "grokwatch/demo/__init__.py" in members


def _commands_work(bin_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "collector.toml"
    cfg.write_text('listen = ["tcp://127.0.0.1:5557"]\n')
    assert run([bin_dir / "grokwatch", "collector", "--check-config", cfg], cwd=tmp_path).stdout.strip() == \
        f"{cfg}: ok"
    assert "--state-dir" in run([bin_dir / "grokwatch", "report", "--help"], cwd=tmp_path).stdout
    assert "--steps" in run([bin_dir / "grokwatch", "demo", "--help"], cwd=tmp_path).stdout
    assert run([bin_dir / "grokwatch", "--version"], cwd=tmp_path).stdout.startswith("grokwatch ")


def _site_packages_mb(bin_dir: Path) -> float:
    lib = bin_dir.parent / "lib"
    return sum(f.stat().st_size for f in lib.rglob("*") if f.is_file()) / 2**20


def test_the_collector_extra_installs_without_torch_or_matplotlib_then_report_adds_it(dist, tmp_path):
    bin_dir = venv(tmp_path / "venv")
    run([bin_dir / "python", "-m", "pip", "install", "-q", f"{wheel_of(dist)}[collector]"])
    _commands_work(bin_dir, tmp_path)
    missing = run([bin_dir / "python", "-c", "import importlib.util as u; "
                   "print([m for m in ('torch', 'matplotlib', 'datasketches') if u.find_spec(m)])"]).stdout
    assert missing.strip() == "[]"
    print(f"collector-only install: {_site_packages_mb(bin_dir):.0f} MiB of site-packages")  # docs/deploy.md
    # The image's kernel build and a fresh pod's start (mostly one core compiling) beside the rest (installs,
    # static tools): none of these touches what the other reads; the documented start time is
    # bench/fast_start.py's, measured alone.
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    fast_start = pool.submit(_fast_start, bin_dir, tmp_path)
    try:
        # The report extra, on top: matplotlib for grokwatch report.
        run([bin_dir / "python", "-m", "pip", "install", "-q", f"{wheel_of(dist)}[report]"])
        run([bin_dir / "python", "-c", "import matplotlib, grokwatch.collector.report"])
        # Standard tools resolve the installed wheel (its py.typed files) from user code outside the checkout.
        (tmp_path / "user").mkdir()
        check_tools_resolve(bin_dir / "python", tmp_path / "user", COLLECTOR_SIDE)
        # The training side's extras resolve to torch (and Lightning) without installing them: a dry run (the
        # import of grokwatch.agent and grokwatch.demo with torch is what the rest of the suite does).
        for extra, needs in (("agent", "torch"), ("lightning", "lightning")):
            plan = run([bin_dir / "python", "-m", "pip", "install", "--dry-run", "torch==2.13.0",
                        f"{wheel_of(dist)}[{extra}]"]).stdout
            assert "Would install" in plan and needs in plan.split("Would install", 1)[1], plan[-2000:]
    finally:
        fast_start.result(timeout=600)  # its failures are this test's; a pod never left running
        pool.shutdown()


def _fast_start(bin_dir: Path, tmp_path: Path) -> None:
    """The image's build step (deploy/Dockerfile: the kernels compiled into a prebuilt cache), then a fresh
    'pod': an empty Numba cache directory, the prebuilt one named by GROKWATCH_KERNEL_CACHE. The collector
    must load the kernels, not compile them (its cache directory ends up holding the prebuilt files,
    unmodified), and serve /readyz; the time to ready is printed (under the test's other work: docs/deploy.md's
    figure is bench/fast_start.py's)."""
    import urllib.request

    prebuilt, fresh = tmp_path / "prebuilt", tmp_path / "pod-cache"
    run([bin_dir / "python", "-c", "from grokwatch.collector import warmup; warmup.warm_up()"],
        env_extra={"NUMBA_CACHE_DIR": str(prebuilt)})
    built = sorted(p.relative_to(prebuilt) for p in prebuilt.rglob("*") if p.is_file())
    assert built, "the build step wrote no kernel cache"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GROKWATCH_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env.update(NUMBA_CACHE_DIR=str(fresh), GROKWATCH_KERNEL_CACHE=str(prebuilt))
    started = time.monotonic()
    proc = subprocess.Popen([bin_dir / "grokwatch", "collector", "--listen", f"tcp://127.0.0.1:{free_port()}",
                             "--metrics-port", str(port), "--metrics-addr", "127.0.0.1"],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            assert proc.poll() is None, "the collector exited"
            assert time.monotonic() - started < 300  # a busy machine; the figure: bench/fast_start.py
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.05)
        ready_s = time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(30)
    # Loaded, not compiled: the same files, none rewritten (a compile would save each again, newer).
    assert sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file()) == built
    for rel in built:
        assert (fresh / rel).stat().st_mtime_ns == (prebuilt / rel).stat().st_mtime_ns, rel
    print(f"fresh collector with the prebuilt kernel cache: /readyz after {ready_s:.2f} s")  # docs/deploy.md


def _pyenv_python(minor: str) -> str:
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(root.glob(f"{minor}.*/bin/python{minor}")) if root.is_dir() else []
    if not found:
        pytest.skip(f"no Python {minor} here (pyenv)")
    return str(found[-1])


def _collector_unit_tests_on(dist: Path, tmp_path: Path, python: str) -> str:
    tmp_path.mkdir()
    bin_dir = venv(tmp_path / "venv", python)
    run([bin_dir / "python", "-m", "pip", "install", "-q", f"{wheel_of(dist)}[collector]", "pytest>=8",
         "pytest-timeout>=2.3", "hypothesis>=6.100"])
    _commands_work(bin_dir, tmp_path)
    tests = tmp_path / "tests"  # a copy: nothing of the checkout is importable from there
    shutil.copytree(ROOT / "tests", tests, ignore=shutil.ignore_patterns("__pycache__"))
    return run([bin_dir / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                "--rootdir", tmp_path, *[tests / "unit" / t for t in TORCH_FREE_UNIT_TESTS]], cwd=tmp_path,
               timeout=1500).stdout


def test_the_collector_unit_tests_pass_on_the_lowest_and_highest_python(dist, tmp_path):
    """The wheel's collector side on Python 3.10 and 3.13, each in a fresh venv: its commands run and the
    torch-free unit tests pass (Numba compiling every kernel cold). The two run at once: each is mostly one
    core's work (pip, then the compiles), and in turn they took ~29 s apiece of the suite's time."""
    from concurrent.futures import ThreadPoolExecutor

    pythons = {minor: _pyenv_python(minor) for minor in ("3.10", "3.13")}  # skips unless both are here
    with ThreadPoolExecutor(len(pythons)) as pool:
        outs = dict(zip(pythons, pool.map(lambda m: _collector_unit_tests_on(dist, tmp_path / m, pythons[m]),
                                          pythons)))
    for minor, out in outs.items():
        assert " passed" in out and " failed" not in out, (minor, out[-2000:])
