"""Which Services and ports proxies are given routes for, in a stable order, and which
endpoints a sidecar's own pod serves."""

from __future__ import annotations

from collections.abc import Iterable

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


def _served(services: Iterable[InferenceService]) -> tuple[InferenceService, ...]:
    return tuple(
        sorted((s for s in services if s.config.enabled and served_ports(s)), key=lambda s: s.key)
    )


class _Served:
    """The last world :func:`served_services` was asked about, and its answer: every pass
    of one translation asks again, for the same world. One tuple, replaced whole, so a
    reader on another thread sees a world with its own answer."""

    last: tuple[World | None, tuple[InferenceService, ...]] = (None, ())


def served_services(world: World) -> tuple[InferenceService, ...]:
    """Enabled Services with at least one served port, sorted by namespace and name.

    Sorting here makes every generated list independent of the order sources listed
    Services in, so the same world always gives the same bytes.
    """
    last_world, last = _Served.last
    if last_world is world:
        return last
    served = _served(world.services)
    _Served.last = (world, served)
    return served


def own_endpoints(
    world: World, proxy: Proxy
) -> list[tuple[InferenceService, ServicePort, Endpoint]]:
    """The endpoints ``proxy``'s own pod serves: per served Service port, the one its
    inbound cluster points at (the first by address and port). Empty for anything but an
    Envoy sidecar.

    An endpoint is the pod's when it names the pod, or names no pod and is at the pod's
    IP (several pods may share an IP in local setups, so the pod's name wins)."""
    if proxy.kind is not ProxyKind.SIDECAR or proxy.proxyless:
        return []
    mine: dict[int, list[tuple[int, Endpoint]]] = {}
    services: dict[int, InferenceService] = {}
    for svc, index, endpoint in world.endpoints_of((proxy.namespace, proxy.pod_name), proxy.ip):
        services[id(svc)] = svc
        mine.setdefault(id(svc), []).append((index, endpoint))
    out = []
    for svc in _served(services.values()):
        for port in served_ports(svc):
            own = [
                (e.address, e.port, i, e) for i, e in mine[id(svc)] if e.service_port == port.port
            ]
            if own:
                out.append((svc, port, min(own)[3]))
    return out
