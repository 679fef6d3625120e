"""Whether the standard static tools (mypy, basedpyright, jedi) resolve ``grokwatch.*`` as a user's code
imports it, against an environment where grokwatch is installed (the editable install or a wheel): each
must see the real classes (their types revealed, a wrong attribute reported as one), not Any/Unknown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# name -> (import line, the class's full name)
COLLECTOR_SIDE = {
    "State": ("from grokwatch.collector.state import State", "grokwatch.collector.state.State"),
    "Routing": ("from grokwatch.wire import Routing", "grokwatch.wire.messages.Routing"),
}
AGENT_SIDE = {
    "AgentConfig": ("from grokwatch.agent import AgentConfig", "grokwatch.agent.config.AgentConfig"),
    # lazily exported (module __getattr__): the TYPE_CHECKING import is what the tools read
    "GrokwatchCallback": ("from grokwatch.agent import GrokwatchCallback",
                          "grokwatch.agent.integrations.GrokwatchCallback"),
}
TOOLS_BIN = Path(sys.executable).parent  # the dev venv's mypy and basedpyright check the other environment


def _user_code(names: dict[str, tuple[str, str]]) -> str:
    lines = [imp for imp, _ in names.values()]
    lines += [f"reveal_type({name})" for name in names]
    lines += [f"{name}.no_such_attribute" for name in names]  # an error only a resolved class can give
    return "\n".join(lines) + "\n"


def _run(cmd: list, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "VIRTUAL_ENV", "MYPYPATH"))}
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    return result.stdout + result.stderr


def check_tools_resolve(python: Path, workdir: Path, names: dict[str, tuple[str, str]]) -> None:
    """``workdir`` must lie outside any checkout, so that nothing but the environment can resolve the names."""
    code = _user_code(names)
    first_attribute_line = len(names) * 2 + 1
    user = workdir / "user_code.py"
    user.write_text(code)
    # mypy reads the big typed dependencies whole when it follows grokwatch's imports (torch alone: ~25 s,
    # transformers ~20 s); they are not what is checked here, so it stops at them (grokwatch's own modules are
    # still followed) — but for transformers' package and its trainer_callback, where GrokwatchCallback's base
    # class comes from (an Any base would hide the wrong attribute the check needs reported)
    (workdir / "mypy.ini").write_text(
        "[mypy]\n\n[mypy-torch.*,numba.*,scipy.*,transformers.*]\nfollow_imports = skip\n\n"
        "[mypy-transformers,transformers.trainer_callback]\nfollow_imports = normal\n")

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # the two checkers at once: each is one process on one core
        mypy = pool.submit(_run, [TOOLS_BIN / "mypy", "--python-executable", python, "--no-incremental",
                                  "--cache-dir", os.devnull, "--no-error-summary", user.name], workdir)
        pyright = pool.submit(_run, [TOOLS_BIN / "basedpyright", "--pythonpath", python, "--outputjson", user.name],
                              workdir)
        out, pyright_out = mypy.result(), pyright.result()
    for i, (name, (_, full)) in enumerate(names.items()):
        revealed = [ln for ln in out.splitlines() if ln.startswith(f"{user.name}:{len(names) + 1 + i}:")]
        assert revealed and f"-> {full}" in revealed[0], f"mypy does not see {full}:\n{out}"
        assert f'{user.name}:{first_attribute_line + i}: error: "type[{name}]" has no attribute ' \
               f'"no_such_attribute"' in out, f"mypy:\n{out}"
    assert "import-not-found" not in out and "import-untyped" not in out, out

    out = pyright_out
    diagnostics = json.loads(out[out.index("{"):])["generalDiagnostics"]
    for i, (name, _) in enumerate(names.items()):
        at = [d for d in diagnostics if d["range"]["start"]["line"] == len(names) + i]
        assert any(f'is "type[{name}]"' in d["message"] for d in at), f"basedpyright: {name}: {at}"
        at = [d for d in diagnostics if d["range"]["start"]["line"] == first_attribute_line - 1 + i]
        assert any(d["severity"] == "error" and "no_such_attribute" in d["message"] for d in at), \
            f"basedpyright: {name}: {at}"
    assert not [d for d in diagnostics if d.get("rule") == "reportMissingImports"], diagnostics

    import jedi

    environment = jedi.create_environment(str(python.parent.parent), safe=False)
    script = jedi.Script(code, path=str(user), environment=environment, project=jedi.Project(str(workdir)))
    for line, (imp, full) in enumerate(names.values(), start=1):
        found = script.goto(line, len(imp) - 1, follow_imports=True)
        assert [d.full_name for d in found] == [full], f"jedi: {imp}: {found}"
        assert found[0].module_path is not None and found[0].module_path.is_file()
