"""The debouncer folds a burst of changes into one push that carries every reason."""

from __future__ import annotations

import asyncio

from tests.support.wait import eventually
from xds_server.ads.debounce import Debouncer, DebounceSettings, PushReason, PushRequest


async def test_a_burst_is_one_push_with_its_reasons_counted() -> None:
    flushed: list[PushRequest] = []

    async def flush(request: PushRequest) -> None:
        flushed.append(request)

    async def flushes(n: int) -> bool:
        return len(flushed) == n

    debouncer = Debouncer(DebounceSettings(quiet=0.05, max_delay=5.0), flush)
    task = asyncio.create_task(debouncer.run())
    try:
        for reason in (PushReason.WORLD, PushReason.PROXY, PushReason.WORLD):
            debouncer.trigger(reason)
        await eventually(lambda: flushes(1), what="the burst's push")
        assert dict(flushed[0].reasons) == {"world": 2, "proxy": 1}
        assert flushed[0].describe() == "proxy, world x2"
        debouncer.trigger(PushReason.SECRET)
        await eventually(lambda: flushes(2), what="the next push")
        assert dict(flushed[1].reasons) == {"secret": 1}
        assert flushed[1].first_change >= flushed[0].first_change
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
