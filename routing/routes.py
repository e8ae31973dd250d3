"""Routes: per virtual host, one route per priority class and a catch-all default.

Each virtual host (one Service port) has, in order:

1. ``critical``, ``standard``, ``sheddable``: matched on ``x-inference-priority``
   (exact value, case-insensitive);
2. ``default``: everything else (header missing or unknown), served as the Service's
   default class.

An outbound route sets the header to the class the request is served as, so the server
side (its inbound rate limits and caller check) sees one canonical lowercase value. Where
the caller clamp applies, the ``critical`` route (and ``default`` when the default class
is critical) serve as ``standard`` instead: standard cluster, priority, retries, timeout,
and the header rewritten to ``standard``.

Retries. Every class retries a request that an endpoint's sidecar refused for
concurrency (503 with ``x-inferlane-refused: concurrency``, see :mod:`routing.clusters`)
on another endpoint, never one it already tried: a full pod must not fail a request
while another has room. Beyond that, critical retries on reset, connection failure and
any 503; standard only where the request surely never reached the model server;
sheddable on nothing else (it is the first traffic to shed).

Timeouts. ``inferlane.io/timeout`` is how long a request may go without a byte from the
model server: Envoy's route ``idle_timeout``, with the route's total timeout off. A
non-streamed response sends nothing until it is done, so its whole time is bounded, and
one timer spans every retry; a stream is cut only when its tokens stop for that long,
never while they flow. A request cut this way gets 504. (Envoy's route ``timeout`` and
``max_stream_duration`` both bound the whole response, and so cut long streams.)
gRPC's proxyless client implements neither idle timeouts nor header-based retries: it
gets ``max_stream_duration`` and critical's retry on ``unavailable``, as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import wrappers_pb2

from mesh.model import (
    PRIORITIES,
    PRIORITY_HEADER,
    REFUSED_HEADER,
    InferenceService,
    Priority,
    Refusal,
    SchedulingPolicy,
    ServicePort,
)
from mesh.proxy import Proxy
from routing import clamp, names, scheduling
from routing.protos import duration, pack

#: Critical: retried on another host (never the one that just failed) on these.
CRITICAL_RETRY_ON: Final = "reset,connect-failure,refused-stream,retriable-status-codes"
CRITICAL_RETRIABLE_STATUS: Final = (503,)
CRITICAL_RETRIES: Final = 2
#: How often the load balancer may re-pick to avoid a previously tried host.
HOST_SELECTION_ATTEMPTS: Final = 5
#: Standard: only where the request surely never reached the model server, and refusals.
STANDARD_RETRY_ON: Final = "connect-failure,refused-stream,retriable-headers"
#: Sheddable: only refusals.
SHEDDABLE_RETRY_ON: Final = "retriable-headers"
#: Retries of the lower classes: each on an endpoint not yet tried, so with four GPU pods
#: a request refused by three full ones still reaches the fourth.
LOWER_CLASS_RETRIES: Final = 3
#: Back-off between the lower classes' retries: a refusal is immediate and the next
#: endpoint is another one, so the wait is short (Envoy's default is 25 ms, doubling,
#: with full jitter).
LOWER_CLASS_BACKOFF_S: Final = 0.005
LOWER_CLASS_MAX_BACKOFF_S: Final = 0.05
#: gRPC status retried for proxyless clients (gRPC ignores HTTP-level retry conditions).
GRPC_RETRY_ON: Final = "unavailable"

_PREVIOUS_HOSTS: Final = "envoy.retry_host_predicates.previous_hosts"

#: Envoy route priority per class: HIGH has its own connection pool and circuit-breaker
#: thresholds, so critical is never queued behind the other classes.
ROUTE_PRIORITY: Final[dict[Priority, int]] = {
    Priority.CRITICAL: base_pb2.HIGH,
    Priority.STANDARD: base_pb2.DEFAULT,
    Priority.SHEDDABLE: base_pb2.DEFAULT,
}


def class_header_match(priority: Priority) -> Any:
    """``x-inference-priority`` equals ``priority``, ignoring case."""
    return route_components_pb2.HeaderMatcher(
        name=PRIORITY_HEADER,
        string_match=string_pb2.StringMatcher(exact=priority.value, ignore_case=True),
    )


def set_class_header(priority: Priority) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=PRIORITY_HEADER, value=priority.value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _refusal_match() -> Any:
    """The response header of a refusal for concurrency, which every class retries."""
    return route_components_pb2.HeaderMatcher(
        name=REFUSED_HEADER, string_match=string_pb2.StringMatcher(exact=Refusal.CONCURRENCY)
    )


def _other_hosts(policy: Any) -> Any:
    """Make each retry of ``policy`` pick a host not yet tried (in place)."""
    policy.retry_host_predicate.append(
        route_components_pb2.RetryPolicy.RetryHostPredicate(
            name=_PREVIOUS_HOSTS, typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate())
        )
    )
    policy.host_selection_retry_max_attempts = HOST_SELECTION_ATTEMPTS
    return policy


def retry_policy(priority: Priority, *, proxyless: bool = False) -> Any | None:
    """critical: up to two retries on reset, connection failure or 503 (a refusal is a
    503); standard: up to three, on connection failure or a refusal; sheddable: up to
    three, on a refusal only. Each retry goes to a host not yet tried.

    For a proxyless gRPC client: critical's policy plus ``unavailable``, and no retries
    for the other classes (gRPC retries on status codes only).
    """
    if priority is Priority.CRITICAL:
        retry_on = CRITICAL_RETRY_ON + (f",{GRPC_RETRY_ON}" if proxyless else "")
        return _other_hosts(
            route_components_pb2.RetryPolicy(
                retry_on=retry_on,
                num_retries=wrappers_pb2.UInt32Value(value=CRITICAL_RETRIES),
                retriable_status_codes=CRITICAL_RETRIABLE_STATUS,
            )
        )
    if proxyless:
        return None
    return _other_hosts(
        route_components_pb2.RetryPolicy(
            retry_on=STANDARD_RETRY_ON if priority is Priority.STANDARD else SHEDDABLE_RETRY_ON,
            num_retries=wrappers_pb2.UInt32Value(value=LOWER_CLASS_RETRIES),
            retriable_headers=[_refusal_match()],
            retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
                base_interval=duration(LOWER_CLASS_BACKOFF_S),
                max_interval=duration(LOWER_CLASS_MAX_BACKOFF_S),
            ),
        )
    )


def _class_timeout(action: Any, timeout_s: float, *, proxyless: bool = False) -> None:
    """Set the class timeout on ``action`` (in place): see the module docstring."""
    if proxyless:
        # gRPC clients enforce max_stream_duration, not timeout (nor idle timeouts).
        action.timeout.CopyFrom(duration(timeout_s))
        action.max_stream_duration.max_stream_duration.CopyFrom(duration(timeout_s))
    else:
        action.timeout.CopyFrom(duration(0))  # off: a stream lasts as long as it flows
        action.idle_timeout.CopyFrom(duration(timeout_s))


def route_action(
    cluster: str, served_as: Priority, timeout_s: float, *, proxyless: bool = False
) -> Any:
    """Send to ``cluster`` as ``served_as``: its route priority, retries and timeout."""
    action = route_components_pb2.RouteAction(cluster=cluster, priority=ROUTE_PRIORITY[served_as])
    policy = retry_policy(served_as, proxyless=proxyless)
    if policy is not None:
        action.retry_policy.CopyFrom(policy)
    _class_timeout(action, timeout_s, proxyless=proxyless)
    return action


def _match(requested: Priority | None) -> Any:
    match = route_components_pb2.RouteMatch(prefix="/")
    if requested is not None:
        match.headers.append(class_header_match(requested))
    return match


def _route_name(requested: Priority | None) -> str:
    return requested.value if requested is not None else names.DEFAULT_ROUTE


def _class_routes() -> Iterable[Priority | None]:
    """The class routes in match order; None is the catch-all."""
    return (*PRIORITIES, None)


def outbound_routes(
    svc: InferenceService, port: ServicePort, proxy: Proxy, *, proxyless: bool = False
) -> list[Any]:
    """The routes of ``svc``'s ``port`` for a caller ``proxy``, clamped for that caller."""
    routes = []
    for requested in _class_routes():
        wanted = requested if requested is not None else svc.config.default_priority
        served = clamp.effective_class(wanted, svc.config, proxy)
        cluster = names.outbound_cluster(port.port, served, svc.hostname)
        routes.append(
            route_components_pb2.Route(
                name=_route_name(requested),
                match=_match(requested),
                route=route_action(
                    cluster, served, svc.config.timeout_for(served), proxyless=proxyless
                ),
                request_headers_to_add=[set_class_header(served)],
            )
        )
    return routes


def inbound_routes(svc: InferenceService, port: ServicePort) -> list[Any]:
    """The inbound routes of ``svc``'s ``port``: per class, to that class's inbound
    cluster, which admits the class's cap of this endpoint (:mod:`routing.clusters`).

    They carry the class's priority and timeout, and no retries (the caller retries on
    another endpoint); they are where per-class rate limits and the critical-caller check
    attach. With ``scheduling-policy: priority`` each writes its class into the body for
    the model server's scheduler (:mod:`routing.scheduling`).
    """
    passes_class = svc.config.scheduling is SchedulingPolicy.PRIORITY
    routes = []
    for requested in _class_routes():
        served = requested if requested is not None else svc.config.default_priority
        action = route_components_pb2.RouteAction(
            cluster=names.inbound_cluster(port.port, svc.hostname, served),
            priority=ROUTE_PRIORITY[served],
        )
        _class_timeout(action, svc.config.timeout_for(served))
        route = route_components_pb2.Route(
            name=_route_name(requested), match=_match(requested), route=action
        )
        if passes_class:
            route.typed_per_filter_config[scheduling.LUA_FILTER].CopyFrom(
                scheduling.per_route(served)
            )
            route.request_body_buffer_limit.value = scheduling.MAX_BODY_BYTES
        routes.append(route)
    return routes


def virtual_host(
    svc: InferenceService, port: ServicePort, viewer_namespace: str, routes: Sequence[Any]
) -> Any:
    return route_components_pb2.VirtualHost(
        name=names.virtual_host(svc.hostname, port.port),
        domains=names.service_domains(svc, port, viewer_namespace),
        routes=list(routes),
    )


def route_configuration(name: str, virtual_hosts: Iterable[Any]) -> Any:
    """A RouteConfiguration; a domain already claimed by an earlier virtual host is
    dropped from later ones (Envoy rejects duplicates), and a host left without domains
    is dropped."""
    claimed: set[str] = set()
    kept = []
    for vhost in virtual_hosts:
        domains = [d for d in vhost.domains if d not in claimed]
        claimed.update(domains)
        if len(domains) == len(vhost.domains):
            kept.append(vhost)  # copied as it is added
            continue
        if not domains:
            continue
        copy = route_components_pb2.VirtualHost()
        copy.CopyFrom(vhost)
        del copy.domains[:]
        copy.domains.extend(domains)
        kept.append(copy)
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=kept)
