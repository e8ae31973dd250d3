"""Misbehaving clients, over real gRPC: every structure a client can grow is bounded, and
the stream at fault is the only one affected.

Each test drives a raw ADS client that does exactly what the test says (send and never
read, subscribe without end, reconnect with ever new metadata, fail its own setup) next
to a well-behaved stream that must keep getting its pushes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable, Mapping, Sequence
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from mesh import xds
from mesh.proxy import Proxy
from routing.generator import MeshGenerator
from tests.routing.factories import llama_world
from tests.support.config import StaticConfig, StaticGenerator, serving
from tests.support.wait import eventually
from xds_server.ads import snapshot as snapshot_module
from xds_server.ads.cache import ConfigCache
from xds_server.ads.server import ADS_SERVICE, ServerSettings, XdsServer
from xds_server.ads.snapshot import MAX_CACHED_VIEWS
from xds_server.ads.stream import StreamLimits

CFG = StaticConfig(clusters={"a": [("127.0.0.1", 9)]}, route_cluster="a")


def node_id(pod: str = "client-0", namespace: str = "default") -> str:
    return f"sidecar~10.0.0.1~{pod}.{namespace}~{namespace}.svc.cluster.local"


class RawStream:
    """One ADS stream that sends what it is told and reads only when asked."""

    def __init__(self, channel: grpc.aio.Channel, *, delta: bool) -> None:
        method = "DeltaAggregatedResources" if delta else "StreamAggregatedResources"
        request = discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest
        response = (
            discovery_pb2.DeltaDiscoveryResponse if delta else discovery_pb2.DiscoveryResponse
        )
        self.call = channel.stream_stream(
            f"/{ADS_SERVICE}/{method}",
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )()

    async def send(self, request: Any) -> None:
        await self.call.write(request)

    async def recv(self) -> Any:
        return await self.call.read()

    async def recv_type(self, type_url: str) -> Any:
        while True:
            response = await self.recv()
            assert response is not grpc.aio.EOF, "the stream ended"
            if response.type_url == type_url:
                return response

    async def code(self) -> grpc.StatusCode:
        """The status the stream ended with (read after every response before it)."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await self.recv() is not grpc.aio.EOF:
                pass
        code: grpc.StatusCode = await self.call.code()
        return code


def first_request(
    type_url: str = xds.CLUSTER, *, delta: bool = False, node: str | None = None, **meta: str
) -> Any:
    cls = discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest
    request = cls(type_url=type_url)
    request.node.id = node or node_id()
    request.node.metadata.update(meta)
    return request


@contextlib.asynccontextmanager
async def channel(port: int) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def pushes_still_flow(server: XdsServer, cache: ConfigCache, good: RawStream) -> None:
    """A config change reaches the well-behaved stream."""
    cache.update(StaticGenerator(CFG.with_(connect_timeout_ms=4321)))
    server.push_all()
    async with asyncio.timeout(10):
        while True:
            resp = await good.recv_type(xds.CLUSTER)
            timeouts = [
                cluster_pb2.Cluster.FromString(r.value).connect_timeout for r in resp.resources
            ]
            if any(t.seconds == 4 and t.nanos == 321_000_000 for t in timeouts):
                return
            await good.send(
                discovery_pb2.DiscoveryRequest(type_url=xds.CLUSTER, response_nonce=resp.nonce)
            )


async def subscribed(stream: RawStream) -> RawStream:
    """``stream`` subscribed to CDS, having received and acknowledged the first response."""
    await stream.send(first_request())
    resp = await stream.recv_type(xds.CLUSTER)
    await stream.send(
        discovery_pb2.DiscoveryRequest(type_url=xds.CLUSTER, response_nonce=resp.nonce)
    )
    return stream


# --------------------------------------------------------------------------- setup


class KeyFailsFor(StaticGenerator):
    """The static config, except that the key of any proxy in ``namespace`` raises, as a
    certificate error inside a key would."""

    def __init__(self, cfg: StaticConfig, namespace: str) -> None:
        super().__init__(cfg)
        self.namespace = namespace

    def key(self, proxy: Proxy) -> Hashable:
        if proxy.namespace == self.namespace:
            raise RuntimeError("cannot form a certificate for this identity")
        return None


async def test_streams_whose_setup_fails_leave_nothing_behind() -> None:
    """With one push slot, broken streams must neither hold it nor stay registered."""
    cache = ConfigCache(KeyFailsFor(CFG, namespace="broken"))
    async with serving(cache, ServerSettings(max_concurrent_pushes=1)) as (server, port):
        registry = server.metrics.registry
        async with channel(port) as ch:
            good = await subscribed(RawStream(ch, delta=False))
            broken = [RawStream(ch, delta=False) for _ in range(3)]
            for i, stream in enumerate(broken):
                await stream.send(first_request(node=node_id(f"b-{i}", "broken")))
            # A first request that opens the stream and then breaks the protocol.
            refused = RawStream(ch, delta=False)
            await refused.send(first_request("type.googleapis.com/not.A.Type", node=node_id("x")))
            assert await refused.code() is grpc.StatusCode.INVALID_ARGUMENT

            await eventually(lambda: _settled(server, 4), what="the broken streams connected")
            # Their config fails on every push, and pushes to the good stream still flow.
            await pushes_still_flow(server, cache, good)
            assert sample(registry, "inferlane_xds_generation_failures_total") >= 3

            for stream in broken:
                stream.call.cancel()
            await eventually(lambda: _settled(server, 1), what="the broken streams gone")
            good.call.cancel()
            await eventually(lambda: _settled(server, 0), what="every stream gone")
        assert sample(registry, "inferlane_xds_connected_proxies", mode="sotw") == 0
        assert len(server.pushes) == 0


async def _settled(server: XdsServer, streams: int) -> bool:
    return len(server.connections) == streams


# --------------------------------------------------------------------------- sending, never reading


class BigClusters:
    """Clusters large enough that a few responses fill a client's receive window."""

    def __init__(self, count: int = 8, size: int = 200_000) -> None:
        self.count, self.size = count, size

    def key(self, proxy: Proxy) -> Hashable:
        return None

    def generate(self, proxy: Proxy) -> Mapping[str, Sequence[Any]]:
        return {
            xds.CLUSTER: [
                cluster_pb2.Cluster(
                    name=f"big-{i}", type=cluster_pb2.Cluster.STATIC, alt_stat_name="x" * self.size
                )
                for i in range(self.count)
            ]
        }


async def test_a_client_that_sends_and_never_reads_is_held_back_then_closed() -> None:
    """Its requests pile up while the server waits to write: the inbox stays at its bound
    (the reader stops, and flow control holds the client), and once a write has waited
    ``write_timeout`` the stream is closed, freeing its push slot for the others."""
    settings = ServerSettings(max_concurrent_pushes=1, max_queued_requests=8, write_timeout=1.0)
    cache = ConfigCache(BigClusters())
    async with serving(cache, settings) as (server, port), channel(port) as ch:
        registry = server.metrics.registry
        hog = RawStream(ch, delta=False)
        await hog.send(first_request())

        async def flood() -> None:
            # Subscription changes (no nonce: nothing to be stale): each one is answered
            # with the clusters it names, and the answers are never read.
            for k in range(5000):
                names = [f"big-{i}" for i in range(k % 8 + 1)]
                request = discovery_pb2.DiscoveryRequest(type_url=xds.CLUSTER, resource_names=names)
                await hog.send(request)

        flooding = asyncio.create_task(flood())
        deepest = 0
        try:

            async def throttled() -> bool:
                nonlocal deepest
                deepest = max([deepest, *(len(c.inbox) for c in server.connections.values())])
                return sample(registry, "inferlane_xds_throttled_reads_total") > 0

            await eventually(throttled, what="the reader held back")
            # The reader can be held back by a slow writer before the client's window is
            # full, so the new config is as big as the old: the flood's answers fill the
            # window whatever the timing, and a write stalls.
            # A push now waits behind the stalled write, holding the only push slot...
            cache.update(BigClusters(count=3, size=200_001))
            server.push_all()
            # ...until the write times out and the stream is closed (its status waits
            # behind the unread responses: the client sees it only if it reads).
            await eventually(lambda: _settled(server, 0), timeout=15, what="the stream closed")
        finally:
            flooding.cancel()
            hog.call.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await flooding
        assert deepest <= settings.max_queued_requests
        assert sample(registry, "inferlane_xds_rejected_streams_total", reason="write_timeout") == 1

        # The slot is free again: a new stream gets the current config.
        reader = RawStream(ch, delta=False)
        await reader.send(first_request())
        resp = await asyncio.wait_for(reader.recv_type(xds.CLUSTER), 10)
        assert len(resp.resources) == 3


# --------------------------------------------------------------------------- subscriptions


async def test_a_delta_subscription_past_its_bound_closes_that_stream_alone() -> None:
    settings = ServerSettings(limits=StreamLimits(max_names=100))
    cache = ConfigCache(StaticGenerator(CFG))
    async with serving(cache, settings) as (server, port), channel(port) as ch:
        good = await subscribed(RawStream(ch, delta=False))
        greedy = RawStream(ch, delta=True)
        await greedy.send(first_request(delta=True))
        for batch in range(3):  # each request is within bounds; together they are not
            names = [f"eds-{batch}-{i}" for i in range(40)]
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await greedy.send(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=xds.ENDPOINT, resource_names_subscribe=names
                    )
                )
        assert await greedy.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = await greedy.call.details()
        assert "EDS subscription of 120 names, over the limit of 100" in details
        registry = server.metrics.registry
        assert sample(registry, "inferlane_xds_rejected_streams_total", reason="over_limit") == 1
        await pushes_still_flow(server, cache, good)


async def test_ever_new_subscriptions_do_not_grow_the_shared_views() -> None:
    """A Delta client that changes its subscription on every request: the snapshot it
    shares with every alike proxy keeps at most MAX_CACHED_VIEWS views."""
    cache = ConfigCache(StaticGenerator(CFG))
    async with serving(cache) as (server, port), channel(port) as ch:
        churner = RawStream(ch, delta=True)
        await churner.send(first_request(delta=True))
        for i in range(MAX_CACHED_VIEWS + 50):
            await churner.send(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=xds.ENDPOINT, resource_names_subscribe=[f"n{i}"]
                )
            )

        async def all_answered() -> bool:
            [conn] = server.connections.values()
            return len(conn.state.types[xds.ENDPOINT].absent) == MAX_CACHED_VIEWS + 50

        async def acknowledge() -> None:
            while (resp := await churner.recv()) is not grpc.aio.EOF:
                await churner.send(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=resp.type_url, response_nonce=resp.nonce
                    )
                )

        reading = asyncio.create_task(acknowledge())
        try:
            await eventually(all_answered, what="every subscription answered")
            [conn] = server.connections.values()
            assert conn.state.snapshot is not None
            # Views are kept with the resources they select from (a bucket shared by the
            # snapshots of every alike proxy), or with the empty one for names of nothing.
            buckets = [*conn.state.snapshot.resources.values(), snapshot_module._NOTHING]
            assert all(len(b._views or ()) <= MAX_CACHED_VIEWS for b in buckets)
        finally:
            churner.call.cancel()
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reading


# --------------------------------------------------------------------------- memos


async def test_reconnecting_with_ever_new_metadata_does_not_grow_the_memos() -> None:
    """Plaintext clients choose their namespace, service account and ports. A client that
    reconnects with new ones each time adds a config key, and a translation, each time:
    both the cache's snapshots and the generator's translations stay at their bounds, and
    a proxy whose entry was dropped gets the same bytes when it asks again."""
    memo = 8
    generator = MeshGenerator(llama_world(), {}, memo_size=memo)
    cache = ConfigCache(generator, max_snapshots=memo)
    async with serving(cache) as (_server, port), channel(port) as ch:
        first: bytes | None = None
        for i in range(3 * memo):
            stream = RawStream(ch, delta=False)
            await stream.send(first_request(INFERLANE_OUTBOUND_PORT=str(20_000 + i)))
            resp = await stream.recv_type(xds.CLUSTER)
            if i == 0:
                first = resp.SerializeToString()
            stream.call.cancel()
            routing_memo = generator._routing
            assert len(cache._memo) <= memo and routing_memo is not None
            assert len(routing_memo) <= memo
        again = RawStream(ch, delta=False)
        await again.send(first_request(INFERLANE_OUTBOUND_PORT="20000"))
        resp = await again.recv_type(xds.CLUSTER)
        assert resp.resources == discovery_pb2.DiscoveryResponse.FromString(first or b"").resources
