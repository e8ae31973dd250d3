"""Debouncing: fold a burst of changes into one push.

As Istio's ``debounce()``: wait for a quiet period with no new change, but never longer
than a maximum delay after the first change of the burst, then flush once. Only one
flush runs at a time; changes that arrive during a flush start the next burst.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DebounceSettings:
    #: Seconds without a new change before pushing. Istio uses 100 ms: long enough to fold
    #: an endpoint rollout's events, short against the 1 s a change may take to be live.
    quiet: float = 0.1
    #: Seconds after the first change of a burst by which the push starts regardless.
    #: Istio caps at 10 s; inferlane's users expect config live within about a second.
    max_delay: float = 1.0


class Debouncer:
    """Call :meth:`trigger` on every change; :meth:`run` calls ``flush(first_change_ts)``."""

    def __init__(
        self,
        settings: DebounceSettings,
        flush: Callable[[float], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._flush = flush
        self._clock = clock
        self._event = asyncio.Event()
        self._first: float | None = None
        self.flushes = 0

    def trigger(self) -> None:
        if self._first is None:
            self._first = self._clock()
        self._event.set()

    async def run(self) -> None:
        while True:
            await self._event.wait()
            first = self._first if self._first is not None else self._clock()
            while True:
                self._event.clear()
                remaining = first + self.settings.max_delay - self._clock()
                if remaining <= 0:
                    break
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that arrives together with a trigger, and shutdown would hang.
                try:
                    async with asyncio.timeout(min(self.settings.quiet, remaining)):
                        await self._event.wait()
                except TimeoutError:
                    break
            self._first = None
            self._event.clear()
            self.flushes += 1
            await self._flush(first)
