"""Names: xDS type URLs, and the names of listeners, route configurations and clusters.

Names follow Istio where Istio has a convention, so that ``istioctl``-trained eyes read a
config dump without a glossary:

* outbound clusters ``outbound|PORT|CLASS|HOST``, the priority class as Istio's subset;
* inbound clusters ``inbound|PORT|CLASS|HOST``, PORT being the Service port: one per class,
  each admitting that class's share of the endpoint;
* a sidecar's listeners ``virtualOutbound`` and ``virtualInbound``;
* a gateway's listener ``BIND_PORT`` (``0.0.0.0_8080``) and its routes ``http.PORT``;
* a proxyless gRPC target's listener and route configuration ``HOST:PORT``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from mesh.model import InferenceService, Priority, ServicePort
from routing.catalog import served_ports

OUTBOUND_LISTENER: Final = "virtualOutbound"
INBOUND_LISTENER: Final = "virtualInbound"
OUTBOUND_ROUTE: Final = "outbound"
INBOUND_ROUTE: Final = "inbound"

#: The name of the route that catches a missing or unknown class header.
DEFAULT_ROUTE: Final = "default"

OUTBOUND: Final = "outbound"
INBOUND: Final = "inbound"


def outbound_cluster(port: int, priority: Priority, host: str) -> str:
    """``outbound|8000|critical|llama.default.svc.cluster.local``."""
    return f"{OUTBOUND}|{port}|{priority.value}|{host}"


def inbound_cluster(port: int, host: str, priority: Priority) -> str:
    """``inbound|8000|sheddable|llama.default.svc.cluster.local``: the sidecar's own
    workload, for one class."""
    return f"{INBOUND}|{port}|{priority.value}|{host}"


@dataclass(frozen=True)
class ClusterName:
    """A cluster name taken apart. ``subset`` is the class name, or ``""`` for inbound."""

    direction: str
    port: int
    subset: str
    host: str

    @property
    def priority(self) -> Priority | None:
        try:
            return Priority(self.subset)
        except ValueError:
            return None


def parse_cluster_name(name: str) -> ClusterName | None:
    """Parse ``DIRECTION|PORT|SUBSET|HOST``; None when ``name`` is not of that form."""
    parts = name.split("|")
    if len(parts) != 4:
        return None
    direction, port_s, subset, host = parts
    if direction not in (OUTBOUND, INBOUND) or not port_s.isdigit() or not host:
        return None
    return ClusterName(direction=direction, port=int(port_s), subset=subset, host=host)


def gateway_listener(bind_address: str, port: int) -> str:
    return f"{bind_address}_{port}"


def gateway_route(port: int) -> str:
    return f"http.{port}"


def proxyless_target(host: str, port: int) -> str:
    """The name gRPC asks for: the target of ``xds:///HOST:PORT``."""
    return f"{host}:{port}"


def virtual_host(host: str, port: int) -> str:
    return f"{host}:{port}"


def owns_portless_domains(svc: InferenceService, port: ServicePort) -> bool:
    """Whether ``port`` gets the Service's domains without ``:PORT``.

    One route configuration cannot list a domain twice, so a bare ``llama.default`` can
    name only one port of a multi-port Service: the first one declared, which is also the
    port Kubernetes tooling treats as the Service's main one.
    """
    served = served_ports(svc)
    return bool(served) and served[0].port == port.port


def service_domains(svc: InferenceService, port: ServicePort, viewer_namespace: str) -> list[str]:
    """The Host/authority values that name ``svc``'s ``port``, as the proxy sees them.

    ``NAME``, ``NAME.NS``, ``NAME.NS.svc`` and ``NAME.NS.svc.cluster.local``, each with
    ``:PORT`` and (for the Service's first served port) without. As in Istio, the bare ``NAME``
    resolves only within the viewer's own namespace, since two namespaces may both have a
    ``llama``; the longer forms are unique mesh-wide.
    """
    bases = [f"{svc.name}.{svc.namespace}", f"{svc.name}.{svc.namespace}.svc", svc.hostname]
    if svc.namespace == viewer_namespace:
        bases.insert(0, svc.name)
    with_port = [f"{base}:{port.port}" for base in bases]
    if not owns_portless_domains(svc, port):
        return with_port
    return [d for base in bases for d in (base, f"{base}:{port.port}")]
