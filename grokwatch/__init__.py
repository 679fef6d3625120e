"""grokwatch: memorization-to-generalization telemetry for MoE pretraining.

The data path is three import packages, one folder each:
``grokwatch.agent`` (in the training process) -> ``grokwatch.wire`` (the contract)
-> ``grokwatch.collector`` (the sidecar). This top-level package holds the
version, the command line, the demo, and the CURVE key files both sides read
(``grokwatch.keys``: pyzmq, which the wire contract must not need).
"""

import os as _os

from grokwatch._version import __version__

# In a source checkout the three packages are the repository's top-level agent/, wire/ and collector/
# folders (pyproject's package-dir), not folders of this one. When this file is the checkout's own (the
# repository root, with its pyproject.toml, is on sys.path: python -m pytest from the root, PYTHONPATH=.),
# the root joins this package's path so that grokwatch.wire & co. resolve there as they do installed.
# The wheel and the editable install (a link tree, editable_mode=strict) need none of it.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "wire")):
    __path__.append(_root)

__all__ = ["__version__"]
