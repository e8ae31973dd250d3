"""The fake API server speaks the list/watch wire protocol the way the real one does."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.mesh.fake_apiserver import FakeApiServer
from tests.mesh.objects import pod


@pytest.fixture
async def fake() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval=0.05)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        return await response.json()


async def watch_lines(session: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    """Read a watch to its end (the server's timeoutSeconds, or an ERROR)."""
    async with session.get(url) as response:
        assert response.status == 200
        return [json.loads(line) async for line in response.content if line.strip()]


async def test_list_label_selector_and_paging(fake: FakeApiServer) -> None:
    for i in range(3):
        await fake.put(pod(f"p{i}", labels={"app": "a" if i < 2 else "b"}))
    async with aiohttp.ClientSession() as session:
        body = await get_json(session, f"{fake.url}/api/v1/pods?labelSelector=app%3Da")
        assert [i["metadata"]["name"] for i in body["items"]] == ["p0", "p1"]
        assert body["metadata"]["resourceVersion"] == "3"
        assert "kind" not in body["items"][0]  # as the real API: items carry no kind
        body = await get_json(session, f"{fake.url}/api/v1/pods?labelSelector=app!%3Da")
        assert [i["metadata"]["name"] for i in body["items"]] == ["p2"]
        page = await get_json(session, f"{fake.url}/api/v1/namespaces/default/pods?limit=2")
        assert len(page["items"]) == 2
        token = page["metadata"]["continue"]
        rest = await get_json(session, f"{fake.url}/api/v1/pods?limit=2&continue={token}")
        assert [i["metadata"]["name"] for i in rest["items"]] == ["p2"]
        assert "continue" not in rest["metadata"]


async def test_watch_replays_then_times_out_with_bookmarks(fake: FakeApiServer) -> None:
    await fake.put(pod("a"))
    await fake.put(pod("b"))
    await fake.delete("Pod", "default", "a")
    async with aiohttp.ClientSession() as session:
        url = (
            f"{fake.url}/api/v1/pods?watch=1&resourceVersion=1"
            "&timeoutSeconds=0.2&allowWatchBookmarks=true"
        )
        events = await watch_lines(session, url)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["ADDED", "DELETED"]
    assert [e["object"]["metadata"]["resourceVersion"] for e in events[:2]] == ["2", "3"]
    assert events[0]["object"]["kind"] == "Pod"
    assert "BOOKMARK" in kinds
    assert {e["object"]["metadata"]["resourceVersion"] for e in events[2:]} == {"3"}


async def test_watch_from_before_compaction_gets_410(fake: FakeApiServer) -> None:
    await fake.put(pod("a"))
    await fake.put(pod("b"))
    fake.compact()
    async with aiohttp.ClientSession() as session:
        events = await watch_lines(
            session, f"{fake.url}/api/v1/pods?watch=true&resourceVersion=1&timeoutSeconds=5"
        )
    assert events == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "too old resource version: 1 (2)",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]


async def test_create_conflict_and_injected_failures(fake: FakeApiServer) -> None:
    event = {"metadata": {"name": "e1"}, "reason": "Test"}
    url = f"{fake.url}/api/v1/namespaces/default/events"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=event) as response:
            assert response.status == 201
        async with session.post(url, json=event) as response:
            assert response.status == 409
            assert (await response.json())["reason"] == "AlreadyExists"
        fake.fail_next(1, status=500)
        async with session.get(f"{fake.url}/api/v1/nodes") as response:
            assert response.status == 500
        async with session.get(f"{fake.url}/api/v1/nodes") as response:
            assert response.status == 200
