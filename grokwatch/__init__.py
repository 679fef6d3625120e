"""grokwatch: memorization-to-generalization telemetry for MoE pretraining.

The data path is three import packages, one folder each:
``grokwatch.agent`` (in the training process) -> ``grokwatch.wire`` (the contract)
-> ``grokwatch.collector`` (the sidecar). This top-level package holds the
version, the command line, the demo, and the CURVE key files both sides read
(``grokwatch.keys``: pyzmq, which the wire contract must not need).
"""

from grokwatch._version import __version__

__all__ = ["__version__"]
