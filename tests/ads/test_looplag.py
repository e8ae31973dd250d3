"""The event loop's lag probe sees a loop held up."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from bench.wait import eventually
from xds_server.ads.looplag import LoopLagProbe


async def test_a_blocked_loop_shows_as_lag() -> None:
    registry = CollectorRegistry()
    probe = LoopLagProbe(registry, "test", interval=0.01)
    task = asyncio.create_task(probe.run())
    try:

        def observed() -> float:
            value = registry.get_sample_value(
                "inferlane_event_loop_lag_seconds_count", {"process": "test"}
            )
            return value or 0.0

        async def sampled() -> bool:
            return observed() >= 1

        await eventually(sampled, what="a first sample")
        time.sleep(0.2)  # noqa: ASYNC251 - hold the loop, as a long translation would

        async def seen() -> bool:
            return probe.worst >= 0.15

        await eventually(seen, what="the stall observed")
        count = registry.get_sample_value(
            "inferlane_event_loop_lag_seconds_bucket", {"process": "test", "le": "+Inf"}
        )
        slow = registry.get_sample_value(
            "inferlane_event_loop_lag_seconds_bucket", {"process": "test", "le": "0.1"}
        )
        assert count is not None and slow is not None and count - slow >= 1
    finally:
        task.cancel()
