"""Where Worlds come from: the :class:`WorldSource` protocol and small helpers around it.

A source runs until cancelled. It calls ``publish`` with the first World once that World
is complete (every input read once), and afterwards only when the World actually changed
(``World`` equality). Consumers can therefore treat every call as a real change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from mesh.model import AnnotationError, SourceError, World

logger = logging.getLogger(__name__)

Publish = Callable[[World], None]


class WorldSource(Protocol):
    async def run(self, publish: Publish) -> None:
        """Publish Worlds until cancelled: the first complete one, then each change."""
        ...


class ChangeFilter:
    """Wraps a publish callback so that a World equal to the last one is not passed on.

    It also logs each problem that a published World has and the previous one did not
    (bad annotations, broken inputs), once, as SPEC asks for the log.
    """

    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        self._last: World | None = None

    @property
    def last(self) -> World | None:
        return self._last

    def __call__(self, world: World) -> bool:
        """Publish ``world`` if it differs from the last one; say whether it did."""
        if self._last is not None and world == self._last:
            return False
        _log_new_problems(world, self._last)
        self._last = world
        self._publish(world)
        return True


def _log_new_problems(world: World, previous: World | None) -> None:
    old_errors: set[tuple[tuple[str, str], AnnotationError]] = set()
    old_sources: set[SourceError] = set()
    if previous is not None:
        old_errors = {(svc.key, err) for svc in previous.services for err in svc.errors}
        old_sources = set(previous.source_errors)
    for svc in world.services:
        for err in svc.errors:
            if (svc.key, err) not in old_errors:
                logger.warning("Service %s/%s: bad annotation %s; using its default", *svc.key, err)
    for problem in world.source_errors:
        if problem not in old_sources:
            logger.warning("%s: %s", problem.source, problem.message)


class LatestWorld:
    """A publish target that keeps the newest World and lets code wait for it.

    Use it as ``source.run(latest)`` in a task, then ``await latest.wait_first()``.
    """

    def __init__(self) -> None:
        self._world: World | None = None
        self._count = 0
        # Set (and replaced by a fresh one) on every publish: waiters wake, then re-check.
        self._published = asyncio.Event()

    def __call__(self, world: World) -> None:
        self._world = world
        self._count += 1
        self._published.set()
        self._published = asyncio.Event()

    @property
    def world(self) -> World | None:
        return self._world

    @property
    def count(self) -> int:
        """How many Worlds have been published so far."""
        return self._count

    async def wait_first(self) -> World:
        return await self.wait_for(lambda _world: True)

    async def wait_for(self, predicate: Callable[[World], bool]) -> World:
        """Wait until the newest World satisfies ``predicate``; return it.

        Intermediate Worlds that were replaced before this task ran are not seen.
        """
        while True:
            published = self._published
            if self._world is not None and predicate(self._world):
                return self._world
            await published.wait()


async def first_world(source: WorldSource) -> World:
    """Run ``source`` until it publishes its first World, then stop it and return that World.

    Re-raises the source's own exception if it fails first. Bound the wait with
    ``asyncio.timeout`` around the call.
    """
    latest = LatestWorld()
    task = asyncio.create_task(source.run(latest), name="first-world-source")
    waiter = asyncio.create_task(latest.wait_first(), name="first-world-wait")
    try:
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            return waiter.result()
        task.result()  # raises the source's error, if any
        raise RuntimeError("the World source stopped before publishing a World")
    finally:
        for pending in (task, waiter):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
