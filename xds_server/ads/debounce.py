"""Debouncing: fold a burst of changes into one push, and say why it happened.

As Istio's ``debounce()``: wait for a quiet period with no new change, but never longer
than a maximum delay after the first change of the burst, then flush once. Only one
flush runs at a time; changes that arrive during a flush start the next burst.

Each change names its reason; the flush gets a :class:`PushRequest` carrying every
reason folded into it and how often, as Istio's ``PushRequest.Reason`` does, so logs and
``/metrics`` say what the control plane pushes for.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class PushReason(enum.StrEnum):
    """Why a push happens (Istio: ``model.TriggerReason``)."""

    #: The source published a new world: Services, EndpointSlices, Pods or Nodes changed.
    WORLD = "world"
    #: A sidecar connected or left; endpoints are addressed through connected sidecars.
    PROXY = "proxy"
    #: Workload certificates were renewed or rotated.
    SECRET = "secret"
    #: The adaptive controller changed an endpoint's limits.
    ADAPTIVE = "adaptive"


@dataclass(frozen=True)
class PushRequest:
    """One debounced push: when its first change happened, and why it happens."""

    #: Monotonic time of the first change folded into this push.
    first_change: float
    #: Reason -> how many changes of that kind were folded in.
    reasons: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def describe(self) -> str:
        """``world x2, proxy`` for logs."""
        return ", ".join(
            name if count == 1 else f"{name} x{count}"
            for name, count in sorted(self.reasons.items())
        )


@dataclass(frozen=True)
class DebounceSettings:
    #: Seconds without a new change before pushing. Istio uses 100 ms: long enough to fold
    #: an endpoint rollout's events, short against the 1 s a change may take to be live.
    quiet: float = 0.1
    #: Seconds after the first change of a burst by which the push starts regardless.
    #: Istio caps at 10 s; inferlane's users expect config live within about a second.
    max_delay: float = 1.0


class Debouncer:
    """Call :meth:`trigger` on every change; :meth:`run` calls ``flush(push_request)``."""

    def __init__(
        self,
        settings: DebounceSettings,
        flush: Callable[[PushRequest], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._flush = flush
        self._clock = clock
        self._event = asyncio.Event()
        self._first: float | None = None
        self._reasons: collections.Counter[str] = collections.Counter()
        self.flushes = 0

    def trigger(self, reason: str) -> None:
        if self._first is None:
            self._first = self._clock()
        self._reasons[reason] += 1
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
            request = PushRequest(first, MappingProxyType(dict(self._reasons)))
            self._first = None
            self._reasons = collections.Counter()
            self._event.clear()
            self.flushes += 1
            await self._flush(request)
