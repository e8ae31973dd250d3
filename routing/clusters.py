"""Clusters: one EDS cluster per priority class per Service port, plus inbound clusters.

Every class cluster of a Service port has the same endpoints; what differs is how much of
them a class may use at once (circuit breakers) and, through the routes, its Envoy route
priority, retries and timeout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, protocol_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from mesh.model import Endpoint, InferenceService, Priority, ServiceConfig
from mesh.proxy import Proxy
from routing import endpoints, names
from routing.protos import ads_config_source, pack

#: Time to set up a TCP connection to a pod on the cluster network. Short, so that a
#: critical request whose first host does not answer is retried elsewhere quickly.
CONNECT_TIMEOUT_S: Final = 2

#: Limits that never bind in practice, for critical (its HIGH thresholds) and wherever a
#: Service sets no max-concurrency. Envoy's own defaults (1024 requests, 3 concurrent
#: retries per cluster) could throttle critical traffic on a busy proxy.
GENEROUS: Final = 100_000

#: Shares of a Service's capacity (max-concurrency x ready endpoints) that each class may
#: have in flight from one proxy. critical may use all of it; standard three quarters, so
#: a quarter stays free for critical even when standard saturates; sheddable half, so it
#: is throttled first and can never crowd standard out on its own. Requests over a share
#: queue as pending up to the same number, then fail fast with 503 (x-envoy-overloaded).
CLASS_SHARE: Final[dict[Priority, float]] = {
    Priority.CRITICAL: 1.0,
    Priority.STANDARD: 0.75,
    Priority.SHEDDABLE: 0.5,
}

#: The key of a cluster's HTTP protocol options in ``typed_extension_protocol_options``.
HTTP_OPTIONS: Final = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass(frozen=True)
class Limits:
    """Circuit-breaker thresholds for one route priority of one cluster."""

    max_connections: int
    max_pending_requests: int
    max_requests: int
    max_retries: int


GENEROUS_LIMITS: Final = Limits(GENEROUS, GENEROUS, GENEROUS, GENEROUS)


def class_limits(config: ServiceConfig, priority: Priority, ready_endpoints: int) -> Limits:
    """The thresholds of ``priority``'s cluster, from the Service's max-concurrency.

    The cap is ``floor(share x max_concurrency x ready_endpoints)``, at least 1. Upstream
    connections are HTTP/1.1, one request each, so max_connections gets the same cap.
    Concurrent retries are held to a quarter of it, so retries cannot double the load.
    """
    share = CLASS_SHARE[priority]
    if config.max_concurrency is None or share >= 1.0:
        return GENEROUS_LIMITS
    cap = max(1, math.floor(share * config.max_concurrency * ready_endpoints))
    return Limits(cap, cap, cap, max(1, cap // 4))


def _thresholds(priority: int, limits: Limits) -> Any:
    return circuit_breaker_pb2.CircuitBreakers.Thresholds(
        priority=priority,
        max_connections=wrappers_pb2.UInt32Value(value=limits.max_connections),
        max_pending_requests=wrappers_pb2.UInt32Value(value=limits.max_pending_requests),
        max_requests=wrappers_pb2.UInt32Value(value=limits.max_requests),
        max_retries=wrappers_pb2.UInt32Value(value=limits.max_retries),
    )


def circuit_breakers(limits: Limits) -> Any:
    """DEFAULT thresholds carry the class's limits; HIGH, which only critical routes use,
    is always generous."""
    return circuit_breaker_pb2.CircuitBreakers(
        thresholds=[
            _thresholds(base_pb2.DEFAULT, limits),
            _thresholds(base_pb2.HIGH, GENEROUS_LIMITS),
        ]
    )


def outlier_detection() -> Any:
    """Eject a host after repeated failures, and allow ejecting every host.

    ``max_ejection_percent`` 100 matters: with Envoy's default of 10 % a dead GPU host
    could stay in the set, and the fallback priority would never take over.
    """
    return outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=wrappers_pb2.UInt32Value(value=5),
        consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=3),
        enforcing_consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=100),
        interval=duration_pb2.Duration(seconds=5),
        base_ejection_time=duration_pb2.Duration(seconds=15),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=100),
    )


def http1_upstream() -> dict[str, Any]:
    """``typed_extension_protocol_options`` for plain HTTP/1.1 upstreams (vLLM's protocol)."""
    options = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions()
        )
    )
    return {HTTP_OPTIONS: pack(options)}


def outbound_cluster(
    svc: InferenceService,
    port: int,
    priority: Priority,
    ready_endpoints: int,
    *,
    proxyless: bool = False,
) -> Any:
    """``outbound|PORT|CLASS|HOST``: EDS over ADS, least-request, no panic spill.

    ``healthy_panic_threshold`` 0 disables Envoy's panic mode, which would otherwise send
    traffic to unhealthy GPU hosts (and never to the fallback) once under half of a
    priority's hosts are healthy. For a proxyless gRPC client the cluster is round-robin
    (grpcio NACKs LEAST_REQUEST: "LB policy is not supported") and carries no HTTP/1.1
    options.
    """
    cluster = cluster_pb2.Cluster(
        name=names.outbound_cluster(port, priority, svc.hostname),
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_config_source()),
        connect_timeout=duration_pb2.Duration(seconds=CONNECT_TIMEOUT_S),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN
        if proxyless
        else cluster_pb2.Cluster.LEAST_REQUEST,
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            healthy_panic_threshold=percent_pb2.Percent(value=0.0)
        ),
        outlier_detection=outlier_detection(),
        circuit_breakers=circuit_breakers(class_limits(svc.config, priority, ready_endpoints)),
    )
    if not proxyless:
        for key, value in http1_upstream().items():
            cluster.typed_extension_protocol_options[key].CopyFrom(value)
    return cluster


def inbound_target(proxy: Proxy, endpoint: Endpoint) -> endpoints.Target:
    """Where ``proxy``, the sidecar of ``endpoint``'s pod, forwards what it admits: the
    endpoint's port on the loopback address (``proxy.workload_address``), inside the pod.

    Never the pod's IP: the workload need not listen there, so nothing outside the pod
    reaches it without passing the sidecar's mTLS, caller check and limits (with the
    NetworkPolicy ``inferlane inject`` writes, not even on ports it does listen on).
    """
    return endpoints.Target(proxy.workload_address, endpoint.port, endpoint.gpu, via_sidecar=False)


def inbound_cluster(svc: InferenceService, endpoint: Endpoint, proxy: Proxy) -> Any:
    """``inbound|PORT||HOST``: STATIC, the sidecar's own workload (:func:`inbound_target`)."""
    name = names.inbound_cluster(endpoint.service_port, svc.hostname)
    target = inbound_target(proxy, endpoint)
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=CONNECT_TIMEOUT_S),
        load_assignment=endpoints.load_assignment(name, (target,)),
        circuit_breakers=circuit_breakers(GENEROUS_LIMITS),
    )
    for key, value in http1_upstream().items():
        cluster.typed_extension_protocol_options[key].CopyFrom(value)
    return cluster
