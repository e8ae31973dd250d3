"""Shipping snapshots to a worker: it serves exactly what the primary translated, and
both ends agree on what the worker holds, generation after generation."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, cast

from bench.fleet import FleetShape, build_fleet
from mesh.manifests import load_world
from mesh.model import World
from mesh.proxy import Proxy, proxy_from_node
from mtls.ca import CertificateAuthority
from mtls.secrets import SecretStore
from routing.generator import MeshGenerator
from xds_server.ads.cache import ConfigCache
from xds_server.ads.server import ServerSettings, StreamAuthorizer
from xds_server.ads.snapshot import Snapshot
from xds_server.workers.hub import WorkerHub, _Worker
from xds_server.workers.protocol import Shipment
from xds_server.workers.worker import ShippedSnapshots


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    async def send(self, message: tuple[Any, ...]) -> None:
        self.sent.append(message)


def _versions(snapshot: Snapshot | None) -> dict[str, dict[str, str]]:
    assert snapshot is not None
    return {t: {n: r.version for n, r in by.items()} for t, by in snapshot.resources.items()}


class _Stream:
    """What ShippedSnapshots needs of a worker's connection."""

    def __init__(self, stream_id: int, proxy: Proxy) -> None:
        self.id = stream_id
        self.proxy = proxy


def _fleet_world() -> tuple[World, list[Proxy]]:
    fleet = build_fleet(FleetShape.scaled(100))
    with tempfile.TemporaryDirectory() as tmp:
        fleet.write(Path(tmp))
        world = load_world(Path(tmp))
    proxies = [proxy_from_node(p.node_id, dict(p.metadata)) for p in fleet.proxies]
    return world, proxies


async def test_a_worker_serves_what_the_primary_translated_and_holds_what_it_was_told() -> None:
    world, proxies = _fleet_world()
    store = SecretStore(CertificateAuthority.generate())
    cache = ConfigCache(MeshGenerator(world, {}, store))
    hub = WorkerHub(
        2,
        cache,
        settings=ServerSettings(),
        authorizer=StreamAuthorizer,
        on_sidecars_changed=lambda: None,
        own_metrics=None,
    )
    channel = _Recorder()
    worker = _Worker(0, cast(Any, None), cast(Any, channel))
    worker.streams = dict(enumerate(proxies))
    shipped = ShippedSnapshots()
    streams = [_Stream(i, p) for i, p in enumerate(proxies)]
    for stream in streams:
        shipped.opened(cast(Any, stream))

    async def generation(gen: MeshGenerator) -> Shipment:
        cache.update(gen)
        await hub._ship(worker, dict(worker.streams), complete=True)
        shipment: Shipment = channel.sent[-1][1]
        shipped.apply(shipment)
        for stream in streams:
            assert _versions(await shipped.snapshot_for(stream.proxy)) == _versions(
                await cache.snapshot_for(stream.proxy)
            ), stream.proxy.node_id
        # Both ends agree on what the worker holds.
        assert set(shipped._snapshots) == worker.snapshots
        assert set(shipped._groups) == worker.groups
        assert set(shipped._resources) == worker.resources
        return shipment

    first = await generation(cache.generator)  # type: ignore[arg-type]
    assert len(first.assign) == len(proxies)
    # One snapshot per distinct config (proxies whose keys differ may still get identical
    # resources: pods of one Service and identity), and per-type groups shared among them.
    contents = set()
    for proxy in proxies:
        versions = _versions(await cache.snapshot_for(proxy))
        contents.add(tuple(sorted((t, tuple(sorted(v.items()))) for t, v in versions.items())))
    assert len(first.snapshots) == len(contents) <= len({cache.generator.key(p) for p in proxies})
    assert len(first.groups) < 5 * len(first.snapshots) / 2
    # One Service's timeout changes: its routes change, and only they are shipped again.
    svc = world.services[0]
    changed = dataclasses.replace(
        svc, config=dataclasses.replace(svc.config, timeouts={**svc.config.timeouts})
    )
    timeouts = dict(changed.config.timeouts)
    timeouts[next(iter(timeouts))] = 999.0
    changed = dataclasses.replace(
        changed, config=dataclasses.replace(changed.config, timeouts=timeouts)
    )
    world2 = dataclasses.replace(world, services=(changed, *world.services[1:]))
    second = await generation(MeshGenerator(world2, {}, store))
    assert second.resources, "the changed routes are shipped"
    assert len(second.resources) < len(first.resources) / 4
    # The same world again: nothing new to ship but the assignments.
    third = await generation(MeshGenerator(world2, {}, store))
    assert third.resources == {}
    assert third.groups == {}
    # A stream that opens later gets its snapshot alone, with only what the worker lacks.
    late = len(proxies)
    worker.streams[late] = proxies[0]
    shipped.opened(cast(Any, _Stream(late, proxies[0])))
    await hub._ship(worker, {late: proxies[0]}, complete=False)
    partial: Shipment = channel.sent[-1][1]
    assert not partial.complete
    assert set(partial.assign) == {late}
    assert partial.resources == {}
    await asyncio.sleep(0)
