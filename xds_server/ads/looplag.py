"""The event loop's lag: how late a timer fires, which is how late every stream is served.

One process serves thousands of streams on one event loop, so anything that holds the
loop (a long translation, a large push, a garbage collection) delays every ACK and every
push. :class:`LoopLagProbe` sleeps ``interval`` seconds at a time and records how much
later than asked it woke up, in ``inferlane_event_loop_lag_seconds`` (labelled by
process, so the workers of ``inferlane serve --workers N`` stay apart when summed).
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Histogram

#: From 1 ms (a healthy loop) to 10 s (a stall every proxy notices).
LAG_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class LoopLagProbe:
    """Run :meth:`run` as a task; it observes the lag every ``interval`` seconds."""

    def __init__(
        self, registry: CollectorRegistry, process: str = "main", interval: float = 0.05
    ) -> None:
        self.interval = interval
        self.histogram = Histogram(
            "inferlane_event_loop_lag_seconds",
            "How late the event loop ran a timer: every stream waits as long.",
            ["process"],
            buckets=LAG_BUCKETS,
            registry=registry,
        ).labels(process)
        #: The largest lag seen so far, in seconds.
        self.worst = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - asked)
            self.histogram.observe(lag)
            self.worst = max(self.worst, lag)
