"""build() as a whole: determinism, completeness, and references that resolve."""

from __future__ import annotations

import random
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import xds
from mesh.model import (
    Endpoint,
    InferenceService,
    MtlsMode,
    Priority,
    ServiceConfig,
    ServicePort,
    World,
)
from mesh.proxy import Proxy
from tests.routing.factories import (
    build,
    config,
    endpoint,
    gateway,
    llama_world,
    proxy,
    service,
    world,
)


def _bytes(resources: dict[str, list[Any]]) -> dict[str, list[bytes]]:
    return {t: [m.SerializeToString(deterministic=True) for m in ms] for t, ms in resources.items()}


def _references_resolve(resources: dict[str, list[Any]]) -> None:
    """Every RDS name a listener uses and every EDS cluster's assignment is present."""
    routes = {xds.resource_name(r) for r in resources[xds.ROUTE]}
    assignments = {xds.resource_name(a) for a in resources[xds.ENDPOINT]}
    for listener in resources[xds.LISTENER]:
        packed = (
            [listener.api_listener.api_listener]
            if listener.HasField("api_listener")
            else [f.typed_config for chain in listener.filter_chains for f in chain.filters]
        )
        for any_config in packed:
            manager = hcm_pb2.HttpConnectionManager()
            assert any_config.Unpack(manager)
            assert manager.rds.route_config_name in routes
    eds = {c.name for c in resources[xds.CLUSTER] if c.type == cluster_pb2.Cluster.EDS}
    assert eds == assignments
    for kind in resources.values():
        names = [xds.resource_name(m) for m in kind]
        assert names == sorted(set(names))


def _sidecars() -> dict[tuple[str, str], Proxy]:
    return {("default", "gpu-1"): proxy(pod="gpu-1", ip="10.0.0.2", inbound_port=15106)}


@pytest.mark.parametrize("who", [proxy(), proxy(pod="gpu-0"), gateway(), proxy(proxyless=True)])
def test_same_inputs_give_identical_bytes(who: Proxy) -> None:
    cfg = config(callers=["prod/*"], max_concurrency=8)
    first = build(llama_world(cfg), who, _sidecars())
    second = build(llama_world(cfg), who, _sidecars())
    assert _bytes(first) == _bytes(second)
    _references_resolve(first)


def test_returns_every_type_even_when_empty() -> None:
    resources = build(World(), proxy(), {})
    assert set(resources) == {xds.LISTENER, xds.ROUTE, xds.CLUSTER, xds.ENDPOINT}
    assert [xds.resource_name(r) for r in resources[xds.ROUTE]] == ["inbound", "outbound"]
    assert resources[xds.CLUSTER] == []


def test_service_and_endpoint_order_does_not_matter() -> None:
    services = [
        service("a", "x", endpoints=[endpoint("10.0.0.1", gpu=True), endpoint("10.0.0.2")]),
        service("b", "x", ports=(8000, 9000)),
        service("a", "y"),
    ]
    reference = _bytes(build(world(*services), proxy(), {}))
    shuffler = random.Random(7)
    for _ in range(5):
        shuffled = [
            InferenceService(
                s.namespace,
                s.name,
                s.ports,
                s.config,
                endpoints=tuple(shuffler.sample(s.endpoints, len(s.endpoints))),
            )
            for s in shuffler.sample(services, len(services))
        ]
        assert _bytes(build(world(*shuffled), proxy(), {})) == reference


def test_udp_ports_are_not_routed() -> None:
    svc = InferenceService(
        "default",
        "dns",
        (ServicePort(53, protocol="UDP"), ServicePort(8000, protocol="TCP")),
        config(),
    )
    resources = build(world(svc), proxy(), {})
    assert {c.name.split("|")[1] for c in resources[xds.CLUSTER]} == {"8000"}


_names = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)


@st.composite
def _worlds(draw: st.DrawFn) -> World:
    services = []
    for ns, name in draw(st.sets(st.tuples(_names, _names), max_size=4)):
        ports = tuple(
            ServicePort(p) for p in draw(st.lists(st.integers(1, 65535), min_size=1, max_size=3))
        )
        eps = tuple(
            Endpoint(
                address=f"10.0.{draw(st.integers(0, 3))}.{draw(st.integers(1, 9))}",
                port=draw(st.integers(1, 65535)),
                service_port=draw(st.sampled_from([p.port for p in ports])),
                ready=draw(st.booleans()),
                gpu=draw(st.booleans()),
                pod_namespace=ns,
                pod_name=draw(st.sampled_from(["", "p0", "p1"])),
            )
            for _ in range(draw(st.integers(0, 4)))
        )
        cfg = ServiceConfig(
            enabled=True,
            default_priority=draw(st.sampled_from(list(Priority))),
            critical_callers=tuple(draw(st.lists(st.sampled_from(["a/b", "a/*", "x"])))),
            max_concurrency=draw(st.none() | st.integers(1, 64)),
            mtls=draw(st.sampled_from(list(MtlsMode))),
        )
        services.append(InferenceService(ns, name, ports, cfg, endpoints=eps))
    return World(services=tuple(services))


@settings(max_examples=40, deadline=None)
@given(
    the_world=_worlds(),
    kind=st.sampled_from(["sidecar", "gateway", "proxyless"]),
    namespace=_names,
)
def test_any_world_gives_consistent_config(the_world: World, kind: str, namespace: str) -> None:
    who = {
        "sidecar": proxy(namespace=namespace, pod="p0", ip="10.0.0.1"),
        "gateway": gateway(namespace=namespace),
        "proxyless": proxy(namespace=namespace, proxyless=True),
    }[kind]
    resources = build(the_world, who, {(namespace, "p1"): proxy(pod="p1", namespace=namespace)})
    _references_resolve(resources)
    for route_config in resources[xds.ROUTE]:
        domains = [d for vhost in route_config.virtual_hosts for d in vhost.domains]
        assert len(domains) == len(set(domains))
        assert all(vhost.domains for vhost in route_config.virtual_hosts)
