"""Pure translation of (world, proxy) into Envoy's listeners, routes, clusters and endpoints.

:func:`generate` is the entry point. It does no I/O and reads no clock: the same inputs
give the same messages in the same order (each list is sorted by resource name), so their
deterministic serializations are byte-for-byte equal.

It is built from parts that :mod:`routing.incremental` also uses, each translated once per
change and shared by every proxy that gets the same: per Service, its clusters and load
assignments (:func:`service_clusters`) and its virtual hosts (:func:`service_vhosts`, or
:func:`routing.proxyless.service_resources`); per proxy, its outbound listener
(:func:`frame`) and, for a sidecar whose pod backs Services, its inbound side
(:func:`inbound`). :func:`passes` adds mTLS and rate limits to any of them.
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

Resources = dict[str, list[Any]]


def service_clusters(
    svc: InferenceService,
    world: World,
    sidecars: Mapping[tuple[str, str], Proxy],
    weights: Mapping[str, int],
    *,
    proxyless: bool,
) -> tuple[list[Any], list[Any]]:
    """A cluster and its load assignment per class per served port of ``svc``.

    The cluster is sized on every endpoint that can be reached, ready or not; the load
    assignment holds the ready ones: readiness moves endpoints only.
    """
    cluster_list: list[Any] = []
    assignments: list[Any] = []
    for port in served_ports(svc):
        reachable = endpoints.endpoint_targets(svc, port.port, sidecars, world, weights)
        sized_on = endpoints.distinct(t for _e, t in reachable)
        serving = endpoints.distinct(t for e, t in reachable if e.ready)
        for priority in PRIORITIES:
            cluster = clusters.outbound_cluster(
                svc, port.port, priority, sized_on, proxyless=proxyless
            )
            cluster_list.append(cluster)
            assignments.append(endpoints.load_assignment(cluster.name, serving))
    return cluster_list, assignments


def service_vhosts(svc: InferenceService, proxy: Proxy) -> list[Any]:
    """The outbound virtual hosts of ``svc``'s served ports, as ``proxy`` sees them (its
    namespace names the bare-name domain; its identity, the caller clamp)."""
    return [
        routes.virtual_host(svc, port, proxy.namespace, routes.outbound_routes(svc, port, proxy))
        for port in served_ports(svc)
    ]


def outbound_route_name(proxy: Proxy) -> str:
    """The route configuration of a sidecar's or a gateway's outbound virtual hosts."""
    return names.gateway_route(proxy.gateway_port) if proxy.is_gateway else names.OUTBOUND_ROUTE


def frame(proxy: Proxy) -> Any:
    """The listener of an Envoy's outbound virtual hosts: a sidecar's ``virtualOutbound``
    or a gateway's listener."""
    if proxy.is_gateway:
        return listeners.gateway_listener(proxy)
    return listeners.outbound_listener(proxy)


def inbound(world: World, proxy: Proxy, limits: RateLimitOptions) -> Resources:
    """A sidecar's inbound side: its listener, its route configuration, and per Service
    port its pod serves, one inbound cluster per class.

    Each inbound cluster admits the class's cap on this endpoint: the static cap, scaled
    by the adaptive controller's multipliers for this endpoint when the Service is
    adaptive. The inbound listener carries the Lua filter when a Service this pod serves
    passes the class to its scheduler.
    """
    cluster_list: list[Any] = []
    vhosts: list[Any] = []
    own = own_endpoints(world, proxy)
    for svc, port, endpoint in own:
        caps = class_limits(svc.config, limits.multipliers.get(endpoint_key(endpoint)))
        for priority in PRIORITIES:
            cap = caps.concurrency.get(priority)
            cluster_list.append(clusters.inbound_cluster(svc, endpoint, proxy, priority, cap))
        vhosts.append(
            routes.virtual_host(svc, port, proxy.namespace, routes.inbound_routes(svc, port))
        )
    passes_class = any(svc.config.scheduling is SchedulingPolicy.PRIORITY for svc, _p, _e in own)
    filters = [scheduling.lua_filter()] if passes_class else []
    return {
        xds.LISTENER: [listeners.inbound_listener(proxy, http_filters=filters)],
        xds.ROUTE: [routes.route_configuration(names.INBOUND_ROUTE, vhosts)],
        xds.CLUSTER: cluster_list,
    }


def passes(
    resources: Mapping[str, Sequence[Message]],
    world: World,
    proxy: Proxy,
    sidecars: Mapping[tuple[str, str], Proxy],
    *,
    tls: SecurityOptions | None,
    limits: RateLimitOptions | None,
) -> dict[str, list[Message]]:
    """Mesh mTLS (:mod:`routing.secure`), then rate limits (:mod:`routing.limits`)."""
    return apply_limits(secure(resources, world, proxy, sidecars, tls), world, proxy, limits)


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
    of such pods, and of pods whose manifest declares a sidecar, are addressed at the
    sidecar's inbound listener. Mesh mTLS is added last (:mod:`routing.secure`), with
    ``tls`` giving the trust domain and connection lifetime; then rate limits
    (:mod:`routing.limits`), with ``limits`` giving the rate-limit service's address and
    the adaptive multipliers.
    """
    services = served_services(world)
    options = limits or RateLimitOptions()
    out: Resources = {xds.LISTENER: [], xds.ROUTE: [], xds.CLUSTER: [], xds.ENDPOINT: []}
    for svc in services:
        cluster_list, assignments = service_clusters(
            svc, world, sidecars, options.weights, proxyless=proxy.proxyless
        )
        out[xds.CLUSTER] += cluster_list
        out[xds.ENDPOINT] += assignments
    if proxy.proxyless:
        for svc in services:
            target_listeners, target_routes = proxyless.service_resources(svc, proxy)
            out[xds.LISTENER] += target_listeners
            out[xds.ROUTE] += target_routes
    else:
        vhosts = [vhost for svc in services for vhost in service_vhosts(svc, proxy)]
        out[xds.LISTENER].append(frame(proxy))
        out[xds.ROUTE].append(routes.route_configuration(outbound_route_name(proxy), vhosts))
        if not proxy.is_gateway:
            for type_url, messages in inbound(world, proxy, options).items():
                out[type_url] += messages
    generated = {t: sorted(messages, key=xds.resource_name) for t, messages in out.items()}
    return passes(generated, world, proxy, sidecars, tls=tls, limits=limits)
