"""/metrics under a scrape storm (collector/prometheus.py CoalescedMetrics): after a render of d seconds the next
scrapes within 9 d get its bytes (renders take at most a tenth of the time), but never for more than
RENDER_HOLD_MAX_S — a slow render on a loaded machine had held 9 s, and a lone scrape after a storm read bytes
that old. A clock the test moves, and a registry whose render takes the time the test says."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from grokwatch.collector.prometheus import RENDER_DUTY, RENDER_HOLD_MAX_S, CoalescedMetrics


class _Slow:
    """A collector whose every collection takes ``render_s`` of the test's clock and reports how many renders
    there were (so a scrape shows which render's bytes it got)."""

    def __init__(self, clock: list, render_s: float):
        self.clock, self.render_s, self.n = clock, render_s, 0

    def collect(self):
        self.clock[0] += self.render_s
        self.n += 1
        yield GaugeMetricFamily("renders", "renders so far", value=self.n)


def _scrape(app) -> bytes:
    out = []
    body = app({"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""},
               lambda status, headers: out.append(status))
    assert out == ["200 OK"]
    return b"".join(body)


def _app(render_s: float):
    clock = [100.0]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Slow(clock, render_s))
    return CoalescedMetrics(registry, clock=lambda: clock[0]), clock


def test_a_fast_render_holds_nine_times_its_duration():
    app, clock = _app(0.1)
    first = _scrape(app)  # renders: 100.0 -> 100.1, held until 100.1 + 0.9
    hold = 0.1 * (1 - RENDER_DUTY) / RENDER_DUTY
    clock[0] += hold - 0.05
    assert _scrape(app) == first and app.renders == 1  # inside the hold: the same bytes
    clock[0] += 0.1
    assert _scrape(app) != first and app.renders == 2  # past it: rendered again


def test_a_slow_render_holds_no_longer_than_the_cap():
    app, clock = _app(2.0)  # 9 x 2 s would be 18 s
    first = _scrape(app)
    clock[0] += RENDER_HOLD_MAX_S - 0.1
    assert _scrape(app) == first and app.renders == 1
    clock[0] += 0.2
    assert _scrape(app) != first and app.renders == 2  # not 18 s stale: at most the cap
