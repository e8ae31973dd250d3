"""Rate limits wired into a proxy's generated config: a pure pass over routing's output.

:func:`apply` runs last in :func:`routing.generate`, after the mTLS pass. Like it, it reads
the world, the proxy and its options, never a clock, so equal inputs give equal bytes.

Local limits (``inferlane.io/rate-limit``), on the inbound sidecar of each endpoint
===================================================================================

A sidecar whose pod backs a Service with a rate limit gets, on its inbound listener, the
``local_ratelimit`` filter (only a ``stat_prefix``: it limits nothing by itself) before
the router, in every filter chain. The Service's virtual host in the ``inbound`` route
configuration carries the buckets:

- one ``LocalRateLimit`` for the whole virtual host (one Service port on this endpoint),
  with one descriptor bucket per class the annotation names, ``[("priority", CLASS)]``;
- on each route of a limited class, ``rate_limits`` that emit that descriptor: the class
  routes their own class, and the catch-all route the Service's default class.

Why descriptors in one virtual-host config rather than a bucket per route: Envoy keeps
one token bucket per per-filter config object, so per-route buckets would give the
catch-all route (no or an unknown class header) a second bucket of the default class's
size, and that class up to twice its limit. Here every request the endpoint serves as a
class draws from that class's one bucket.

Routes of classes the annotation does not name (``critical``, unless named) get a
route-level config with the filter off, so they are never limited. Refused requests get
429 with ``x-envoy-ratelimited: true`` and the draft-03 ``X-RateLimit-*`` headers.

When the Service is adaptive, each class's rate is scaled by that endpoint's multipliers
(:class:`RateLimitOptions.multipliers`, keyed by :func:`endpoint_key`), as the adaptive
controller sets them. Only the proxy of that endpoint reads them, so a change of one
endpoint's multipliers changes that sidecar's route configuration alone.

Global limits and token budgets, on the caller's side
=====================================================

When the options name a rate-limit service, a caller's outbound listener (a sidecar's,
or a gateway's listener) that has a route to a Service with a global limit
(``inferlane.io/global-rate-limit``) or a token budget (``inferlane.io/token-budget``)
gets the ``ratelimit`` filter before the router, and the static cluster
:data:`RLS_CLUSTER` that reaches the service. The route's class is the one it serves as
(after defaulting and the caller clamp) and the caller is the proxy's identity:

- each route of a class the global limit names sends the descriptor
  ``[("service", NS/NAME), ("caller", NS/SA), ("priority", CLASS)]``;
- each route whose class draws on a budget for this caller
  (:meth:`~mesh.model.ServiceConfig.token_budget_for`) sends the admission and settlement
  descriptors of :func:`ratelimit.tokens.budget_rate_limits`, and switches on the Lua
  filter that works out what a request may cost and did cost (placed before the
  rate-limit filter, which reads what it writes).

All of them go into the filter's per-route ``rate_limits``, not the route's own: Envoy
1.40 sends ``hits_addend`` only from there, and a route with per-route rate limits
ignores its own.

The service counts each call as the identity of its client certificate, not as the
descriptor's ``caller`` (``xds_server/rls/service.py``), so the cluster speaks mTLS: the
proxy presents its SDS ``default`` certificate and checks the service against ``ROOTCA``
and the control plane's name. A proxy without an identity (its pod unknown, or a
plaintext peer that gets no secrets) has no certificate to present: its calls cannot be
counted and fail, and its filter refuses the limited classes whatever the failure mode,
rather than letting an uncounted caller through.

gRPC proxyless clients implement neither filter: they get no rate-limit config at all.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_ratelimit_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import http_status_pb2, percent_pb2, token_bucket_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from mesh import xds
from mesh.model import (
    PRIORITY_HEADER,
    Endpoint,
    InferenceService,
    Priority,
    World,
)
from mesh.proxy import Proxy, ProxyKind
from mtls.identity import workload_identity
from mtls.tls_context import CONTROL_PLANE_NAME, upstream_control_plane_mtls
from ratelimit.adaptive import class_limits
from ratelimit.local import (
    DEFAULT_RLS_TIMEOUT_S,
    GLOBAL_RATELIMIT_FILTER,
    LOCAL_RATELIMIT_FILTER,
    MAX_UINT32,
    PRIORITY_KEY,
    RATELIMITED_HEADER,
    BucketError,
    bucket_shape,
    global_ratelimit_http_filter,
    local_ratelimit_http_filter,
    rls_cluster,
    route_rate_limits,
)
from ratelimit.tokens import (
    LUA_FILTER,
    TokenBudgetMode,
    budget_rate_limits,
    token_lua_http_filter,
    token_lua_route_config,
)
from routing import names
from routing.catalog import own_endpoints, served_ports, served_services
from routing.endpoints import endpoint_key
from routing.listeners import ROUTER_FILTER
from routing.protos import pack

log = logging.getLogger(__name__)

#: The cluster through which proxies reach the global rate-limit service.
RLS_CLUSTER: Final = "inferlane-rls"
#: ``stat_prefix`` of the inbound local rate-limit filter and of its buckets.
LOCAL_STAT_PREFIX: Final = "inferlane_local_rate_limit"
GLOBAL_STAT_PREFIX: Final = "inferlane_global_rate_limit"

Multipliers = Mapping[Priority, float]

_HUNDRED_PERCENT: Final = base_pb2.RuntimeFractionalPercent(
    default_value=percent_pb2.FractionalPercent(
        numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED
    )
)


@dataclass(frozen=True)
class RlsAddress:
    """Where proxies reach the global rate-limit service: an IP or a DNS name, and a port."""

    host: str
    port: int
    #: The service requires mTLS with the mesh CA (the control plane's always does).
    tls: bool = False
    #: The name the service's certificate must carry (SNI too).
    server_name: str = CONTROL_PLANE_NAME

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True)
class RateLimitOptions:
    """What the rate-limit pass needs beyond the world and the proxy."""

    #: The global rate-limit service; None configures no global filter anywhere.
    rls: RlsAddress | None = None
    #: Envoy refuses a request when the service errs or does not answer in time (True), or
    #: lets it through (False). Follows ``--rate-limit-failure-mode``.
    failure_mode_deny: bool = False
    #: How long Envoy waits for the service, in seconds.
    rls_timeout_s: float = DEFAULT_RLS_TIMEOUT_S
    #: The adaptive controller's multipliers, by :func:`endpoint_key`; an endpoint not in
    #: here has all multipliers at 1. Read only for Services with ``adaptive: "true"``.
    multipliers: Mapping[str, Multipliers] = field(default_factory=lambda: MappingProxyType({}))
    #: EDS weights from the endpoints' queues, by :func:`endpoint_key`
    #: (:func:`routing.endpoints.queue_weight`); an endpoint not in here has the full
    #: weight. Every proxy reads them.
    weights: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    #: How token budgets are charged: reserve and settle, or charge at the end (for
    #: comparison; see :mod:`ratelimit.tokens`). Follows ``--token-budget-mode``.
    token_budget_mode: TokenBudgetMode = TokenBudgetMode.RESERVE


def steered(svc: InferenceService) -> bool:
    """Whether the adaptive controller steers ``svc``'s limits: it is adaptive, and has a
    rate limit or a concurrency cap to scale."""
    return svc.config.adaptive and (bool(svc.config.rate_limit) or svc.config.caps_concurrency)


def limit_key(world: World, proxy: Proxy, options: RateLimitOptions) -> Hashable:
    """What the translators read of ``options`` for ``proxy`` beyond what every proxy
    shares: the multipliers of its own endpoints of steered Services (they scale its rate
    limits and its inbound concurrency caps). Proxies with equal routing keys and equal
    limit keys get identical config."""
    if not options.multipliers:
        return ()  # the usual case: nothing tightened anywhere
    found = []
    for svc, _port, endpoint in own_endpoints(world, proxy):
        if not steered(svc):
            continue
        key = endpoint_key(endpoint)
        mult = options.multipliers.get(key)
        if mult is not None:
            found.append((key, tuple(sorted((str(p), m) for p, m in mult.items()))))
    return tuple(found)


def apply_limits(
    resources: Mapping[str, Sequence[Message]],
    world: World,
    proxy: Proxy,
    options: RateLimitOptions | None = None,
) -> dict[str, list[Message]]:
    """``resources`` (as :func:`routing.generate` builds them) with rate limits added.

    Messages that change are copied; lists keep their order, except that the RLS cluster
    is inserted in name order.
    """
    opts = options or RateLimitOptions()
    out: dict[str, list[Any]] = {t: list(msgs) for t, msgs in resources.items()}
    if proxy.proxyless:
        return out
    if proxy.kind is ProxyKind.SIDECAR:
        _local_limits(out, world, proxy, opts)
    if opts.rls is not None:
        _global_limits(out, world, proxy, opts, opts.rls)
    return out


# --------------------------------------------------------------------------- local


def _token_bucket(rps: float) -> Any:
    shape = bucket_shape(rps)
    return token_bucket_pb2.TokenBucket(
        max_tokens=shape.max_tokens,
        tokens_per_fill={"value": shape.tokens_per_fill},
        fill_interval=duration_pb2.Duration(
            seconds=shape.fill_interval_ms // 1000,
            nanos=(shape.fill_interval_ms % 1000) * 1_000_000,
        ),
    )


def _never_empty() -> Any:
    """A bucket no traffic drains: Envoy requires a default bucket in a per-route config.
    Requests that match a class descriptor do not draw from it (see below), and routes of
    unlimited classes turn the filter off, so nothing does."""
    return token_bucket_pb2.TokenBucket(
        max_tokens=MAX_UINT32,
        tokens_per_fill={"value": MAX_UINT32},
        fill_interval=duration_pb2.Duration(seconds=1),
    )


def class_buckets_config(rates: Mapping[Priority, float], stat_prefix: str) -> Any | None:
    """The virtual host's ``LocalRateLimit``: one descriptor bucket per class in ``rates``.

    None when no rate can be expressed as a bucket (each bad one is logged and skipped).
    """
    descriptors = []
    for priority, rps in rates.items():
        try:
            bucket = _token_bucket(rps)
        except BucketError as exc:
            log.warning("no local rate limit for class %s: %s", priority, exc)
            continue
        descriptors.append(
            common_ratelimit_pb2.LocalRateLimitDescriptor(
                entries=[
                    common_ratelimit_pb2.RateLimitDescriptor.Entry(
                        key=PRIORITY_KEY, value=str(priority)
                    )
                ],
                token_bucket=bucket,
            )
        )
    if not descriptors:
        return None
    config = local_rate_limit_pb2.LocalRateLimit(
        stat_prefix=stat_prefix,
        status=http_status_pb2.HttpStatus(code=http_status_pb2.TooManyRequests),
        token_bucket=_never_empty(),
        filter_enabled=_HUNDRED_PERCENT,
        filter_enforced=_HUNDRED_PERCENT,
        response_headers_to_add=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=RATELIMITED_HEADER, value="true"),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        ],
        descriptors=descriptors,
        enable_x_ratelimit_headers=common_ratelimit_pb2.DRAFT_VERSION_03,
    )
    config.always_consume_default_token_bucket.value = False
    return config


def _filter_off(stat_prefix: str) -> Any:
    """A route-level config that turns the filter off (``filter_enabled`` defaults to 0 %)."""
    return local_rate_limit_pb2.LocalRateLimit(stat_prefix=stat_prefix, token_bucket=_never_empty())


def _class_action(priority: Priority) -> Any:
    return route_components_pb2.RateLimit(
        actions=[
            route_components_pb2.RateLimit.Action(
                generic_key=route_components_pb2.RateLimit.Action.GenericKey(
                    descriptor_key=PRIORITY_KEY, descriptor_value=str(priority)
                )
            )
        ]
    )


def _inbound_class(route_name: str, svc: InferenceService) -> Priority:
    """The class an inbound route serves: its own, or the default for the catch-all."""
    try:
        return Priority(route_name)
    except ValueError:
        return svc.config.default_priority


def endpoint_rates(
    svc: InferenceService, endpoint: Endpoint, options: RateLimitOptions
) -> Mapping[Priority, float]:
    """The per-class rates ``endpoint``'s sidecar enforces for ``svc``."""
    multipliers = options.multipliers.get(endpoint_key(endpoint)) if svc.config.adaptive else None
    return class_limits(svc.config, multipliers).rate


def _is_class_action(limit: Any) -> bool:
    return len(limit.actions) == 1 and limit.actions[0].generic_key.descriptor_key == PRIORITY_KEY


def _clear_local(vhost: Any) -> None:
    """Remove what an earlier run of this pass put on ``vhost`` (so it can run again)."""
    if LOCAL_RATELIMIT_FILTER in vhost.typed_per_filter_config:
        del vhost.typed_per_filter_config[LOCAL_RATELIMIT_FILTER]
    for route in vhost.routes:
        if LOCAL_RATELIMIT_FILTER in route.typed_per_filter_config:
            del route.typed_per_filter_config[LOCAL_RATELIMIT_FILTER]
        kept = [limit for limit in route.route.rate_limits if not _is_class_action(limit)]
        if len(kept) != len(route.route.rate_limits):
            del route.route.rate_limits[:]
            route.route.rate_limits.extend(kept)


def _limit_vhost(vhost: Any, svc: InferenceService, rates: Mapping[Priority, float]) -> bool:
    """Add the buckets to one inbound virtual host (in place); False if it has none."""
    _clear_local(vhost)
    stat_prefix = f"{LOCAL_STAT_PREFIX}_{svc.namespace}_{svc.name}"
    config = class_buckets_config(rates, stat_prefix)
    if config is None:
        return False
    limited = {Priority(e.entries[0].value) for e in config.descriptors}
    vhost.typed_per_filter_config[LOCAL_RATELIMIT_FILTER].CopyFrom(pack(config))
    for route in vhost.routes:
        served = _inbound_class(route.name, svc)
        if served in limited:
            route.route.rate_limits.append(_class_action(served))
        else:
            route.typed_per_filter_config[LOCAL_RATELIMIT_FILTER].CopyFrom(
                pack(_filter_off(stat_prefix))
            )
    return True


def _local_limits(
    out: dict[str, list[Any]], world: World, proxy: Proxy, opts: RateLimitOptions
) -> None:
    limited_vhosts = {
        names.virtual_host(svc.hostname, port.port): endpoint_rates(svc, endpoint, opts)
        for svc, port, endpoint in own_endpoints(world, proxy)
        if svc.config.rate_limit
    }
    if not limited_vhosts or xds.ROUTE not in out:
        return
    by_vhost = {
        names.virtual_host(svc.hostname, port.port): svc
        for svc in served_services(world)
        for port in served_ports(svc)
    }
    any_limited = False
    routes = []
    for route_config in out[xds.ROUTE]:
        if route_config.name != names.INBOUND_ROUTE:
            routes.append(route_config)
            continue
        limited = type(route_config)()
        limited.CopyFrom(route_config)
        for vhost in limited.virtual_hosts:
            rates = limited_vhosts.get(vhost.name)
            if rates is not None and _limit_vhost(vhost, by_vhost[vhost.name], rates):
                any_limited = True
        routes.append(limited)
    if not any_limited:
        return
    out[xds.ROUTE] = routes
    if xds.LISTENER in out:
        local = local_ratelimit_http_filter(LOCAL_STAT_PREFIX)
        out[xds.LISTENER] = [
            _with_filters(listener, [local])
            if listener.name == names.INBOUND_LISTENER
            else listener
            for listener in out[xds.LISTENER]
        ]


# --------------------------------------------------------------------------- shared


def _with_filters(listener: Any, http_filters: Sequence[Any]) -> Any:
    """A copy of ``listener`` with ``http_filters``, in order, just before the router in
    every HTTP connection manager (once: a filter a manager has already is left out)."""
    copy = type(listener)()
    copy.CopyFrom(listener)
    for chain in copy.filter_chains:
        for network_filter in chain.filters:
            if not network_filter.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                continue
            manager = hcm_pb2.HttpConnectionManager()
            network_filter.typed_config.Unpack(manager)
            present = {f.name for f in manager.http_filters}
            position = next(
                (i for i, f in enumerate(manager.http_filters) if f.name == ROUTER_FILTER),
                len(manager.http_filters),
            )
            for http_filter in http_filters:
                if http_filter.name not in present:
                    manager.http_filters.insert(position, http_filter)
                    position += 1
            network_filter.typed_config.CopyFrom(pack(manager))
    return copy


# --------------------------------------------------------------------------- global


def _served_class(route: Any, svc: InferenceService) -> Priority:
    """The class an outbound route serves as: the class header it sets (routing writes the
    clamped class there), else its name, else the Service's default."""
    for option in route.request_headers_to_add:
        if option.header.key.lower() == PRIORITY_HEADER:
            try:
                return Priority(option.header.value)
            except ValueError:
                break
    return _inbound_class(route.name, svc)


def _outbound_route_names(proxy: Proxy) -> set[str]:
    if proxy.is_gateway:
        return {names.gateway_route(proxy.gateway_port)}
    return {names.OUTBOUND_ROUTE}


def _outbound_listener_names(proxy: Proxy) -> set[str]:
    if proxy.is_gateway:
        return {names.gateway_listener(proxy.bind_address, proxy.gateway_port)}
    return {names.OUTBOUND_LISTENER}


def rate_limited_services(world: World) -> dict[str, InferenceService]:
    """Virtual-host name -> Service, for every served port of a Service with a global limit
    or a token budget."""
    return {
        names.virtual_host(svc.hostname, port.port): svc
        for svc in served_services(world)
        if svc.config.counted_per_caller
        for port in served_ports(svc)
    }


def _limit_route(route: Any, svc: InferenceService, caller: str, opts: RateLimitOptions) -> bool:
    """Give one outbound route its global descriptors (in place); True if it has any.

    They all go into the filter's per-route ``rate_limits``: Envoy 1.40 sends a
    descriptor's ``hits_addend`` only from there, and a route with per-route rate limits
    ignores its own (see :mod:`ratelimit.tokens`).
    """
    service = f"{svc.namespace}/{svc.name}"
    served = _served_class(route, svc)
    limits = route_rate_limits(service, caller, served, svc.config.global_rate_limit)
    budget = svc.config.token_budget_for(served, caller)
    if budget is not None:
        limits += budget_rate_limits(service, budget.tier, caller, opts.token_budget_mode)
        route.typed_per_filter_config[LUA_FILTER].CopyFrom(
            token_lua_route_config(svc.config.default_max_tokens)
        )
    if not limits:
        return False
    per_route = rate_limit_pb2.RateLimitPerRoute(rate_limits=limits)
    route.typed_per_filter_config[GLOBAL_RATELIMIT_FILTER].CopyFrom(pack(per_route))
    return True


def _limit_routes(
    route_config: Any, limited: Mapping[str, InferenceService], caller: str, opts: RateLimitOptions
) -> set[str]:
    """Add the global descriptors to the routes of limited Services (in place); the HTTP
    filters they need: the rate-limit filter, and the Lua filter for token budgets."""
    needed: set[str] = set()
    for vhost in route_config.virtual_hosts:
        svc = limited.get(vhost.name)
        if svc is None:
            continue
        for route in vhost.routes:
            if _limit_route(route, svc, caller, opts):
                needed.add(GLOBAL_RATELIMIT_FILTER)
            if LUA_FILTER in route.typed_per_filter_config:
                needed.add(LUA_FILTER)
    return needed


def rls_cluster_for(address: RlsAddress, *, mtls: bool, name: str = RLS_CLUSTER) -> Any:
    """The cluster that reaches the rate-limit service: STATIC for an IP, STRICT_DNS for a
    name (a Kubernetes Service's DNS name, say); over mTLS with the proxy's own SDS
    certificate when ``mtls`` (only for a proxy that has one)."""
    cluster = rls_cluster(name, address.host, address.port)
    if not address.is_ip:
        cluster.type = cluster_pb2.Cluster.STRICT_DNS
    if mtls and address.tls:
        cluster.transport_socket.CopyFrom(upstream_control_plane_mtls(address.server_name))
    return cluster


def _global_limits(
    out: dict[str, list[Any]],
    world: World,
    proxy: Proxy,
    opts: RateLimitOptions,
    rls: RlsAddress,
) -> None:
    limited = rate_limited_services(world)
    if not limited or xds.ROUTE not in out:
        return
    route_names = _outbound_route_names(proxy)
    needed: set[str] = set()
    routes = []
    for route_config in out[xds.ROUTE]:
        if route_config.name not in route_names:
            routes.append(route_config)
            continue
        copy = type(route_config)()
        copy.CopyFrom(route_config)
        needed |= _limit_routes(copy, limited, proxy.identity, opts)
        routes.append(copy)
    if not needed:
        return
    out[xds.ROUTE] = routes
    # A proxy without an identity cannot authenticate to the service: refuse rather than
    # let an uncounted caller through (see the module docstring).
    identified = workload_identity(world, proxy) is not None
    http_filters = [
        global_ratelimit_http_filter(
            RLS_CLUSTER,
            failure_mode_deny=opts.failure_mode_deny or (rls.tls and not identified),
            timeout_s=opts.rls_timeout_s,
            stat_prefix=GLOBAL_STAT_PREFIX,
        )
    ]
    if LUA_FILTER in needed:
        http_filters.insert(0, token_lua_http_filter())  # it feeds the rate-limit filter
    listener_names = _outbound_listener_names(proxy)
    if xds.LISTENER in out:
        out[xds.LISTENER] = [
            _with_filters(listener, http_filters) if listener.name in listener_names else listener
            for listener in out[xds.LISTENER]
        ]
    clusters = [c for c in out.get(xds.CLUSTER, []) if c.name != RLS_CLUSTER]
    clusters.append(rls_cluster_for(rls, mtls=identified))
    out[xds.CLUSTER] = sorted(clusters, key=lambda c: str(c.name))
