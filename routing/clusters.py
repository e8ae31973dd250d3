"""Clusters: one EDS cluster per priority class per Service port, and admission at the pod.

Every outbound class cluster of a Service port has the same endpoints; what differs is,
through the routes, its Envoy route priority, retries and timeout.

Admission at the pod
====================

``max-concurrency`` is what one endpoint serves at once, whatever the number of callers,
so it is enforced where every caller's requests meet: the endpoint's own sidecar. Its
inbound side has one cluster per class and Service port, ``inbound|PORT|CLASS|HOST``,
each pointing at the workload, each with circuit breakers that admit at most the class's
cap (:func:`ratelimit.adaptive.class_limits`: its share of ``max-concurrency``, or the
cap the Service names for it, scaled by the adaptive controller). Envoy refuses a
request over the cap at once with 503 and the response flag ``UO``; the inbound
listener's local reply mapper (:mod:`routing.listeners`) adds
``x-inferlane-refused: concurrency``, and the caller's retry policy
(:mod:`routing.routes`) tries another endpoint on that header. Critical has no share,
so it is never capped unless the Service names a cap for it.

The caps must refuse, not queue: an HTTP/1.1 upstream carries one request per
connection, and a request that finds every connection busy waits as *pending* until a
connection is free, which ``max_requests`` never sees. So connections and pending
requests are unbounded, and ``max_requests`` alone is the cap: a request beyond it is
refused the moment it would be attached to a connection.

Callers do not cap a class themselves: with N callers, a per-caller cap lets a class
hold N times its share of a pod. They keep a cap only for a Service port some of whose
endpoints are reached without a sidecar (nothing else would cap those), and then only as
a best effort, per caller, sized on the endpoints whether ready or not (so that an
endpoint going unready changes its load assignment, never a cluster). Instead they bound
retries: standard and sheddable retry within a retry budget, so refusals under overload
cannot turn into a retry storm.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
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
#: class is not capped. Envoy's own defaults (1024 requests, 3 concurrent retries per
#: cluster) could throttle critical traffic on a busy proxy.
GENEROUS: Final = 100_000

#: Retry budget of the lower classes: concurrent retries may be this percentage of the
#: class's active and pending requests (Envoy's default), and at least
#: :data:`RETRY_BUDGET_MIN` (Envoy's default too). A retry counts from the moment Envoy
#: decides it until the retried attempt's response headers arrive (for a stream, its
#: first bytes; for a whole answer, its end). When refusals come in a flood, the ones
#: over the budget fail fast instead of multiplying the load.
RETRY_BUDGET_PERCENT: Final = 20.0
RETRY_BUDGET_MIN: Final = 3

#: The key of a cluster's HTTP protocol options in ``typed_extension_protocol_options``.
HTTP_OPTIONS: Final = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass(frozen=True)
class Limits:
    """Circuit-breaker thresholds for one route priority of one cluster."""

    max_connections: int
    max_pending_requests: int
    max_requests: int
    max_retries: int
    #: Concurrent retries as a percentage of active requests; when set, Envoy ignores
    #: ``max_retries``.
    retry_budget_percent: float | None = None


GENEROUS_LIMITS: Final = Limits(GENEROUS, GENEROUS, GENEROUS, GENEROUS)


def _budgeted(priority: Priority, limits: Limits) -> Limits:
    """``limits`` with the lower classes' retry budget (critical keeps its retries)."""
    if priority is Priority.CRITICAL:
        return limits
    return dataclasses.replace(limits, retry_budget_percent=RETRY_BUDGET_PERCENT)


def caller_limits(
    config: ServiceConfig, priority: Priority, targets: Sequence[endpoints.Target]
) -> Limits:
    """The caller's thresholds of ``priority``'s outbound cluster, for a Service port whose
    reachable endpoints, ready or not, are ``targets``.

    Generous, with the lower classes' retry budget, when every target is an endpoint's
    sidecar (which admits the class itself). Otherwise the class's cap per endpoint
    times the endpoints that serve (the GPU-backed ones when there are any, since the
    fallback takes traffic only when none is healthy), at least 1. Upstream connections
    are HTTP/1.1, one request each, so connections and pending requests get the same cap;
    concurrent retries a quarter of it, so retries cannot double the load.

    Counted whether ready or not: readiness flaps (a probe failing under load) must move
    the load assignment only. A changed cluster is re-warmed by every caller's Envoy, its
    connection pools rebuilt, and it is sent to every proxy with its endpoints; and this
    cap is only a per-caller best effort for endpoints without a sidecar (with N callers,
    a class may hold N times its share there), not the admission, which each endpoint's
    sidecar does.
    """
    per_endpoint = config.concurrency_for(priority)
    if per_endpoint is None or all(t.via_sidecar for t in targets):
        return _budgeted(priority, GENEROUS_LIMITS)
    serving = sum(1 for t in targets if t.gpu) or len(targets)
    cap = max(1, math.floor(per_endpoint * serving))
    return _budgeted(priority, Limits(cap, cap, cap, max(1, cap // 4)))


def admission_limits(cap: int | None) -> Limits:
    """An inbound class cluster's thresholds: at most ``cap`` requests at once (None:
    uncapped), with connections and pending requests unbounded so that a request over
    the cap is refused, not queued (see the module docstring)."""
    if cap is None:
        return GENEROUS_LIMITS
    return Limits(GENEROUS, GENEROUS, max(1, cap), GENEROUS)


def _thresholds(priority: int, limits: Limits) -> Any:
    thresholds = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        priority=priority,
        max_connections=wrappers_pb2.UInt32Value(value=limits.max_connections),
        max_pending_requests=wrappers_pb2.UInt32Value(value=limits.max_pending_requests),
        max_requests=wrappers_pb2.UInt32Value(value=limits.max_requests),
        max_retries=wrappers_pb2.UInt32Value(value=limits.max_retries),
    )
    if limits.retry_budget_percent is not None:
        thresholds.retry_budget.budget_percent.value = limits.retry_budget_percent
        thresholds.retry_budget.min_retry_concurrency.value = RETRY_BUDGET_MIN
    return thresholds


def circuit_breakers(limits: Limits, high: Limits = GENEROUS_LIMITS) -> Any:
    """DEFAULT thresholds carry ``limits``; HIGH, which only critical routes use,
    ``high`` (generous unless given)."""
    return circuit_breaker_pb2.CircuitBreakers(
        thresholds=[_thresholds(base_pb2.DEFAULT, limits), _thresholds(base_pb2.HIGH, high)]
    )


#: Consecutive connection failures, resets and timeouts that eject a host (Envoy's default).
LOCAL_ORIGIN_FAILURES: Final = 5


def outlier_detection() -> Any:
    """Eject a host that cannot be reached, never one that answers; allow ejecting every host.

    A full endpoint answers 503 (a refusal for concurrency, which callers retry
    elsewhere), so 5xx responses must not eject: a pod refusing sheddable still has room
    for critical. Envoy therefore counts errors of local origin (connection failures,
    resets, timeouts: a pod or its sidecar gone) apart from the responses
    (``split_external_local_origin_errors``), and only those eject; a pod whose sidecar
    answers but whose model server fails is left to its readiness probe.
    ``max_ejection_percent`` 100 matters: with Envoy's default of 10 % a dead GPU host
    could stay in the set, and the fallback priority would never take over.
    """
    off = wrappers_pb2.UInt32Value(value=0)
    return outlier_detection_pb2.OutlierDetection(
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=wrappers_pb2.UInt32Value(value=LOCAL_ORIGIN_FAILURES),
        enforcing_consecutive_local_origin_failure=wrappers_pb2.UInt32Value(value=100),
        enforcing_consecutive_5xx=off,
        enforcing_consecutive_gateway_failure=off,
        enforcing_success_rate=off,
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
    targets: Sequence[endpoints.Target],
    *,
    proxyless: bool = False,
) -> Any:
    """``outbound|PORT|CLASS|HOST``: EDS over ADS, least-request, no panic spill; its
    thresholds from ``targets``, the port's reachable endpoints (:func:`caller_limits`).

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
        circuit_breakers=circuit_breakers(caller_limits(svc.config, priority, targets)),
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


def inbound_cluster(
    svc: InferenceService, endpoint: Endpoint, proxy: Proxy, priority: Priority, cap: int | None
) -> Any:
    """``inbound|PORT|CLASS|HOST``: STATIC, the sidecar's own workload
    (:func:`inbound_target`), admitting at most ``cap`` requests of the class at once
    (None: no cap).

    The same thresholds at both route priorities: only this class's routes use the
    cluster, whatever their priority.
    """
    name = names.inbound_cluster(endpoint.service_port, svc.hostname, priority)
    target = inbound_target(proxy, endpoint)
    limits = admission_limits(cap)
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=CONNECT_TIMEOUT_S),
        load_assignment=endpoints.load_assignment(name, (target,)),
        circuit_breakers=circuit_breakers(limits, limits),
    )
    for key, value in http1_upstream().items():
        cluster.typed_extension_protocol_options[key].CopyFrom(value)
    return cluster
