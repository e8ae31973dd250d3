"""The Kubernetes source drives a real control plane and Envoy through 410s, bookmarks and
dropped connections, and pushes nothing when nothing changed.

The API server is the fake from ``tests/mesh`` (it speaks the list/watch protocol, with
compaction, bookmarks and cut connections); the rest is real: ``KubernetesSource`` with
the official ``kubernetes.aio`` client, the ControlPlane and an Envoy sidecar.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes.aio import client

from mesh.kube import KubernetesSource, WatchSettings
from mesh.model import PRIORITY_HEADER
from tests.e2e.harness import (
    Client,
    CountingSource,
    control_plane,
    envoy_versions,
    header,
    http_session,
    inference_service,
    model_pod,
    node,
    pushes,
    sidecar,
)
from tests.mesh.fake_apiserver import FakeApiServer
from tests.support.backends import echo_server
from tests.support.envoy import require_envoy, running_envoy
from tests.support.wait import eventually

pytestmark = pytest.mark.envoy

GPU0, CPU0, CLIENT = "127.0.36.1", "127.0.36.3", "127.0.36.10"
LLAMA = "llama.default.svc.cluster.local:8000"
PLURALS = ("services", "endpointslices", "pods", "nodes")
FAST = WatchSettings(watch_timeout_s=30, backoff_initial_s=0.02, backoff_max_s=0.2)


@pytest.fixture
async def fake() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval=60.0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {t: n - before.get(t, 0) for t, n in after.items() if n != before.get(t, 0)}


async def test_kubernetes_source_converges_without_spurious_pushes(fake: FakeApiServer) -> None:
    require_envoy()
    async with echo_server("gpu-0", host=GPU0) as gpu0, echo_server("cpu-0", host=CPU0) as cpu0:

        def gpu_pod(ready: bool) -> dict[str, Any]:
            return model_pod("gpu-0", app="llama", ip=GPU0, port=gpu0.port, gpu=True, ready=ready)

        for obj in (
            node("gpu-node", gpu=True),
            inference_service("llama"),
            gpu_pod(True),
            model_pod("cpu-0", app="llama", ip=CPU0, port=cpu0.port),
        ):
            await fake.put(obj)

        async def api_client() -> Any:
            return client.ApiClient(configuration=client.Configuration(host=fake.url))

        source = CountingSource(KubernetesSource(api_client, settings=FAST))
        node_id, metadata, outbound = sidecar(CLIENT, "app-0")
        async with (
            control_plane(source) as plane,
            running_envoy(node_id, plane.ports["xds"], metadata=metadata) as envoy,
            http_session() as session,
        ):
            sidecar_client = Client(session, CLIENT, outbound)
            await sidecar_client.wait_served_by(LLAMA, ["gpu-0"], priority="critical")

            async def watching() -> bool:
                return fake.open_watches >= len(PLURALS)

            async def class_received(expected: str) -> bool:
                gpu0.headers.clear()
                status, _ = await sidecar_client.get(LLAMA)
                return status == 200 and header(gpu0.headers[-1], PRIORITY_HEADER) == expected

            async def lists(plural: str, count: int) -> bool:
                return len(fake.list_requests(plural)) >= count

            # 1. A Service annotation changes in the API server: Envoy follows.
            assert await class_received("standard")
            await fake.put(
                inference_service(
                    "llama", annotations={"inferlane.io/default-priority": "sheddable"}
                )
            )
            await eventually(lambda: class_received("sheddable"), what="the annotation live")
            await eventually(watching, what="every watch open")

            # 2. History compacted and every connection cut, nothing changed: the Pod,
            # Node and EndpointSlice watches get 410 and relist the same objects.
            published, pushed = source.published, pushes(plane)
            generation, versions = plane.cache.generation, await envoy_versions(envoy)
            pod_lists = len(fake.list_requests("pods"))
            fake.compact()
            assert await fake.drop_watches() >= len(PLURALS)
            await eventually(lambda: lists("pods", pod_lists + 1), what="a Pod relist")
            await eventually(lambda: lists("nodes", 2), what="a Node relist")
            await eventually(watching, what="the watches resumed")
            assert (source.published, plane.cache.generation) == (published, generation)
            assert pushes(plane) == pushed
            assert await envoy_versions(envoy) == versions

            # 3. A Pod becomes unready while the connections are down, and the history is
            # compacted past the watches: the relist finds it, and critical fails over.
            # (Nothing here yields to the loop, so no watch resumes in between.)
            pod_lists = len(fake.list_requests("pods"))
            await fake.drop_watches()
            await fake.put(gpu_pod(False))
            fake.compact()
            await sidecar_client.wait_served_by(LLAMA, ["cpu-0"], priority="critical")
            assert len(fake.list_requests("pods")) > pod_lists
            # One World for the relist and the change together, one EDS push for Envoy.
            assert source.published == published + 1
            assert _delta(pushes(plane), pushed) == {"EDS": 1}
            await eventually(watching, what="the watches resumed")

            # 4. Bookmarks keep each watch's resourceVersion fresh: after compaction and
            # cut connections every watch resumes where it was, without a relist, and
            # the bookmarks themselves push nothing.
            fake.bookmark_interval = 0.05
            await fake.drop_watches()  # the watches come back asking for bookmarks
            rv = fake.resource_version

            async def bookmarked() -> bool:
                return {p for p, v in fake.bookmarks_sent if v == rv} == set(PLURALS)

            await eventually(bookmarked, what="a bookmark on every watch")
            listed = {p: len(fake.list_requests(p)) for p in PLURALS}
            watches = {p: len(fake.watch_requests(p)) for p in PLURALS}
            published, pushed = source.published, pushes(plane)
            fake.compact()
            await fake.drop_watches()

            async def resumed() -> bool:
                return all(len(fake.watch_requests(p)) > watches[p] for p in PLURALS)

            await eventually(resumed, what="every watch resumed")
            await eventually(watching, what="every watch open")
            assert {p: len(fake.list_requests(p)) for p in PLURALS} == listed
            for plural in PLURALS:
                assert fake.watch_requests(plural)[-1].query["resourceVersion"] == str(rv)

            # 5. The GPU pod recovers: critical goes back to it, with one World and one
            # push, however many bookmarks and reconnects came before.
            await fake.put(gpu_pod(True))
            await sidecar_client.wait_served_by(LLAMA, ["gpu-0"], priority="critical")
            assert source.published == published + 1
            assert _delta(pushes(plane), pushed) == {"EDS": 1}
