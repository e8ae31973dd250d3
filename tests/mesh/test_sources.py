"""The WorldSource helpers: change filtering, waiting for Worlds, first_world."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mesh.build import build_world
from mesh.model import SourceError, World
from mesh.sources import ChangeFilter, LatestWorld, Publish, WorldSource, first_world
from tests.mesh.objects import service


def test_change_filter_passes_only_changes() -> None:
    seen: list[World] = []
    changes = ChangeFilter(seen.append)
    one = build_world([service("a")])
    assert changes(one)
    assert not changes(build_world([service("a")]))  # equal, though a new object
    two = build_world([service("a"), service("b")])
    assert changes(two)
    assert seen == [one, two]
    assert changes.last is two


def test_change_filter_logs_each_new_problem_once(caplog: pytest.LogCaptureFixture) -> None:
    changes = ChangeFilter(lambda world: None)
    bad = service("a", annotations={"inferlane.io/enabled": "true", "inferlane.io/mtls": "x"})
    with caplog.at_level(logging.WARNING, logger="mesh.sources"):
        changes(build_world([bad], source_errors=[SourceError("f.yaml", "broken")]))
        changes(build_world([bad, service("b")], source_errors=[SourceError("f.yaml", "broken")]))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("inferlane.io/mtls" in m for m in messages) == 1
    assert sum("f.yaml: broken" in m for m in messages) == 1


async def test_latest_world_waits_for_a_condition() -> None:
    latest = LatestWorld()
    waiter = asyncio.create_task(latest.wait_for(lambda w: len(w.services) == 2))
    latest(build_world([service("a")]))
    await asyncio.sleep(0)
    assert not waiter.done()
    latest(build_world([service("a"), service("b")]))
    async with asyncio.timeout(5):
        world = await waiter
    assert len(world.services) == 2
    assert latest.count == 2
    assert latest.world is world


class _Scripted:
    """A source that publishes the given Worlds, then idles or fails."""

    def __init__(self, worlds: list[World], error: Exception | None = None) -> None:
        self.worlds = worlds
        self.error = error
        self.cancelled = False

    async def run(self, publish: Publish) -> None:
        for world in self.worlds:
            publish(world)
        if self.error is not None:
            raise self.error
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def test_first_world_returns_it_and_stops_the_source() -> None:
    world = build_world([service("a")])
    source = _Scripted([world])
    checked: WorldSource = source
    async with asyncio.timeout(5):
        assert await first_world(checked) == world
    assert source.cancelled


async def test_first_world_reraises_a_failing_source() -> None:
    with pytest.raises(OSError, match="boom"):
        async with asyncio.timeout(5):
            await first_world(_Scripted([], OSError("boom")))
