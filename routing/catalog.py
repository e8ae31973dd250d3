"""Which Services and ports proxies are given routes for, in a stable order, and which
endpoints a sidecar's own pod serves."""

from __future__ import annotations

from mesh.model import Endpoint, InferenceService, ServicePort, World
from mesh.proxy import Proxy, ProxyKind


def served_ports(svc: InferenceService) -> tuple[ServicePort, ...]:
    """The Service's TCP ports (routes are HTTP; UDP and SCTP ports are skipped), each port
    number once (the first declaration wins), in declaration order."""
    seen: set[int] = set()
    ports = []
    for port in svc.ports:
        if port.protocol.upper() == "TCP" and port.port not in seen:
            seen.add(port.port)
            ports.append(port)
    return tuple(ports)


def served_services(world: World) -> tuple[InferenceService, ...]:
    """Enabled Services with at least one served port, sorted by namespace and name.

    Sorting here makes every generated list independent of the order sources listed
    Services in, so the same world always gives the same bytes.
    """
    services = (s for s in world.services if s.config.enabled and served_ports(s))
    return tuple(sorted(services, key=lambda s: s.key))


def _serves_pod(proxy: Proxy, endpoint: Endpoint) -> bool:
    """Whether ``endpoint`` is ``proxy``'s own pod: by pod name, or by IP when the endpoint
    names no pod (several pods may share an IP in local setups, so the pod wins)."""
    if endpoint.pod_key is not None:
        return endpoint.pod_key == (proxy.namespace, proxy.pod_name)
    return endpoint.address == proxy.ip


def own_endpoints(
    world: World, proxy: Proxy
) -> list[tuple[InferenceService, ServicePort, Endpoint]]:
    """The endpoints ``proxy``'s own pod serves: per served Service port, the one its
    inbound cluster points at (the first by address and port). Empty for anything but an
    Envoy sidecar."""
    if proxy.kind is not ProxyKind.SIDECAR or proxy.proxyless:
        return []
    out = []
    for svc in served_services(world):
        for port in served_ports(svc):
            own = sorted(
                (e for e in svc.endpoints_for(port.port) if _serves_pod(proxy, e)),
                key=lambda e: (e.address, e.port),
            )
            if own:
                out.append((svc, port, own[0]))
    return out
