"""grokwatch: memorization-to-generalization telemetry for MoE pretraining.

The data path is three import packages, one folder each:
``grokwatch.agent`` (in the training process) -> ``grokwatch.wire`` (the contract)
-> ``grokwatch.collector`` (the sidecar). This top-level package holds only the
version and the command line.
"""

from grokwatch._version import __version__

__all__ = ["__version__"]
