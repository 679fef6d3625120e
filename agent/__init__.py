"""grokwatch.agent — runs inside the training process.

    import grokwatch.agent as gw
    mon = gw.attach(model, endpoint="tcp://127.0.0.1:5557", run="olmoe-a")

Data path: attach -> discover -> capture (the hooks; which forwards and rows: monitor, sampling;
the Monitor's life and public calls: monitor) -> layout, gather, reduce (on the device) -> staging (pinned host buffers) -> sender (thread, ZeroMQ PUSH). Plus
the probe, the Hugging Face Trainer callback (integrations), Lightning's (lightning_callback) and an
accelerate tracker (accelerate_tracker); router health for the framework's own logs (health).
Which thread runs what: README.md.
"""

from typing import TYPE_CHECKING

from grokwatch.agent.attach import attach
from grokwatch.agent.config import AgentConfig
from grokwatch.agent.discover import NoMoELayersError, discover
from grokwatch.agent.monitor import Monitor

if TYPE_CHECKING:
    from grokwatch.agent.accelerate_tracker import GrokwatchTracker
    from grokwatch.agent.integrations import GrokwatchCallback, TaggingCollator
    from grokwatch.agent.lightning_callback import GrokwatchLightningCallback

__all__ = ["AgentConfig", "GrokwatchCallback", "GrokwatchLightningCallback", "GrokwatchTracker", "Monitor",
           "NoMoELayersError", "TaggingCollator", "attach", "discover"]


def __getattr__(name):
    if name in ("GrokwatchCallback", "TaggingCollator"):  # imports transformers only when asked for
        import grokwatch.agent.integrations as integrations

        return getattr(integrations, name)
    if name == "GrokwatchLightningCallback":  # imports lightning only when asked for
        from grokwatch.agent.lightning_callback import GrokwatchLightningCallback

        return GrokwatchLightningCallback
    if name == "GrokwatchTracker":  # imports accelerate only when asked for
        from grokwatch.agent.accelerate_tracker import GrokwatchTracker

        return GrokwatchTracker
    raise AttributeError(name)
