"""What inferlane gives one Service or one pod, read back from the generated config.

The server side of ``inferlane describe``. Everything here is read from what proxies are
really sent: the class clusters and their circuit breakers, and each endpoint's EDS
priority and weights, come from the resources :func:`routing.generate` made for a client
sidecar, so this page cannot drift from the translators. The rest is the world (the
annotations, the pods) and the rate-limit options of the same generation. Pure: no I/O,
no clock; the control plane adds what only it knows (adaptive state, proxies' sync).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from envoy.config.core.v3 import base_pb2
from google.protobuf.message import Message

from mesh import xds
from mesh.annotations import caller_matches
from mesh.model import PRIORITIES, Endpoint, InferenceService, World
from mesh.proxy import Proxy, ProxyKind
from routing import names
from routing.catalog import served_ports
from routing.endpoints import TLS_MODE_KEY, endpoint_key
from routing.limits import RateLimitOptions, endpoint_rates

#: Longest list of pods named as allowed critical callers; the rest are counted.
MAX_LISTED_CALLERS: Final = 50

Resources = Mapping[str, Sequence[Message]]


def describing_client(namespace: str) -> Proxy:
    """A client sidecar that backs nothing: what every caller's outbound config is built
    from (the caller clamp changes routes, never clusters or endpoints)."""
    return Proxy(
        node_id=f"sidecar~0.0.0.0~inferlane-describe.{namespace}~{namespace}.svc.cluster.local",
        kind=ProxyKind.SIDECAR,
        ip="0.0.0.0",
        pod_name="inferlane-describe",
        namespace=namespace,
        dns_domain=f"{namespace}.svc.cluster.local",
    )


def _by_name(resources: Resources, type_url: str) -> dict[str, Any]:
    return {xds.resource_name(m): m for m in resources.get(type_url, ())}


def _thresholds(cluster: Any) -> dict[str, dict[str, int]]:
    out = {}
    for t in cluster.circuit_breakers.thresholds:
        out[base_pb2.RoutingPriority.Name(t.priority)] = {
            "max_connections": t.max_connections.value,
            "max_pending_requests": t.max_pending_requests.value,
            "max_requests": t.max_requests.value,
            "max_retries": t.max_retries.value,
        }
    return out


def _pod_index(
    svc: InferenceService, port: int, sidecars: Mapping[tuple[str, str], Proxy]
) -> dict[str, Endpoint]:
    """Address -> endpoint: the pod's own IP, and its sidecar's bind address if it has one."""
    index: dict[str, Endpoint] = {}
    for endpoint in svc.endpoints_for(port):
        index.setdefault(endpoint.address, endpoint)
        sidecar = sidecars.get(endpoint.pod_key) if endpoint.pod_key else None
        if sidecar is not None:
            index.setdefault(sidecar.bind_address, endpoint)
    return index


def _served_endpoints(assignment: Any, index: Mapping[str, Endpoint]) -> list[dict[str, Any]]:
    out = []
    for locality in assignment.endpoints:
        for lb in locality.lb_endpoints:
            sock = lb.endpoint.address.socket_address
            endpoint = index.get(sock.address)
            gpu = endpoint.gpu if endpoint is not None else locality.locality.sub_zone == "gpu"
            out.append(
                {
                    "address": f"{sock.address}:{sock.port_value}",
                    "pod": _pod_name(endpoint),
                    "tier": "gpu" if gpu else "fallback",
                    "eds_priority": locality.priority,
                    "locality_weight": locality.load_balancing_weight.value
                    if locality.HasField("load_balancing_weight")
                    else 1,
                    "weight": lb.load_balancing_weight.value
                    if lb.HasField("load_balancing_weight")
                    else 1,
                    "via_sidecar": TLS_MODE_KEY in lb.metadata.filter_metadata,
                }
            )
    return out


def _pod_name(endpoint: Endpoint | None) -> str | None:
    if endpoint is None or endpoint.pod_key is None:
        return None
    return "/".join(endpoint.pod_key)


def _excluded(svc: InferenceService, port: int, served: set[str]) -> list[dict[str, Any]]:
    """Endpoints of the Service that no class cluster has, and why."""
    out = []
    for endpoint in svc.endpoints_for(port):
        if _pod_name(endpoint) in served or endpoint.address in served:
            continue
        reason = (
            "not ready"
            if not endpoint.ready
            else "mtls: strict, and the pod has no sidecar (declared or connected) for mTLS"
        )
        out.append(
            {
                "address": f"{endpoint.address}:{endpoint.port}",
                "pod": _pod_name(endpoint),
                "reason": reason,
            }
        )
    return out


def _classes(
    svc: InferenceService, resources: Resources, sidecars: Mapping[tuple[str, str], Proxy]
) -> list[dict[str, Any]]:
    clusters = _by_name(resources, xds.CLUSTER)
    assignments = _by_name(resources, xds.ENDPOINT)
    ports = []
    for port in served_ports(svc):
        index = _pod_index(svc, port.port, sidecars)
        classes = []
        served: set[str] = set()
        for priority in PRIORITIES:
            name = names.outbound_cluster(port.port, priority, svc.hostname)
            cluster = clusters.get(name)
            assignment = assignments.get(name)
            endpoints = _served_endpoints(assignment, index) if assignment is not None else []
            served.update(e["pod"] or e["address"].rpartition(":")[0] for e in endpoints)
            classes.append(
                {
                    "class": priority.value,
                    "cluster": name,
                    "timeout_s": svc.config.timeout_for(priority),
                    "circuit_breakers": _thresholds(cluster) if cluster is not None else {},
                    "endpoints": endpoints,
                }
            )
        ports.append(
            {
                "port": port.port,
                "name": port.name,
                "classes": classes,
                "excluded": _excluded(svc, port.port, served),
            }
        )
    return ports


def critical_callers(world: World, svc: InferenceService) -> dict[str, Any]:
    """Who may send ``critical``: the list and the pods in the world it lets through."""
    entries = svc.config.critical_callers
    if not entries:
        return {"clamped": False, "entries": [], "pods": [], "more_pods": 0}
    pods = sorted(
        f"{w.namespace}/{w.name}"
        for w in world.workloads.values()
        if any(caller_matches(c, w.namespace, w.service_account) for c in entries)
    )
    return {
        "clamped": True,
        "entries": list(entries),
        "pods": pods[:MAX_LISTED_CALLERS],
        "more_pods": max(0, len(pods) - MAX_LISTED_CALLERS),
    }


def endpoint_limits(
    svc: InferenceService, endpoint: Endpoint, limits: RateLimitOptions
) -> dict[str, Any]:
    """The rates ``endpoint``'s sidecar enforces for ``svc`` now (adaptive ones scaled)."""
    rates = endpoint_rates(svc, endpoint, limits)
    return {
        "endpoint": endpoint_key(endpoint),
        "pod": _pod_name(endpoint),
        "rates": {str(p): r for p, r in rates.items()},
    }


def service_view(
    world: World,
    svc: InferenceService,
    client: Resources,
    sidecars: Mapping[tuple[str, str], Proxy],
    limits: RateLimitOptions,
) -> dict[str, Any]:
    """``svc`` as proxies get it; ``client`` is what a client sidecar is generated."""
    config = svc.config
    return {
        "service": f"{svc.namespace}/{svc.name}",
        "hostname": svc.hostname,
        "default_class": config.default_priority.value,
        "mtls": config.mtls.value,
        "annotation_errors": [str(e) for e in svc.errors],
        "ports": _classes(svc, client, sidecars),
        "limits": {
            "rate_limit": {str(p): r for p, r in config.rate_limit.items()},
            "global_rate_limit": {str(p): r for p, r in config.global_rate_limit.items()},
            "max_concurrency": config.max_concurrency,
            "token_budgets": [
                {"budget": b.name, "tokens": b.tokens, "window_s": b.window_s}
                for b in config.token_budgets
            ],
            "adaptive": config.adaptive,
            "endpoints": [
                endpoint_limits(svc, e, limits)
                for e in svc.endpoints
                if config.rate_limit and e.ready
            ],
        },
        "critical_callers": critical_callers(world, svc),
    }


def backed_services(world: World, namespace: str, pod: str) -> list[InferenceService]:
    """The Services whose endpoints include the pod ``namespace/pod``."""
    return [
        svc for svc in world.services if any(e.pod_key == (namespace, pod) for e in svc.endpoints)
    ]


def may_send_critical(world: World, namespace: str, account: str) -> dict[str, list[str]]:
    """Per Service with a caller list: whether ``namespace/account`` is on it."""
    allowed: list[str] = []
    clamped: list[str] = []
    for svc in world.services:
        if not svc.config.critical_callers:
            continue
        on_list = any(caller_matches(c, namespace, account) for c in svc.config.critical_callers)
        (allowed if on_list else clamped).append(f"{svc.namespace}/{svc.name}")
    return {"allowed": allowed, "lowered_to_standard": clamped}
