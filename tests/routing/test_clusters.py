from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from mesh import xds
from mesh.model import Priority
from routing import clusters
from tests.routing.factories import build, cluster_name, config, llama_world, proxy

_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _cluster(resources: Any, name: str) -> Any:
    (found,) = [c for c in resources[xds.CLUSTER] if c.name == name]
    return found


def _thresholds(cluster: Any) -> dict[int, Any]:
    return {t.priority: t for t in cluster.circuit_breakers.thresholds}


@pytest.mark.parametrize(
    ("priority", "max_concurrency", "ready", "cap"),
    [
        (Priority.CRITICAL, 8, 2, None),
        (Priority.STANDARD, 8, 2, 12),
        (Priority.SHEDDABLE, 8, 2, 8),
        (Priority.STANDARD, 3, 1, 2),
        (Priority.SHEDDABLE, 1, 1, 1),
        (Priority.SHEDDABLE, 8, 0, 1),
        (Priority.STANDARD, None, 2, None),
    ],
)
def test_class_limits(
    priority: Priority, max_concurrency: int | None, ready: int, cap: int | None
) -> None:
    limits = clusters.class_limits(config(max_concurrency=max_concurrency), priority, ready)
    if cap is None:
        assert limits == clusters.GENEROUS_LIMITS
    else:
        assert (limits.max_requests, limits.max_pending_requests, limits.max_connections) == (
            cap,
            cap,
            cap,
        )


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


def test_critical_high_thresholds_are_generous() -> None:
    resources = build(llama_world(config(max_concurrency=4)), proxy(), {})
    for priority in Priority:
        high = _thresholds(_cluster(resources, cluster_name(priority)))[base_pb2.HIGH]
        assert high.max_requests.value == clusters.GENEROUS
    critical = _thresholds(_cluster(resources, cluster_name(Priority.CRITICAL)))
    assert critical[base_pb2.DEFAULT].max_requests.value == clusters.GENEROUS


def test_lower_classes_get_a_share_of_ready_capacity() -> None:
    # Two GPU endpoints and one fallback are ready: capacity 4 x 3 = 12.
    resources = build(llama_world(config(max_concurrency=4)), proxy(), {})
    standard = _thresholds(_cluster(resources, cluster_name(Priority.STANDARD)))
    sheddable = _thresholds(_cluster(resources, cluster_name(Priority.SHEDDABLE)))
    assert standard[base_pb2.DEFAULT].max_requests.value == 9
    assert standard[base_pb2.DEFAULT].max_pending_requests.value == 9
    assert sheddable[base_pb2.DEFAULT].max_requests.value == 6


def test_proxyless_clusters_are_round_robin_without_http1_options() -> None:
    resources = build(llama_world(), proxy(proxyless=True), {})
    for cluster in resources[xds.CLUSTER]:
        assert cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
        assert not cluster.typed_extension_protocol_options


@pytest.mark.parametrize(("workload", "expected"), [(None, "127.0.0.1"), ("::1", "::1")])
def test_inbound_cluster_targets_the_workload_over_loopback(
    workload: str | None, expected: str
) -> None:
    """The pod's own port on loopback, never the pod IP: the workload need not listen where
    other pods reach it (issue 11, #12)."""
    me = proxy(pod="gpu-0", ip="10.0.0.1")
    if workload is not None:
        me = dataclasses.replace(me, workload_address=workload)
    resources = build(llama_world(), me, {})
    inbound = _cluster(resources, "inbound|8000||llama.default.svc.cluster.local")
    assert inbound.type == cluster_pb2.Cluster.STATIC
    (locality,) = inbound.load_assignment.endpoints
    (lb,) = locality.lb_endpoints
    address = lb.endpoint.address.socket_address
    assert (address.address, address.port_value) == (expected, 9000)
