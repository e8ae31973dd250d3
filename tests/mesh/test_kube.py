"""KubernetesSource against the fake API server: list, watch, 410, bookmarks, drops, Events."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.aio import client

from mesh.build import build_world
from mesh.kube import (
    RESOURCES,
    Backoff,
    KubernetesSource,
    WatchSettings,
    annotation_event,
    new_api_client,
    post_annotation_events,
)
from mesh.manifests import load_objects
from mesh.model import AnnotationError, World
from mesh.sources import LatestWorld
from tests.mesh.fake_apiserver import FakeApiServer
from tests.mesh.objects import endpoint_slice, pod, service, slice_endpoint

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster"
DEADLINE_S = 10.0
PLURALS = ("services", "endpointslices", "pods", "nodes")

FAST = WatchSettings(
    watch_timeout_s=30,
    list_page_size=2,
    backoff_initial_s=0.02,
    backoff_max_s=0.2,
)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail after DEADLINE_S."""
    try:
        async with asyncio.timeout(DEADLINE_S):
            while not condition():  # noqa: ASYNC110 - polls state the fake and source own
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


@dataclass
class Harness:
    fake: FakeApiServer
    api: Any
    latest: LatestWorld
    task: asyncio.Task[None] | None = None

    def start(
        self, settings: WatchSettings = FAST, *, post_events: bool = True
    ) -> KubernetesSource:
        source = KubernetesSource(self.api, settings=settings, post_events=post_events)
        self.task = asyncio.create_task(source.run(self.latest))
        return source

    async def world(self, predicate: Callable[[World], bool] = lambda w: True) -> World:
        async with asyncio.timeout(DEADLINE_S):
            return await self.latest.wait_for(predicate)

    def expected(self) -> World:
        """The World that the fake's current objects should give."""
        objects = [
            {"kind": kind, **obj}
            for kind in ("Service", "EndpointSlice", "Pod", "Node")
            for obj in self.fake.objects(kind)
        ]
        return build_world(objects)

    async def converged(self) -> World:
        expected = self.expected()
        return await self.world(lambda w: w == expected)

    def lists(self, plural: str) -> int:
        return len(self.fake.list_requests(plural))


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    fake = FakeApiServer(bookmark_interval=60.0)
    await fake.start()
    api: Any = client.ApiClient(configuration=client.Configuration(host=fake.url))
    h = Harness(fake, api, LatestWorld())
    try:
        yield h
    finally:
        if h.task is not None:
            h.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await h.task
        await api.close()
        await fake.stop()


async def seed_example(fake: FakeApiServer) -> None:
    objects, errors = load_objects(EXAMPLE)
    assert errors == []
    for obj in objects:
        if obj["kind"] in ("Service", "Pod", "Node"):
            await fake.put(obj)


async def test_converges_after_the_initial_lists(harness: Harness) -> None:
    await seed_example(harness.fake)
    harness.start()
    world = await harness.world()
    assert world == harness.expected()
    assert [s.name for s in world.services] == ["embedder", "llama"]
    llama = world.service("default", "llama")
    assert llama is not None
    assert [(e.address, e.gpu) for e in llama.endpoints] == [
        ("127.0.0.11", True),
        ("127.0.0.12", True),
        ("127.0.0.13", False),
    ]
    # The first World came only after every resource was listed (pods over 3 pages).
    assert harness.latest.count == 1
    assert harness.lists("pods") == 3
    for plural in PLURALS:
        assert harness.lists(plural) >= 1
    # Then each resource is watched from its list's resourceVersion, with bookmarks.
    await until(lambda: all(harness.fake.watch_requests(p) for p in PLURALS), "watches")
    for plural in PLURALS:
        query = harness.fake.watch_requests(plural)[0].query
        assert query["resourceVersion"] == str(harness.fake.resource_version)
        assert query["allowWatchBookmarks"] == "true"
        assert query["timeoutSeconds"] == "30"


async def test_watch_events_update_the_world(harness: Harness) -> None:
    await harness.fake.put(service("llama"))
    harness.start()
    await harness.world()

    await harness.fake.put(pod("a", labels={"app": "llama"}, ip="10.0.0.1"))
    world = await harness.converged()
    assert [e.address for e in world.services[0].endpoints] == ["10.0.0.1"]

    # An EndpointSlice takes over from derivation.
    await harness.fake.put(endpoint_slice("llama-x", "llama", [slice_endpoint("10.0.0.7")]))
    world = await harness.converged()
    assert [e.address for e in world.services[0].endpoints] == ["10.0.0.7"]

    await harness.fake.delete("EndpointSlice", "default", "llama-x")
    await harness.fake.delete("Pod", "default", "a")
    world = await harness.converged()
    assert world.services[0].endpoints == ()
    assert world.workloads == {}


async def test_changes_that_do_not_change_the_world_publish_nothing(harness: Harness) -> None:
    await harness.fake.put(service("llama"))
    stored = await harness.fake.put(pod("a", labels={"app": "llama"}, ip="10.0.0.1"))
    harness.start()
    await harness.world()

    # Status noise the World does not read: a new resourceVersion and an annotation.
    noisy = copy.deepcopy(stored)
    noisy["metadata"]["annotations"] = {"kubectl.kubernetes.io/restartedAt": "now"}
    noisy["status"]["startTime"] = "2024-01-01T00:00:00Z"
    await harness.fake.put({"kind": "Pod", **noisy})
    await harness.fake.put({"kind": "Node", "metadata": {"name": "unused-node"}})
    # A real change afterwards: exactly one more publish.
    await harness.fake.put(pod("b", labels={"app": "llama"}, ip="10.0.0.2"))
    await harness.converged()
    assert harness.latest.count == 2


async def test_relists_after_compaction_without_spurious_publishes(harness: Harness) -> None:
    await seed_example(harness.fake)
    harness.start()
    await harness.world()
    await until(lambda: harness.fake.open_watches >= 4, "four watches")

    # Pods move on; the Service watch's resourceVersion is now behind. Compact the
    # history past it and cut the connections: the Service watch must get 410.
    await harness.fake.put(pod("extra", labels={"app": "llama"}, ip="127.0.0.15"))
    await harness.converged()
    assert harness.latest.count == 2
    harness.fake.compact()
    await harness.fake.drop_watches()

    await until(lambda: harness.lists("services") == 2, "a Service relist")
    await until(lambda: harness.lists("nodes") == 2, "a Node relist")
    # The relists returned the same objects: nothing new was published.
    await until(lambda: harness.fake.open_watches >= 4, "watches to resume")
    assert harness.latest.count == 2
    # And the source keeps following changes after the relist.
    await harness.fake.put(service("late"))
    world = await harness.converged()
    assert "late" in [s.name for s in world.services]
    assert harness.latest.count == 3


async def test_bookmarks_keep_resource_versions_fresh(harness: Harness) -> None:
    harness.fake.bookmark_interval = 0.05
    await seed_example(harness.fake)
    harness.start()
    await harness.world()
    await harness.fake.put(pod("extra", labels={"app": "llama"}, ip="127.0.0.15"))
    await harness.converged()
    latest_rv = harness.fake.resource_version

    # No Service changed, but a bookmark carries the newest resourceVersion to the
    # Service watch: after compaction and a dropped connection it resumes, no relist.
    await until(
        lambda: ("services", latest_rv) in harness.fake.bookmarks_sent, "a Service bookmark"
    )
    harness.fake.compact()
    await harness.fake.drop_watches()
    await until(
        lambda: any(
            r.query.get("resourceVersion") == str(latest_rv)
            for r in harness.fake.watch_requests("services")[1:]
        ),
        "the Service watch to resume from the bookmarked resourceVersion",
    )
    assert harness.lists("services") == 1
    assert harness.latest.count == 2


async def test_dropped_connections_and_timeouts_resume_without_relisting(
    harness: Harness,
) -> None:
    await seed_example(harness.fake)
    harness.start(WatchSettings(watch_timeout_s=1, backoff_initial_s=0.02, backoff_max_s=0.2))
    await harness.world()
    for round_ in range(3):
        await until(lambda: harness.fake.open_watches >= 4, "watches")
        assert await harness.fake.drop_watches() >= 4
        await harness.fake.put(
            pod(f"new-{round_}", labels={"app": "llama"}, ip=f"127.0.1.{round_}")
        )
        await harness.converged()
    # Server-side timeouts (1 s) end watches cleanly; each resumes from the last version.
    watches_before = len(harness.fake.watch_requests("services"))
    await until(
        lambda: len(harness.fake.watch_requests("services")) >= watches_before + 1,
        "a watch timeout and resume",
    )
    for plural in PLURALS:
        assert harness.lists(plural) == 1
    assert harness.latest.count == 4  # the first World and one per change


async def test_backs_off_and_recovers_from_api_errors(harness: Harness) -> None:
    await seed_example(harness.fake)
    harness.fake.fail_next(6, status=503)
    harness.start()
    world = await harness.world()
    assert world == harness.expected()
    assert harness.latest.count == 1


def test_backoff_is_capped_exponential_with_jitter() -> None:
    import random

    backoff = Backoff(0.5, 4.0, random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_resources_cover_the_four_kinds() -> None:
    assert {r.kind for r in RESOURCES} == {"Service", "EndpointSlice", "Pod", "Node"}


# --- Events ----------------------------------------------------------------------------


BAD_TIMEOUT = {"inferlane.io/enabled": "true", "inferlane.io/timeout": "critical=soon"}
BAD_MTLS = {**BAD_TIMEOUT, "inferlane.io/mtls": "maybe"}


async def test_events_posted_once_per_distinct_error_set(harness: Harness) -> None:
    await harness.fake.put(service("llama", annotations=BAD_TIMEOUT))
    await harness.fake.put(service("good"))
    source = harness.start()
    await harness.world()
    await until(lambda: len(harness.fake.objects("Event")) == 1, "one Event")
    (event,) = harness.fake.objects("Event")
    assert event["type"] == "Warning"
    assert event["reason"] == "InvalidAnnotation"
    assert event["involvedObject"]["kind"] == "Service"
    assert event["involvedObject"]["name"] == "llama"
    assert event["involvedObject"]["uid"] == harness.fake.objects("Service")[1]["metadata"]["uid"]
    assert "inferlane.io/timeout" in event["message"]

    # The World changes for another reason: the same errors are not posted again.
    await harness.fake.put(pod("a", labels={"app": "llama"}, ip="10.0.0.1"))
    await harness.converged()
    # A different error set on the same Service: one new Event.
    await harness.fake.put(service("llama", annotations=BAD_MTLS))
    await harness.converged()
    await until(lambda: len(harness.fake.objects("Event")) == 2, "a second Event")
    # Another change after that: still two.
    await harness.fake.put(pod("b", labels={"app": "llama"}, ip="10.0.0.2"))
    last = await harness.converged()
    await until(lambda: source.events_checked is last, "the last World's Event check")
    assert harness.latest.count == 4
    posts = [r for r in harness.fake.requests if r.method == "POST"]
    assert len(posts) == 2
    assert len(harness.fake.objects("Event")) == 2


async def test_a_second_replica_does_not_duplicate_events(harness: Harness) -> None:
    await harness.fake.put(service("llama", annotations=BAD_TIMEOUT))
    harness.start()
    await until(lambda: len(harness.fake.objects("Event")) == 1, "one Event")
    second = LatestWorld()
    replica = KubernetesSource(harness.api, settings=FAST)
    task = asyncio.create_task(replica.run(second))
    try:
        async with asyncio.timeout(DEADLINE_S):
            await second.wait_first()
        await until(
            lambda: len([r for r in harness.fake.requests if r.method == "POST"]) == 2,
            "the replica's attempt",
        )
        assert len(harness.fake.objects("Event")) == 1  # the replica got 409
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


class _Recorder:
    def __init__(self) -> None:
        self.events: list[Mapping[str, Any]] = []
        self.fail = False

    async def create_event(self, namespace: str, event: Mapping[str, Any]) -> bool:
        if self.fail:
            raise OSError("connection refused")
        self.events.append(event)
        return True


async def test_post_annotation_events_bookkeeping() -> None:
    recorder = _Recorder()
    posted: dict[tuple[str, str], frozenset[AnnotationError]] = {}
    bad = build_world([service("llama", annotations=BAD_TIMEOUT)])
    fixed = build_world([service("llama")])

    recorder.fail = True
    assert await post_annotation_events(recorder, bad, posted) == 0
    recorder.fail = False
    assert await post_annotation_events(recorder, bad, posted) == 1  # retried
    assert await post_annotation_events(recorder, bad, posted) == 0
    assert await post_annotation_events(recorder, fixed, posted) == 0
    assert posted == {}
    # The same mistake made again later is a new occurrence.
    assert await post_annotation_events(recorder, bad, posted) == 1
    assert len(recorder.events) == 2


def test_annotation_event_names_are_stable_per_error_set() -> None:
    (svc,) = build_world([service("llama", annotations=BAD_TIMEOUT, uid="u1")]).services
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    errors = frozenset(svc.errors)
    event = annotation_event(svc, errors, now)
    assert event["metadata"]["name"] == annotation_event(svc, errors, now)["metadata"]["name"]
    assert event["metadata"]["name"].startswith("llama.inferlane-")
    assert event["firstTimestamp"] == "2024-05-01T12:00:00Z"
    assert event["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Service",
        "namespace": "default",
        "name": "llama",
        "uid": "u1",
    }
    (other,) = build_world([service("llama", annotations=BAD_MTLS)]).services
    assert (
        annotation_event(other, frozenset(other.errors), now)["metadata"]["name"]
        != event["metadata"]["name"]
    )


async def test_kubeconfig_loading_and_a_client_factory(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": harness.fake.url}}],
                "users": [{"name": "me", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
                "current-context": "fake",
            }
        )
    )
    await harness.fake.put(service("llama"))
    source = KubernetesSource(
        lambda: new_api_client(kubeconfig=str(kubeconfig)), settings=FAST, post_events=False
    )
    latest = LatestWorld()
    task = asyncio.create_task(source.run(latest))
    try:
        async with asyncio.timeout(DEADLINE_S):
            world = await latest.wait_first()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [s.name for s in world.services] == ["llama"]
