"""Pure translation of (world, proxy) into Envoy's listeners, routes, clusters and endpoints.

:func:`generate` is the entry point. It does no I/O and reads no clock: the same inputs
give the same messages in the same order (each list is sorted by resource name), so their
deterministic serializations are byte-for-byte equal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf.message import Message

from mesh import xds
from mesh.model import PRIORITIES, InferenceService, SchedulingPolicy, World
from mesh.proxy import Proxy
from ratelimit.adaptive import class_limits
from routing import clusters, endpoints, listeners, names, proxyless, routes, scheduling
from routing.catalog import own_endpoints, served_ports, served_services
from routing.endpoints import endpoint_key
from routing.limits import RateLimitOptions, apply_limits
from routing.secure import SecurityOptions, secure

__all__ = ["generate"]


def _outbound_clusters(
    services: Sequence[InferenceService],
    sidecars: Mapping[tuple[str, str], Proxy],
    weights: Mapping[str, int],
    *,
    proxyless: bool,
) -> tuple[list[Any], list[Any]]:
    """A cluster and its load assignment per class per served port of every Service."""
    cluster_list: list[Any] = []
    assignments: list[Any] = []
    for svc in services:
        for port in served_ports(svc):
            targets = endpoints.serving_targets(svc, port.port, sidecars, weights)
            for priority in PRIORITIES:
                cluster = clusters.outbound_cluster(
                    svc, port.port, priority, targets, proxyless=proxyless
                )
                cluster_list.append(cluster)
                assignments.append(endpoints.load_assignment(cluster.name, targets))
    return cluster_list, assignments


def _inbound(world: World, proxy: Proxy, limits: RateLimitOptions) -> tuple[list[Any], list[Any]]:
    """(inbound clusters, inbound virtual hosts) for the Services this sidecar's pod serves.

    Each Service port gets one inbound cluster per class, admitting the class's cap on
    this endpoint: the static cap, scaled by the adaptive controller's multipliers for
    this endpoint when the Service is adaptive.
    """
    cluster_list: list[Any] = []
    vhosts: list[Any] = []
    for svc, port, endpoint in own_endpoints(world, proxy):
        caps = class_limits(svc.config, limits.multipliers.get(endpoint_key(endpoint)))
        for priority in PRIORITIES:
            cap = caps.concurrency.get(priority)
            cluster_list.append(clusters.inbound_cluster(svc, endpoint, proxy, priority, cap))
        vhosts.append(
            routes.virtual_host(svc, port, proxy.namespace, routes.inbound_routes(svc, port))
        )
    return cluster_list, vhosts


def _inbound_filters(world: World, proxy: Proxy) -> list[Any]:
    """The Lua filter when a Service this pod serves passes the class to its scheduler."""
    passes_class = any(
        svc.config.scheduling is SchedulingPolicy.PRIORITY
        for svc, _port, _endpoint in own_endpoints(world, proxy)
    )
    return [scheduling.lua_filter()] if passes_class else []


def _outbound_vhosts(services: Sequence[InferenceService], proxy: Proxy) -> list[Any]:
    return [
        routes.virtual_host(svc, port, proxy.namespace, routes.outbound_routes(svc, port, proxy))
        for svc in services
        for port in served_ports(svc)
    ]


def generate(
    world: World,
    proxy: Proxy,
    sidecars: Mapping[tuple[str, str], Proxy],
    *,
    tls: SecurityOptions | None = None,
    limits: RateLimitOptions | None = None,
) -> dict[str, list[Message]]:
    """Every listener, route configuration, cluster and load assignment ``proxy`` gets.

    ``sidecars`` maps ``(namespace, pod)`` to the connected sidecar of that pod: endpoints
    of such pods are addressed at the sidecar's inbound listener. Mesh mTLS is added last
    (:mod:`routing.secure`), with ``tls`` giving the trust domain and connection lifetime;
    then rate limits (:mod:`routing.limits`), with ``limits`` giving the rate-limit
    service's address and the adaptive multipliers.
    """
    services = served_services(world)
    options = limits or RateLimitOptions()
    cluster_list, assignments = _outbound_clusters(
        services, sidecars, options.weights, proxyless=proxy.proxyless
    )
    listener_list: list[Any]
    route_list: list[Any]
    if proxy.proxyless:
        listener_list, route_list = proxyless.resources(services, proxy)
    elif proxy.is_gateway:
        listener_list = [listeners.gateway_listener(proxy)]
        route_list = [
            routes.route_configuration(
                names.gateway_route(proxy.gateway_port), _outbound_vhosts(services, proxy)
            )
        ]
    else:
        inbound_clusters, inbound_vhosts = _inbound(world, proxy, options)
        cluster_list.extend(inbound_clusters)
        listener_list = [
            listeners.outbound_listener(proxy),
            listeners.inbound_listener(proxy, http_filters=_inbound_filters(world, proxy)),
        ]
        route_list = [
            routes.route_configuration(names.OUTBOUND_ROUTE, _outbound_vhosts(services, proxy)),
            routes.route_configuration(names.INBOUND_ROUTE, inbound_vhosts),
        ]
    generated: dict[str, list[Message]] = {
        xds.LISTENER: sorted(listener_list, key=xds.resource_name),
        xds.ROUTE: sorted(route_list, key=xds.resource_name),
        xds.CLUSTER: sorted(cluster_list, key=xds.resource_name),
        xds.ENDPOINT: sorted(assignments, key=xds.resource_name),
    }
    secured = secure(generated, world, proxy, sidecars, tls)
    return apply_limits(secured, world, proxy, limits)
