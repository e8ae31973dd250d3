"""Endpoints: one ClusterLoadAssignment per class cluster, GPU-backed hosts first.

GPU-backed endpoints go at EDS priority 0 and the others (fallback) at the next priority,
so fallback hosts get traffic only when no healthy GPU-backed host is left. Priorities are
kept dense: a Service with no GPU-backed endpoint has its fallback hosts at priority 0
(gRPC rejects a priority list with a gap; for Envoy it changes nothing).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from mesh.model import Endpoint, InferenceService, MtlsMode
from mesh.proxy import Proxy

#: Envoy computes each priority's health as
#:     min(100, overprovisioning_factor * healthy_hosts / hosts)
#: (LoadBalancerBase::recalculatePerPriorityState; the factor is a percentage, default
#: 140), and a priority whose health is 100 takes all the load. With the default, two
#: GPU hosts of which one is healthy give 140 * 1 / 2 = 70: 30 % of requests would spill
#: to the fallback while a GPU host is still up. A factor of at least 100 * hosts makes
#: any priority with one healthy host 100 % healthy: 100 * N * 1 / N = 100. This factor
#: covers up to a million hosts per priority, fits the field's uint32 (1e8 < 4.29e9), and
#: Envoy multiplies in uint64, so 1e8 * 1e6 cannot overflow. Priority 1 thus gets traffic
#: only when priority 0 has no healthy host left (health 0); with the panic threshold at
#: 0 (see clusters.py) Envoy never spreads load over unhealthy hosts instead.
OVERPROVISIONING_FACTOR: Final = 100 * 1_000_000

#: Istio's marker for "this endpoint speaks mTLS through a sidecar"; a cluster's
#: ``transport_socket_matches`` can select on it.
TLS_MODE_KEY: Final = "envoy.transport_socket_match"
TLS_MODE_ISTIO: Final = "istio"

GPU_ZONE: Final = "gpu"
FALLBACK_ZONE: Final = "fallback"


@dataclass(frozen=True)
class Target:
    """Where the proxy sends one endpoint's traffic."""

    address: str
    port: int
    gpu: bool
    #: Reached through the pod's connected sidecar (its inbound listener), not directly.
    via_sidecar: bool


def _is_wildcard(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


def endpoint_target(endpoint: Endpoint, sidecars: Mapping[tuple[str, str], Proxy]) -> Target:
    """Address ``endpoint`` through its pod's connected sidecar if there is one.

    The sidecar's inbound listener listens on its bind address: the pod IP (the
    endpoint's address) when that is a wildcard, else the bind address itself.
    """
    key = endpoint.pod_key
    sidecar = sidecars.get(key) if key is not None else None
    if sidecar is None or sidecar.is_gateway or sidecar.proxyless:
        return Target(endpoint.address, endpoint.port, endpoint.gpu, via_sidecar=False)
    address = endpoint.address if _is_wildcard(sidecar.bind_address) else sidecar.bind_address
    return Target(address, sidecar.inbound_port, endpoint.gpu, via_sidecar=True)


def serving_targets(
    svc: InferenceService, port: int, sidecars: Mapping[tuple[str, str], Proxy]
) -> tuple[Target, ...]:
    """The targets that get ``svc``'s ``port`` traffic, GPU-backed first, then by address.

    Unready endpoints are left out. So, for a ``strict`` Service, are endpoints without a
    connected sidecar: they could only be reached in plaintext, which strict refuses.
    """
    chosen: dict[tuple[str, int], Target] = {}
    for endpoint in svc.endpoints_for(port):
        if not endpoint.ready:
            continue
        target = endpoint_target(endpoint, sidecars)
        if svc.config.mtls is MtlsMode.STRICT and not target.via_sidecar:
            continue
        key = (target.address, target.port)
        if key not in chosen or (target.gpu and not chosen[key].gpu):
            chosen[key] = target
    return tuple(sorted(chosen.values(), key=lambda t: (not t.gpu, t.address, t.port)))


def _lb_endpoint(target: Target) -> Any:
    lb = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address=target.address, port_value=target.port
                )
            )
        ),
    )
    if target.via_sidecar:
        marker = struct_pb2.Struct()
        marker.update({"tlsMode": TLS_MODE_ISTIO})
        lb.metadata.CopyFrom(base_pb2.Metadata(filter_metadata={TLS_MODE_KEY: marker}))
    return lb


def _locality(zone: str, priority: int, targets: list[Target]) -> Any:
    return endpoint_components_pb2.LocalityLbEndpoints(
        locality=base_pb2.Locality(sub_zone=zone),
        lb_endpoints=[_lb_endpoint(t) for t in targets],
        load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
        priority=priority,
    )


def load_assignment(cluster_name: str, targets: tuple[Target, ...]) -> Any:
    """The ClusterLoadAssignment of one cluster: GPU-backed at priority 0, fallback next."""
    gpu = [t for t in targets if t.gpu]
    fallback = [t for t in targets if not t.gpu]
    localities = []
    if gpu:
        localities.append(_locality(GPU_ZONE, 0, gpu))
    if fallback:
        localities.append(_locality(FALLBACK_ZONE, len(localities), fallback))
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name,
        endpoints=localities,
        policy=endpoint_pb2.ClusterLoadAssignment.Policy(
            overprovisioning_factor=wrappers_pb2.UInt32Value(value=OVERPROVISIONING_FACTOR)
        ),
    )
