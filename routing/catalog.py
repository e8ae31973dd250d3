"""Which Services and ports proxies are given routes for, in a stable order."""

from __future__ import annotations

from mesh.model import InferenceService, ServicePort, World


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
