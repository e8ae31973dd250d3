from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

import pytest

from mesh import xds
from mesh.model import MtlsMode, Priority, Workload, World
from mesh.proxy import DEFAULT_INBOUND_PORT
from routing import endpoints, generate, simulate
from routing.limits import RateLimitOptions
from routing.simulate import SimEndpoint
from tests.routing.factories import (
    build,
    cluster_name,
    config,
    endpoint,
    llama_world,
    proxy,
    service,
    world,
)

CRITICAL = cluster_name(Priority.CRITICAL)


def _endpoints(resources: Any, cluster: str = CRITICAL) -> tuple[SimEndpoint, ...]:
    found = simulate.cluster_endpoints(resources, cluster)
    assert not isinstance(found, simulate.NoRoute), found
    return found


def test_gpu_at_priority_0_fallback_at_1_unready_left_out() -> None:
    resources = build(llama_world(), proxy(), {})
    assert _endpoints(resources) == (
        SimEndpoint("10.0.0.1", 9000, 0, via_sidecar=False),
        SimEndpoint("10.0.0.2", 9000, 0, via_sidecar=False),
        SimEndpoint("10.0.0.3", 9000, 1, via_sidecar=False),
    )


@pytest.mark.parametrize("priority", list(Priority))
def test_every_class_cluster_has_the_same_endpoints(priority: Priority) -> None:
    resources = build(llama_world(), proxy(), {})
    assert _endpoints(resources, cluster_name(priority)) == _endpoints(resources)


def test_without_gpu_endpoints_the_fallback_is_priority_0() -> None:
    svc = service(endpoints=[endpoint("10.0.0.3", pod="cpu-0")])
    resources = build(world(svc), proxy(), {})
    assert [e.priority for e in _endpoints(resources)] == [0]


def test_no_ready_endpoints_gives_an_empty_assignment() -> None:
    svc = service(endpoints=[endpoint("10.0.0.1", gpu=True, ready=False, pod="gpu-0")])
    resources = build(world(svc), proxy(), {})
    assert _endpoints(resources) == ()


def test_every_locality_has_weight_1_and_the_high_overprovisioning_factor() -> None:
    resources = build(llama_world(), proxy(), {})
    for assignment in resources[xds.ENDPOINT]:
        assert assignment.policy.overprovisioning_factor.value == (
            endpoints.OVERPROVISIONING_FACTOR
        )
        assert [loc.load_balancing_weight.value for loc in assignment.endpoints] == [1, 1]


def test_pods_with_a_connected_sidecar_are_addressed_at_its_inbound_port() -> None:
    sidecars = {("default", "gpu-0"): proxy(pod="gpu-0", ip="10.0.0.1", inbound_port=15106)}
    resources = build(llama_world(), proxy(), sidecars)
    assert _endpoints(resources)[0] == SimEndpoint("10.0.0.1", 15106, 0, via_sidecar=True)
    assert _endpoints(resources)[1] == SimEndpoint("10.0.0.2", 9000, 0, via_sidecar=False)


def _declaring(the_world: World, *pods: str) -> World:
    """``the_world`` with a Pod for each of ``pods`` whose manifest declares the sidecar."""
    workloads = {
        ("default", p): Workload("default", p, service_account=p, sidecar=True) for p in pods
    }
    return dataclasses.replace(the_world, workloads=MappingProxyType(workloads))


def test_a_pod_that_declares_a_sidecar_is_reached_through_it_before_it_connects() -> None:
    """As Istio decides mTLS by injection: the declared sidecar's default inbound port,
    at the pod's IP, whether or not that sidecar is connected."""
    resources = build(_declaring(llama_world(), "gpu-0"), proxy(), {})
    assert _endpoints(resources)[0] == SimEndpoint("10.0.0.1", DEFAULT_INBOUND_PORT, 0, True)
    assert _endpoints(resources)[1] == SimEndpoint("10.0.0.2", 9000, 0, via_sidecar=False)
    # A strict Service keeps it: its sidecar terminates mTLS.
    strict = build(_declaring(llama_world(config(mtls=MtlsMode.STRICT)), "gpu-0"), proxy(), {})
    assert _endpoints(strict) == (SimEndpoint("10.0.0.1", DEFAULT_INBOUND_PORT, 0, True),)


def test_a_declared_sidecar_connecting_with_the_defaults_changes_nothing() -> None:
    """So a control plane that restarts, or a sidecar that reconnects, sends no endpoint
    anew; a connected sidecar's own port still wins when it differs."""
    declared = _declaring(llama_world(), "gpu-0", "gpu-1")
    alone = build(declared, proxy(), {})
    connected = {("default", "gpu-0"): proxy(pod="gpu-0", ip="10.0.0.1")}
    assert _bytes(build(declared, proxy(), connected)) == _bytes(alone)
    moved = {("default", "gpu-0"): proxy(pod="gpu-0", ip="10.0.0.1", inbound_port=15106)}
    assert _endpoints(build(declared, proxy(), moved))[0].port == 15106


def test_an_unready_pod_with_a_sidecar_is_left_out_like_any_other() -> None:
    resources = build(_declaring(llama_world(), "gpu-2"), proxy(), {})
    assert all(e.address != "10.0.0.4" for e in _endpoints(resources))


def _bytes(resources: dict[str, list[Any]]) -> dict[str, list[bytes]]:
    return {t: [m.SerializeToString(deterministic=True) for m in ms] for t, ms in resources.items()}


def test_a_sidecar_bound_to_one_address_is_reached_at_that_address() -> None:
    sidecar = proxy(pod="gpu-0", ip="127.0.0.1", bind_address="127.0.0.7", inbound_port=15106)
    resources = build(llama_world(), proxy(), {("default", "gpu-0"): sidecar})
    assert SimEndpoint("127.0.0.7", 15106, 0, via_sidecar=True) in _endpoints(resources)


def test_a_sidecar_in_another_namespace_is_not_this_pod() -> None:
    sidecar = proxy(pod="gpu-0", namespace="other", inbound_port=15106)
    resources = build(llama_world(), proxy(), {("other", "gpu-0"): sidecar})
    assert not any(e.via_sidecar for e in _endpoints(resources))


def test_strict_services_keep_only_sidecar_endpoints() -> None:
    sidecars = {("default", "cpu-0"): proxy(pod="cpu-0", ip="10.0.0.3")}
    resources = build(llama_world(config(mtls=MtlsMode.STRICT)), proxy(), sidecars)
    assert _endpoints(resources) == (SimEndpoint("10.0.0.3", 15006, 0, via_sidecar=True),)


def test_duplicate_addresses_are_merged_gpu_first() -> None:
    svc = service(endpoints=[endpoint("10.0.0.9"), endpoint("10.0.0.9", gpu=True)])
    resources = build(world(svc), proxy(), {})
    assert _endpoints(resources) == (SimEndpoint("10.0.0.9", 9000, 0, via_sidecar=False),)


@pytest.mark.parametrize(
    ("unhealthy", "loads"),
    [
        (set(), (100, 0)),
        ({("10.0.0.1", 9000)}, (100, 0)),
        ({("10.0.0.1", 9000), ("10.0.0.2", 9000)}, (0, 100)),
        ({("10.0.0.1", 9000), ("10.0.0.2", 9000), ("10.0.0.3", 9000)}, (100, 0)),
    ],
)
def test_fallback_only_gets_load_when_no_gpu_host_is_healthy(
    unhealthy: set[tuple[str, int]], loads: tuple[int, ...]
) -> None:
    resources = build(llama_world(), proxy(), {})
    assert simulate.priority_loads(resources, CRITICAL, frozenset(unhealthy)) == loads


def test_envoys_default_factor_would_spill_early() -> None:
    """The reason for the factor: with Envoy's default 140, one of two GPU hosts down
    already sends 30 % to the fallback."""
    resources = build(llama_world(), proxy(), {})
    for assignment in resources[xds.ENDPOINT]:
        assignment.ClearField("policy")
    assert simulate.priority_loads(resources, CRITICAL, frozenset({("10.0.0.1", 9000)})) == (
        70,
        30,
    )


def test_many_gpu_hosts_with_one_healthy_keep_all_load() -> None:
    gpus = [endpoint(f"10.0.{i // 250}.{i % 250 + 1}", gpu=True, pod=f"g{i}") for i in range(1000)]
    svc = service(endpoints=[*gpus, endpoint("10.9.9.9", pod="cpu")])
    resources = build(world(svc), proxy(), {})
    unhealthy = frozenset((e.address, e.port) for e in gpus[1:])
    assert simulate.priority_loads(resources, CRITICAL, unhealthy) == (100, 0)


def test_queue_weights_weigh_every_endpoint_of_a_priority_or_none() -> None:
    the_world = llama_world()
    plain = build(the_world, proxy(), {})
    (assignment,) = [
        a for a in plain[xds.ENDPOINT] if a.cluster_name == cluster_name(Priority.STANDARD)
    ]
    for locality in assignment.endpoints:
        assert not any(lb.HasField("load_balancing_weight") for lb in locality.lb_endpoints)
    weights = MappingProxyType({"default/gpu-0:9000": 8})
    weighed: Any = generate(the_world, proxy(), {}, limits=RateLimitOptions(weights=weights))
    for priority in Priority:
        (found,) = [a for a in weighed[xds.ENDPOINT] if a.cluster_name == cluster_name(priority)]
        gpu, fallback = found.endpoints
        by_address = {
            lb.endpoint.address.socket_address.address: lb.load_balancing_weight.value
            for lb in gpu.lb_endpoints
        }
        assert by_address == {"10.0.0.1": 8, "10.0.0.2": endpoints.FULL_WEIGHT}
        # The fallback has no queue: it keeps Envoy's default weighting.
        assert not fallback.lb_endpoints[0].HasField("load_balancing_weight")
