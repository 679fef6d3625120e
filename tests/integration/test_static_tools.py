"""The editable install (make setup: editable_mode=strict, a link tree) as standard tools see it: mypy,
basedpyright and jedi resolve grokwatch's packages, the lazily exported names included, from user code
outside the checkout. The wheel's turn is in test_wheel.py. Slow: each checker reads torch's stubs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from static_tools import AGENT_SIDE, COLLECTOR_SIDE, check_tools_resolve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_mypy_basedpyright_and_jedi_resolve_the_editable_install_from_user_code(tmp_path):
    check_tools_resolve(Path(sys.executable), tmp_path, {**COLLECTOR_SIDE, **AGENT_SIDE})
