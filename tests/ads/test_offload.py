"""Heavy work off the event loop: signing and translating on the worker thread never stall
the streams the loop serves, and change nothing of what is served."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2

from mesh import xds
from mesh.model import Workload, World
from mesh.proxy import Proxy, ProxyKind
from mtls.ca import CertificateAuthority, IssuedCert
from mtls.secrets import SecretStore
from routing.generator import MeshGenerator
from tests.ads.test_bounds import RawStream, channel, first_request
from tests.routing.factories import llama_world, proxy
from tests.support.config import serving
from tests.support.wait import eventually
from xds_server.ads.cache import ConfigCache

PODS = {f"client-{i}": "chat" for i in range(6)}
GATEWAY = proxy(kind=ProxyKind.ROUTER, ip="10.9.0.1", pod="gw-0")


def world() -> World:
    workloads = {
        ("default", pod): Workload(namespace="default", name=pod, service_account=sa)
        for pod, sa in PODS.items()
    }
    return World(services=llama_world().services, workloads=MappingProxyType(workloads))


@pytest.fixture
def worker() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1, thread_name_prefix="test-worker")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


@contextlib.asynccontextmanager
async def gated_ca(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[CertificateAuthority, threading.Event]]:
    """A CA whose signatures wait for a gate, and fail if made on the event loop's thread."""
    ca = CertificateAuthority.generate()
    gate = threading.Event()
    loop_thread = threading.current_thread()
    sign = ca.derive_workload

    def gated(*args: Any, **kwargs: Any) -> IssuedCert:
        assert threading.current_thread() is not loop_thread, "signed on the event loop"
        assert gate.wait(10), "the gate never opened"
        return sign(*args, **kwargs)

    monkeypatch.setattr(ca, "derive_workload", gated)
    try:
        yield ca, gate
    finally:
        gate.set()  # never leave the worker waiting


async def test_a_pending_signature_never_stalls_the_other_streams(
    monkeypatch: pytest.MonkeyPatch, worker: ThreadPoolExecutor
) -> None:
    """A new identity's certificate is signed while its proxy's snapshot is built, on the
    worker thread. While that signature is pending, the event loop serves everyone else."""
    async with gated_ca(monkeypatch) as (ca, gate):
        store = SecretStore(ca, executor=worker)
        cache = ConfigCache(MeshGenerator(world(), {}, store), executor=worker)
        async with serving(cache) as (server, port), channel(port) as ch:
            # A gateway has no workload identity: its config needs no certificate.
            gateway = RawStream(ch, delta=False)
            await gateway.send(first_request(node=GATEWAY.node_id))
            cds = await asyncio.wait_for(gateway.recv_type(xds.CLUSTER), 10)
            names = [cluster_pb2.Cluster.FromString(r.value).name for r in cds.resources]

            sidecar = RawStream(ch, delta=False)
            await sidecar.send(first_request(node=proxy(pod="client-0").node_id))

            async def waiting_for_its_certificate() -> bool:
                mine = [c for c in server.connections.values() if "client-0" in c.proxy.node_id]
                return bool(mine) and mine[0].state.snapshot is None

            await eventually(waiting_for_its_certificate, what="the sidecar waiting to sign")
            # Meanwhile the gateway subscribes to endpoints and is answered at once.
            await gateway.send(
                discovery_pb2.DiscoveryRequest(type_url=xds.ENDPOINT, resource_names=names)
            )
            eds = await asyncio.wait_for(gateway.recv_type(xds.ENDPOINT), 10)
            assert len(eds.resources) == len(names)
            assert store.issued == 0 and await waiting_for_its_certificate()

            gate.set()
            resp = await asyncio.wait_for(sidecar.recv_type(xds.CLUSTER), 10)
            assert resp.resources and store.issued == 1
            for stream in (gateway, sidecar):
                stream.call.cancel()


async def test_builds_on_the_worker_are_the_same_bytes_with_one_certificate_per_identity(
    worker: ThreadPoolExecutor,
) -> None:
    """Proxies of one identity with different config keys, built concurrently on the
    worker: one certificate between them, and byte for byte what the event loop builds."""
    store = SecretStore(CertificateAuthority.generate(), executor=worker)
    generator = MeshGenerator(world(), {}, store)
    proxies = [
        proxy(pod=pod, ip=f"10.1.0.{i}", outbound_port=20_000 + i) for i, pod in enumerate(PODS)
    ]
    threaded = await asyncio.gather(
        *(ConfigCache(generator, executor=worker).snapshot_for(p) for p in proxies)
    )
    assert store.issued == 1
    assert len({s.of_type(xds.SECRET)["default"].version for s in threaded}) == 1
    listeners = {r.version for s in threaded for r in s.of_type(xds.LISTENER).values()}
    assert len(listeners) > len(threaded)  # the keys differ: each has its own listeners
    inline = [await ConfigCache(generator).snapshot_for(p) for p in proxies]
    for a, b in zip(threaded, inline, strict=True):
        for type_url in xds.PUSH_ORDER:
            assert {n: r.body for n, r in a.of_type(type_url).items()} == {
                n: r.body for n, r in b.of_type(type_url).items()
            }
    assert store.issued == 1


async def test_streams_asking_for_one_key_share_one_build(
    worker: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alike proxies asking at once, while the build runs on the worker: one build."""
    generator = MeshGenerator(llama_world(), {})
    calls: list[str] = []
    generate = generator.generate

    def counted(p: Proxy) -> Mapping[str, Sequence[Any]]:
        calls.append(p.node_id)
        return generate(p)

    monkeypatch.setattr(generator, "generate", counted)
    cache = ConfigCache(generator, executor=worker)
    alike = [proxy(pod=f"client-{i}", ip=f"10.1.0.{i}") for i in range(20)]
    snapshots = await asyncio.gather(*(cache.snapshot_for(p) for p in alike))
    assert len(calls) == 1 and all(s is snapshots[0] for s in snapshots)
