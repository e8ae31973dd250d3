"""The realistic fleet: its shape, and a small run of the benchmark end to end."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

from bench.fleet import FleetShape, build_fleet
from bench.fleetbench import run_fleet
from mesh.manifests import load_world


def test_the_default_fleet_has_the_shape_of_a_cluster() -> None:
    shape = FleetShape()
    assert (shape.proxies, shape.namespaces, shape.accounts) == (10_000, 100, 1_000)
    assert (shape.services, shape.backends, shape.gateways) == (50, 2_000, 100)
    fleet = build_fleet(shape)
    roles = collections.Counter(p.role for p in fleet.proxies)
    assert roles == {"client": 7_900, "model": 2_000, "gateway": 100}
    assert len({p.node_id for p in fleet.proxies}) == 10_000
    identities = {(p.namespace, p.metadata["SERVICE_ACCOUNT"]) for p in fleet.proxies}
    assert len(identities) == 1_000
    assert sum(p.delta for p in fleet.proxies) == 2_500
    assert all(p.node_id.startswith("router~") for p in fleet.proxies if p.role == "gateway")


def test_a_scaled_fleet_builds_the_world_it_describes() -> None:
    fleet = build_fleet(FleetShape.scaled(1_000))
    with tempfile.TemporaryDirectory() as tmp:
        fleet.write(Path(tmp))
        world = load_world(Path(tmp))
    assert world.source_errors == ()
    assert len(world.services) == 5
    assert all(len(s.endpoints) == 40 and all(e.gpu for e in s.endpoints) for s in world.services)
    assert all(s.errors == () and s.config.adaptive for s in world.services)
    assert len(world.workloads) == 1_000
    # Every proxy's pod is in the world: every proxy has a workload identity.
    assert all((p.namespace, p.pod) in world.workloads for p in fleet.proxies)
    # Model and client pods declare the injected sidecar; gateways are proxies themselves.
    roles = {(p.namespace, p.pod): p.role for p in fleet.proxies}
    assert all(w.sidecar == (roles[key] != "gateway") for key, w in world.workloads.items())


async def test_a_small_fleet_run_times_every_proxy_from_the_input() -> None:
    results = await run_fleet(
        100,
        workers=2,
        scenarios=("annotation", "certs"),
        changes=1,
        client_processes=1,
        rate=2000,
        timeout=60,
    )
    assert [r.scenario for r in results] == ["annotation", "certs"]
    for r in results:
        assert r.proxies == 100
        # The debounce (100 ms quiet) is inside the measurement.
        assert 0.1 * 1000 <= r.p50_ms <= r.p99_ms <= r.all_acked_ms
        assert r.cpu_s_per_change > 0
        assert r.kb_per_proxy > 0
