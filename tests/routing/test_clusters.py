from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from mesh import xds
from mesh.model import Priority, ServiceConfig, Workload
from routing import clusters, generate
from routing.endpoints import Target
from routing.limits import RateLimitOptions
from tests.routing.factories import build, cluster_name, config, llama_world, proxy

_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _cluster(resources: Any, name: str) -> Any:
    (found,) = [c for c in resources[xds.CLUSTER] if c.name == name]
    return found


def _thresholds(cluster: Any) -> dict[int, Any]:
    return {t.priority: t for t in cluster.circuit_breakers.thresholds}


def _targets(gpu: int, fallback: int = 0, *, via_sidecar: bool = False) -> list[Target]:
    return [Target(f"10.0.0.{i}", 9000, i < gpu, via_sidecar) for i in range(gpu + fallback)]


@pytest.mark.parametrize(
    ("priority", "max_concurrency", "gpu", "fallback", "cap"),
    [
        (Priority.CRITICAL, 8, 2, 0, None),
        (Priority.STANDARD, 8, 2, 0, 12),
        (Priority.SHEDDABLE, 8, 2, 0, 8),
        # The fallback pod does not count while a GPU-backed one serves.
        (Priority.SHEDDABLE, 8, 2, 1, 8),
        (Priority.SHEDDABLE, 8, 0, 2, 8),
        (Priority.STANDARD, 3, 1, 0, 2),
        (Priority.SHEDDABLE, 1, 1, 0, 1),
        (Priority.SHEDDABLE, 8, 0, 0, None),  # nothing to cap
        (Priority.STANDARD, None, 2, 0, None),
    ],
)
def test_callers_cap_a_class_only_for_endpoints_without_a_sidecar(
    priority: Priority, max_concurrency: int | None, gpu: int, fallback: int, cap: int | None
) -> None:
    cfg = config(max_concurrency=max_concurrency)
    limits = clusters.caller_limits(cfg, priority, _targets(gpu, fallback))
    if cap is None:
        assert limits.max_requests == clusters.GENEROUS
    else:
        assert (limits.max_requests, limits.max_pending_requests, limits.max_connections) == (
            cap,
            cap,
            cap,
        )
    # Behind sidecars the endpoints admit each class themselves: callers never cap.
    behind = clusters.caller_limits(cfg, priority, _targets(gpu, fallback, via_sidecar=True))
    assert behind.max_requests == clusters.GENEROUS


@pytest.mark.parametrize("priority", list(Priority))
def test_lower_classes_retry_within_a_budget(priority: Priority) -> None:
    pods = ("gpu-0", "gpu-1", "cpu-0", "gpu-2")
    sidecars = {("default", p): proxy(pod=p, ip=f"10.0.0.{i + 1}") for i, p in enumerate(pods)}
    resources = build(llama_world(config(max_concurrency=4)), proxy(), sidecars)
    thresholds = _thresholds(_cluster(resources, cluster_name(priority)))
    # The thresholds of the route priority the class's routes use.
    used = thresholds[base_pb2.HIGH if priority is Priority.CRITICAL else base_pb2.DEFAULT]
    assert used.max_requests.value == clusters.GENEROUS
    if priority is Priority.CRITICAL:
        assert not used.HasField("retry_budget")
        assert used.max_retries.value == clusters.GENEROUS
    else:
        assert used.retry_budget.budget_percent.value == clusters.RETRY_BUDGET_PERCENT
        assert used.retry_budget.min_retry_concurrency.value == clusters.RETRY_BUDGET_MIN


@pytest.mark.parametrize("priority", list(Priority))
def test_class_cluster_shape(priority: Priority) -> None:
    resources = build(llama_world(), proxy(), {})
    cluster = _cluster(resources, cluster_name(priority))
    assert cluster.type == cluster_pb2.Cluster.EDS
    assert cluster.eds_cluster_config.eds_config.HasField("ads")
    assert cluster.eds_cluster_config.eds_config.resource_api_version == config_source_pb2.V3
    assert cluster.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert cluster.common_lb_config.HasField("healthy_panic_threshold")
    assert cluster.common_lb_config.healthy_panic_threshold.value == 0.0
    assert cluster.outlier_detection.max_ejection_percent.value == 100
    options = http_protocol_options_pb2.HttpProtocolOptions()
    cluster.typed_extension_protocol_options[_HTTP_OPTIONS].Unpack(options)
    assert options.explicit_http_config.HasField("http_protocol_options")


def test_caller_thresholds_are_generous_at_high_priority() -> None:
    resources = build(llama_world(config(max_concurrency=4)), proxy(), {})
    for priority in Priority:
        high = _thresholds(_cluster(resources, cluster_name(priority)))[base_pb2.HIGH]
        assert high.max_requests.value == clusters.GENEROUS
    critical = _thresholds(_cluster(resources, cluster_name(Priority.CRITICAL)))
    assert critical[base_pb2.DEFAULT].max_requests.value == clusters.GENEROUS


def test_lower_classes_get_a_share_of_serving_capacity_without_sidecars() -> None:
    # Three GPU endpoints, one of them unready (the fallback does not count): 4 x 3 = 12.
    resources = build(llama_world(config(max_concurrency=4)), proxy(), {})
    standard = _thresholds(_cluster(resources, cluster_name(Priority.STANDARD)))
    sheddable = _thresholds(_cluster(resources, cluster_name(Priority.SHEDDABLE)))
    assert standard[base_pb2.DEFAULT].max_requests.value == 9
    assert standard[base_pb2.DEFAULT].max_pending_requests.value == 9
    assert sheddable[base_pb2.DEFAULT].max_requests.value == 6


@pytest.mark.parametrize("sidecar", [False, True])
def test_an_endpoint_going_unready_changes_its_load_assignments_only(sidecar: bool) -> None:
    """Readiness moves endpoints, never clusters: not the callers' caps (sized on every
    reachable endpoint), nor the SPIFFE IDs a cluster's mTLS accepts."""
    cfg = config(max_concurrency=4)
    ready = llama_world(cfg)
    (svc,) = ready.services
    flipped = dataclasses.replace(
        svc,
        endpoints=tuple(
            dataclasses.replace(e, ready=False) if e.pod_name == "gpu-1" else e
            for e in svc.endpoints
        ),
    )
    workloads = {
        ("default", p): Workload("default", p, service_account=p, sidecar=sidecar)
        for p in ("gpu-0", "gpu-1", "gpu-2", "cpu-0", "client-0")
    }
    before = dataclasses.replace(ready, workloads=MappingProxyType(workloads))
    after = dataclasses.replace(before, services=(flipped,))
    first, second = build(before, proxy(), {}), build(after, proxy(), {})
    for type_url in (xds.CLUSTER, xds.ROUTE, xds.LISTENER):
        assert _serialized(first[type_url]) == _serialized(second[type_url]), type_url
    assert _serialized(first[xds.ENDPOINT]) != _serialized(second[xds.ENDPOINT])


def _serialized(messages: list[Any]) -> list[bytes]:
    return [m.SerializeToString(deterministic=True) for m in messages]


def test_proxyless_clusters_are_round_robin_without_http1_options() -> None:
    resources = build(llama_world(), proxy(proxyless=True), {})
    for cluster in resources[xds.CLUSTER]:
        assert cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
        assert not cluster.typed_extension_protocol_options


def _inbound(resources: Any, priority: Priority) -> Any:
    return _cluster(resources, f"inbound|8000|{priority.value}|llama.default.svc.cluster.local")


@pytest.mark.parametrize(("workload", "expected"), [(None, "127.0.0.1"), ("::1", "::1")])
def test_inbound_clusters_are_static_at_the_workload_over_loopback(
    workload: str | None, expected: str
) -> None:
    """Every class's inbound cluster: the pod's own port on loopback, never the pod IP: the
    workload need not listen where other pods reach it."""
    me = proxy(pod="gpu-0", ip="10.0.0.1")
    if workload is not None:
        me = dataclasses.replace(me, workload_address=workload)
    resources = build(llama_world(), me, {})
    for priority in Priority:
        inbound = _inbound(resources, priority)
        assert inbound.type == cluster_pb2.Cluster.STATIC
        (locality,) = inbound.load_assignment.endpoints
        (lb,) = locality.lb_endpoints
        address = lb.endpoint.address.socket_address
        assert (address.address, address.port_value) == (expected, 9000)


@pytest.mark.parametrize(
    ("annotation", "caps"),
    [
        # Shares of max-concurrency; critical has none.
        (config(max_concurrency=8), {Priority.STANDARD: 6, Priority.SHEDDABLE: 4}),
        (config(max_concurrency=1), {Priority.STANDARD: 1, Priority.SHEDDABLE: 1}),
        # A cap the Service names replaces the share; naming critical caps it.
        (
            dataclasses.replace(
                config(max_concurrency=8),
                class_concurrency=MappingProxyType({Priority.CRITICAL: 9, Priority.SHEDDABLE: 2}),
            ),
            {Priority.CRITICAL: 9, Priority.STANDARD: 6, Priority.SHEDDABLE: 2},
        ),
        (config(), {}),
    ],
)
def test_inbound_clusters_admit_each_class_its_cap_of_this_endpoint(
    annotation: ServiceConfig, caps: dict[Priority, int]
) -> None:
    resources = build(llama_world(annotation), proxy(pod="gpu-0", ip="10.0.0.1"), {})
    for priority in Priority:
        thresholds = _thresholds(_inbound(resources, priority))
        for level in (base_pb2.DEFAULT, base_pb2.HIGH):
            t = thresholds[level]
            assert t.max_requests.value == caps.get(priority, clusters.GENEROUS)
            # Over the cap is refused, never queued: connections and pending are unbounded.
            assert t.max_connections.value == t.max_pending_requests.value == clusters.GENEROUS


def test_inbound_caps_follow_this_endpoints_adaptive_multipliers() -> None:
    adaptive = dataclasses.replace(config(max_concurrency=8), adaptive=True)
    the_world = llama_world(adaptive)
    options = RateLimitOptions(
        multipliers=MappingProxyType(
            {"default/gpu-0:9000": MappingProxyType({Priority.SHEDDABLE: 0.25})}
        )
    )
    mine = generate(the_world, proxy(pod="gpu-0", ip="10.0.0.1"), {}, limits=options)
    other = generate(the_world, proxy(pod="gpu-1", ip="10.0.0.2"), {}, limits=options)
    assert _thresholds(_inbound(mine, Priority.SHEDDABLE))[0].max_requests.value == 1
    assert _thresholds(_inbound(mine, Priority.STANDARD))[0].max_requests.value == 6
    assert _thresholds(_inbound(other, Priority.SHEDDABLE))[0].max_requests.value == 4
