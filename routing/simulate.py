"""A route simulator: which cluster does this request reach, and which endpoints serve it?

It reads generated resources (type URL -> messages, as :func:`routing.generate` returns
them) and follows Envoy's own lookup: the listener by port (or a proxyless target by
name), its HTTP connection manager, the route configuration by RDS name (or inline), the
virtual host by Host/authority, then the first route whose path and headers match. For a
cluster it lists the endpoints per EDS priority, and computes how Envoy would split load
across priorities when some hosts are unhealthy.

It covers what inferlane generates (prefix/path matches, header matchers, exact and
wildcard domains); anything else is reported as a :class:`NoRoute`, never raised.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from mesh import xds
from routing import endpoints as endpoints_mod

Resources = Mapping[str, Sequence[Any]]

_HCM_TYPE = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
_DEFAULT_OVERPROVISIONING = 140


@dataclass(frozen=True)
class NoRoute:
    """Why a request reaches no cluster (or a cluster lookup found nothing)."""

    reason: str


@dataclass(frozen=True)
class Decision:
    """Where a request goes, and what the route does to it on the way."""

    listener: str
    route_config: str
    virtual_host: str
    route: str
    cluster: str
    #: ``HIGH`` or ``DEFAULT``: the Envoy route priority.
    priority: str
    #: The route timeout in seconds; None when the route sets none (Envoy's 15 s
    #: applies), 0 when it is off.
    timeout_s: float | None
    headers_added: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    retry_on: str = ""
    num_retries: int = 0
    #: The route's idle timeout in seconds (no byte either way for that long ends the
    #: request); None when the route sets none.
    idle_timeout_s: float | None = None
    #: Response headers, as ``(name, exact value)``, that the retry policy retries on.
    retriable_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SimEndpoint:
    address: str
    port: int
    priority: int
    #: Marked as reached through a sidecar (Istio's ``tlsMode: istio``).
    via_sidecar: bool


def _find(resources: Resources, type_url: str, name: str) -> Any | None:
    for message in resources.get(type_url, ()):
        key = message.cluster_name if type_url == xds.ENDPOINT else message.name
        if key == name:
            return message
    return None


def _listener(resources: Resources, port: int | None, name: str | None) -> Any | NoRoute:
    for listener in resources.get(xds.LISTENER, ()):
        if name is not None and listener.name == name:
            return listener
        if (
            name is None
            and listener.HasField("address")
            and listener.address.socket_address.port_value == port
        ):
            return listener
    return NoRoute(f"no listener {name!r}" if name is not None else f"no listener on port {port}")


def _manager(listener: Any) -> Any | NoRoute:
    packed = []
    if listener.HasField("api_listener"):
        packed.append(listener.api_listener.api_listener)
    for chain in listener.filter_chains:
        packed.extend(f.typed_config for f in chain.filters if f.typed_config.type_url == _HCM_TYPE)
    if not packed:
        return NoRoute(f"listener {listener.name!r} has no HTTP connection manager")
    manager = hcm_pb2.HttpConnectionManager()
    packed[0].Unpack(manager)
    return manager


def _route_config(resources: Resources, manager: Any) -> Any | NoRoute:
    if manager.HasField("route_config"):
        return manager.route_config
    name = manager.rds.route_config_name
    found = _find(resources, xds.ROUTE, name)
    return found if found is not None else NoRoute(f"no route configuration {name!r}")


def _pick_virtual_host(virtual_hosts: Sequence[Any], authority: str) -> Any | None:
    """Envoy's order: exact domain, then longest ``*suffix``, longest ``prefix*``, ``*``."""
    host = authority.lower()
    best: tuple[int, int, Any] | None = None
    for vhost in virtual_hosts:
        for domain in (d.lower() for d in vhost.domains):
            if domain == host:
                rank = (0, 0)
            elif domain == "*":
                rank = (3, 0)
            elif domain.startswith("*") and host.endswith(domain[1:]):
                rank = (1, -len(domain))
            elif domain.endswith("*") and host.startswith(domain[:-1]):
                rank = (2, -len(domain))
            else:
                continue
            if best is None or rank < best[:2]:
                best = (*rank, vhost)
    return best[2] if best is not None else None


def _string_matches(matcher: Any, value: str) -> bool | None:
    which = matcher.WhichOneof("match_pattern")
    subject = value.lower() if matcher.ignore_case else value
    pattern = getattr(matcher, which, "") if which else ""
    if which in ("exact", "prefix", "suffix", "contains") and matcher.ignore_case:
        pattern = pattern.lower()
    if which == "exact":
        return bool(subject == pattern)
    if which == "prefix":
        return subject.startswith(pattern)
    if which == "suffix":
        return subject.endswith(pattern)
    if which == "contains":
        return pattern in subject
    if which == "safe_regex":
        return re.fullmatch(matcher.safe_regex.regex, value) is not None
    return None


def _header_matches(matcher: Any, headers: Mapping[str, str]) -> bool | None:
    value = headers.get(matcher.name.lower())
    which = matcher.WhichOneof("header_match_specifier")
    result: bool | None
    if which == "present_match":
        result = (value is not None) == matcher.present_match
    elif value is None:
        result = False
    elif which is None:
        result = True
    elif which == "string_match":
        result = _string_matches(matcher.string_match, value)
    elif which == "exact_match":
        result = value == matcher.exact_match
    elif which == "prefix_match":
        result = value.startswith(matcher.prefix_match)
    elif which == "suffix_match":
        result = value.endswith(matcher.suffix_match)
    elif which == "contains_match":
        result = matcher.contains_match in value
    else:
        result = None
    if result is None:
        return None
    return result != bool(matcher.invert_match)


def _route_matches(route: Any, path: str, headers: Mapping[str, str]) -> bool | None:
    match = route.match
    which = match.WhichOneof("path_specifier")
    if which == "prefix":
        path_ok = path.startswith(match.prefix)
    elif which == "path":
        path_ok = path == match.path
    else:
        return None
    if not path_ok:
        return False
    for matcher in match.headers:
        result = _header_matches(matcher, headers)
        if result is not True:
            return result
    return True


def _headers_added(route_config: Any, vhost: Any, route: Any) -> dict[str, str]:
    added: dict[str, str] = {}
    for level in (route_config, vhost, route):
        for option in level.request_headers_to_add:
            added[option.header.key.lower()] = option.header.value
    return added


def _decision(listener: Any, route_config: Any, vhost: Any, route: Any) -> Decision | NoRoute:
    if not route.HasField("route") or route.route.WhichOneof("cluster_specifier") != "cluster":
        return NoRoute(f"route {route.name!r} does not send to a single cluster")
    action = route.route
    policy = action.retry_policy
    return Decision(
        listener=listener.name,
        route_config=route_config.name,
        virtual_host=vhost.name,
        route=route.name,
        cluster=action.cluster,
        priority=base_pb2.RoutingPriority.Name(action.priority),
        timeout_s=_seconds(action, "timeout"),
        headers_added=MappingProxyType(_headers_added(route_config, vhost, route)),
        retry_on=policy.retry_on,
        num_retries=policy.num_retries.value if action.HasField("retry_policy") else 0,
        idle_timeout_s=_seconds(action, "idle_timeout"),
        retriable_headers=tuple((m.name, m.string_match.exact) for m in policy.retriable_headers),
    )


def _seconds(message: Any, name: str) -> float | None:
    if not message.HasField(name):
        return None
    return float(getattr(message, name).ToNanoseconds() / 1e9)


def route(
    resources: Resources,
    *,
    authority: str,
    port: int | None = None,
    listener: str | None = None,
    headers: Mapping[str, str] | None = None,
    path: str = "/",
) -> Decision | NoRoute:
    """Follow one request through the resources of one proxy.

    Give the listener ``port`` (a sidecar's or gateway's) or a ``listener`` name (a
    proxyless target, ``NAME.NS.svc.cluster.local:PORT``). Header names are
    case-insensitive, as in HTTP.
    """
    if (port is None) == (listener is None):
        return NoRoute("give exactly one of port and listener")
    found = _listener(resources, port, listener)
    if isinstance(found, NoRoute):
        return found
    manager = _manager(found)
    if isinstance(manager, NoRoute):
        return manager
    route_config = _route_config(resources, manager)
    if isinstance(route_config, NoRoute):
        return route_config
    vhost = _pick_virtual_host(route_config.virtual_hosts, authority)
    if vhost is None:
        return NoRoute(f"no virtual host for {authority!r} in {route_config.name!r}")
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    for candidate in vhost.routes:
        matched = _route_matches(candidate, path, lowered)
        if matched is None:
            return NoRoute(f"route {candidate.name!r} uses a match the simulator does not model")
        if matched:
            return _decision(found, route_config, vhost, candidate)
    return NoRoute(f"no route in {vhost.name!r} matches {path!r}")


def _assignment(resources: Resources, cluster: str) -> Any | NoRoute:
    found = _find(resources, xds.ENDPOINT, cluster)
    if found is not None:
        return found
    definition = _find(resources, xds.CLUSTER, cluster)
    if definition is not None and definition.HasField("load_assignment"):
        return definition.load_assignment
    return NoRoute(f"no endpoints for cluster {cluster!r}")


def _is_marked_sidecar(lb_endpoint: Any) -> bool:
    marker = lb_endpoint.metadata.filter_metadata.get(endpoints_mod.TLS_MODE_KEY)
    return marker is not None and marker.fields["tlsMode"].string_value == (
        endpoints_mod.TLS_MODE_ISTIO
    )


def cluster_endpoints(resources: Resources, cluster: str) -> tuple[SimEndpoint, ...] | NoRoute:
    """The endpoints of ``cluster`` with their EDS priority, by priority then address."""
    assignment = _assignment(resources, cluster)
    if isinstance(assignment, NoRoute):
        return assignment
    found = [
        SimEndpoint(
            address=lb.endpoint.address.socket_address.address,
            port=lb.endpoint.address.socket_address.port_value,
            priority=locality.priority,
            via_sidecar=_is_marked_sidecar(lb),
        )
        for locality in assignment.endpoints
        for lb in locality.lb_endpoints
    ]
    return tuple(sorted(found, key=lambda e: (e.priority, e.address, e.port)))


def _overprovisioning(assignment: Any) -> int:
    policy = assignment.policy
    if isinstance(assignment, endpoint_pb2.ClusterLoadAssignment) and policy.HasField(
        "overprovisioning_factor"
    ):
        return int(policy.overprovisioning_factor.value)
    return _DEFAULT_OVERPROVISIONING


def priority_loads(
    resources: Resources,
    cluster: str,
    unhealthy: frozenset[tuple[str, int]] = frozenset(),
) -> tuple[int, ...] | NoRoute:
    """The percentage of requests Envoy sends to each EDS priority of ``cluster``.

    ``unhealthy`` holds the (address, port) of hosts taken as unhealthy (failed health
    checks or ejected). Envoy's rule (``recalculatePerPriorityState``): a priority's health
    is ``min(100, factor * healthy / hosts)``; load fills priorities in order, each taking
    up to its health, scaled when the summed health is under 100. All-unhealthy gives 100
    to priority 0 (panic is disabled, so such requests fail with no healthy upstream).
    """
    assignment = _assignment(resources, cluster)
    if isinstance(assignment, NoRoute):
        return assignment
    found = cluster_endpoints(resources, cluster)
    if isinstance(found, NoRoute):
        return found
    if not found:
        return NoRoute(f"cluster {cluster!r} has no endpoints")
    factor = _overprovisioning(assignment)
    levels = max(e.priority for e in found) + 1
    health = []
    for level in range(levels):
        hosts = [e for e in found if e.priority == level]
        healthy = [e for e in hosts if (e.address, e.port) not in unhealthy]
        health.append(min(100, factor * len(healthy) // len(hosts)) if hosts else 0)
    total = min(100, sum(health))
    if total == 0:
        return (100, *([0] * (levels - 1)))
    loads = []
    remaining = 100
    for level_health in health:
        load = min(remaining, level_health * 100 // total)
        loads.append(load)
        remaining -= load
    first = next(i for i, h in enumerate(health) if h > 0)
    loads[first] += remaining
    return tuple(loads)
