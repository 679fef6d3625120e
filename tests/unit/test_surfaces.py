"""The project's public surfaces, frozen (issue 30): a CLI flag, an ``attach()`` keyword, a collector config key
or an environment variable that appears or vanishes fails here until tests/golden/surfaces.json says so
(``GROKWATCH_UPDATE_GOLDEN=1 pytest tests/unit/test_surfaces.py`` rewrites it: the diff is the announcement
a reviewer reads). And the module graph stays one-way: no import circle among the project's modules."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "surfaces.json"
# The source folders and the package names they are installed under (pyproject's package-dir).
PACKAGES = {"grokwatch": "grokwatch", "grokwatch.collector": "collector", "grokwatch.agent": "agent",
            "grokwatch.wire": "wire"}


def surfaces() -> dict:
    from grokwatch.agent.attach import attach
    from grokwatch.agent.config import AgentConfig
    from grokwatch.cli import build_parser
    from grokwatch.collector.config import CollectorConfig
    from grokwatch.envvars import known_variables

    cli = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in sorted(action.choices.items()):
                    cli[(prefix + " " + name).strip()] = sorted(
                        [o for a in sub._actions for o in a.option_strings]
                        + [a.dest.upper() for a in sub._actions if not a.option_strings
                           and not isinstance(a, argparse._SubParsersAction)])
                    walk(sub, prefix + " " + name)

    walk(build_parser(), "")
    keywords = [p for p in inspect.signature(attach).parameters if p not in ("model", "options")]
    return {
        "cli": cli,
        "attach": keywords,
        "attach_options": sorted(f.name for f in dataclasses.fields(AgentConfig) if f.name not in keywords),
        "collector_config": sorted(f.name for f in dataclasses.fields(CollectorConfig)),
        "environment": sorted(known_variables()),
    }


def test_public_surfaces_change_only_when_announced():
    now = surfaces()
    if os.environ.get("GROKWATCH_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    frozen = json.loads(GOLDEN.read_text())
    for surface in frozen.keys() | now.keys():
        was, is_ = frozen.get(surface), now.get(surface)
        if isinstance(was, dict) or isinstance(is_, dict):
            was, is_ = was or {}, is_ or {}
            for name in was.keys() | is_.keys():
                gone, new = set(was.get(name, [])) - set(is_.get(name, [])), set(is_.get(name, [])) - set(
                    was.get(name, []))
                assert not gone and not new, f"{surface} {name}: removed {sorted(gone)}, added {sorted(new)}"
        else:
            gone, new = set(was or []) - set(is_ or []), set(is_ or []) - set(was or [])
            assert not gone and not new, f"{surface}: removed {sorted(gone)}, added {sorted(new)}"
    assert now["attach"] == frozen["attach"], "attach()'s positional order changed"


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "grokwatch" and parts and parts[0] in ("collector", "agent", "wire"):
                continue
            out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1 more
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    found.add(f"{base}.{alias.name}")
                elif base in known:
                    found.add(base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
    found.discard(name)
    return found


def import_circles() -> list[list[str]]:
    """Every strongly connected set of two or more modules (imports inside functions count: they run)."""
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                circles.append(sorted(members))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circle_among_the_project_modules():
    assert import_circles() == []


def test_the_circle_finder_finds_a_circle(tmp_path, monkeypatch):
    """The check above must be able to fail: two modules importing each other are one circle."""
    (tmp_path / "wire").mkdir()
    (tmp_path / "wire" / "a.py").write_text("from grokwatch.wire import b\n")
    (tmp_path / "wire" / "b.py").write_text("def f():\n    from grokwatch.wire.a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", {"grokwatch.wire": "wire"})
    assert import_circles() == [["grokwatch.wire.a", "grokwatch.wire.b"]]
