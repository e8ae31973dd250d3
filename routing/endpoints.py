"""Endpoints: one ClusterLoadAssignment per class cluster, GPU-backed hosts first.

GPU-backed endpoints go at EDS priority 0 and the others (fallback) at the next priority,
so fallback hosts get traffic only when no healthy GPU-backed host is left. Priorities are
kept dense: a Service with no GPU-backed endpoint has its fallback hosts at priority 0
(gRPC rejects a priority list with a gap; for Envoy it changes nothing).

Load-aware choice, with no per-request callout: the control plane reads each GPU-backed
endpoint's queue (``vllm:num_requests_waiting``) and turns it into the endpoint's EDS
``load_balancing_weight`` (:func:`queue_weight`); each caller's least-request balancer
then weighs a pod's weight against its own in-flight requests to it. A pod whose queue
grows gets new requests from every caller less often, whatever the class. While no
endpoint of a port has a queue, no weight is set at all (the config is as without).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from mesh.model import Endpoint, InferenceService, MtlsMode, World
from mesh.proxy import DEFAULT_INBOUND_PORT, Proxy

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

#: The EDS weight of an endpoint with nothing queued. Each doubling of its queue halves
#: it: 1 request waiting gives 64, 2 or 3 give 32, 4 to 7 give 16, down to 1.
FULL_WEIGHT: Final = 128


def queue_weight(waiting: float) -> int:
    """An endpoint's ``load_balancing_weight`` from the requests queued at it.

    Power-of-two steps, so that the weight (and with it every caller's EDS) changes only
    when the queue doubles or halves, not with every request.
    """
    if not waiting >= 1:  # also NaN
        return FULL_WEIGHT
    return max(1, FULL_WEIGHT >> (int(math.log2(min(waiting, 2.0**30))) + 1))


def endpoint_key(endpoint: Endpoint) -> str:
    """The name the control plane's runtimes know an endpoint by (adaptive multipliers,
    queue weights).

    ``NAMESPACE/POD:PORT`` when the endpoint names its pod (readable on debug pages, and
    stable while the pod lives), else ``ADDRESS:PORT``.
    """
    if endpoint.pod_name:
        return f"{endpoint.pod_namespace}/{endpoint.pod_name}:{endpoint.port}"
    return f"{endpoint.address}:{endpoint.port}"


@dataclass(frozen=True)
class Target:
    """Where the proxy sends one endpoint's traffic."""

    address: str
    port: int
    gpu: bool
    #: Reached through the pod's sidecar (its inbound listener, over mTLS), not directly.
    via_sidecar: bool
    #: Its EDS weight (:func:`queue_weight`).
    weight: int = FULL_WEIGHT


def _is_wildcard(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


def endpoint_target(
    endpoint: Endpoint,
    sidecars: Mapping[tuple[str, str], Proxy],
    world: World,
    weight: int = FULL_WEIGHT,
) -> Target:
    """Where ``endpoint``'s traffic goes: its pod's sidecar, when the pod has one.

    A pod has a sidecar when one of it is connected, or when its manifest declares one
    (:attr:`Workload.sidecar <mesh.model.Workload.sidecar>`, the container ``inferlane
    inject`` adds), as Istio decides mTLS by the pod's injection rather than by a live
    connection: so a control plane that restarts, or a sidecar that reconnects, changes
    no address. A connected sidecar's own settings win (its inbound port and bind address,
    from its node metadata); a declared one that is not connected yet has the injected
    defaults. The sidecar's inbound listener listens on its bind address: the pod IP (the
    endpoint's address) when that is a wildcard, else the bind address itself.
    """
    key = endpoint.pod_key
    if key is None:
        return Target(endpoint.address, endpoint.port, endpoint.gpu, False, weight)
    sidecar = sidecars.get(key)
    if sidecar is not None and not sidecar.is_gateway and not sidecar.proxyless:
        bind = sidecar.bind_address
        address = endpoint.address if _is_wildcard(bind) else bind
        return Target(address, sidecar.inbound_port, endpoint.gpu, True, weight)
    workload = world.workloads.get(key)
    if workload is not None and workload.sidecar:
        return Target(endpoint.address, DEFAULT_INBOUND_PORT, endpoint.gpu, True, weight)
    return Target(endpoint.address, endpoint.port, endpoint.gpu, False, weight)


def endpoint_targets(
    svc: InferenceService,
    port: int,
    sidecars: Mapping[tuple[str, str], Proxy],
    world: World,
    weights: Mapping[str, int] | None = None,
) -> tuple[tuple[Endpoint, Target], ...]:
    """Every endpoint of ``svc``'s ``port`` that can be reached, ready or not, with its
    target: all of them, except that a ``strict`` Service's endpoints without a sidecar
    are left out (they could only be reached in plaintext, which strict refuses).
    ``weights`` (by :func:`endpoint_key`) are the queue weights; absent ones are full."""
    strict = svc.config.mtls is MtlsMode.STRICT
    found = []
    for endpoint in svc.endpoints_for(port):
        weight = weights.get(endpoint_key(endpoint), FULL_WEIGHT) if weights else FULL_WEIGHT
        target = endpoint_target(endpoint, sidecars, world, weight)
        if strict and not target.via_sidecar:
            continue
        found.append((endpoint, target))
    return tuple(found)


def distinct(targets: Iterable[Target]) -> tuple[Target, ...]:
    """One target per address and port (GPU-backed if any endpoint there is), GPU-backed
    first, then by address."""
    chosen: dict[tuple[str, int], Target] = {}
    for target in targets:
        key = (target.address, target.port)
        if key not in chosen or (target.gpu and not chosen[key].gpu):
            chosen[key] = target
    return tuple(sorted(chosen.values(), key=lambda t: (not t.gpu, t.address, t.port)))


def serving_targets(
    svc: InferenceService,
    port: int,
    sidecars: Mapping[tuple[str, str], Proxy],
    world: World,
    weights: Mapping[str, int] | None = None,
) -> tuple[Target, ...]:
    """The targets that get ``svc``'s ``port`` traffic: those of its ready endpoints
    (:func:`endpoint_targets`), GPU-backed first, then by address."""
    return distinct(t for e, t in endpoint_targets(svc, port, sidecars, world, weights) if e.ready)


def _lb_endpoint(target: Target, weighted: bool) -> Any:
    lb = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address=target.address, port_value=target.port
                )
            )
        ),
    )
    if weighted:
        lb.load_balancing_weight.value = target.weight
    if target.via_sidecar:
        marker = struct_pb2.Struct()
        marker.update({"tlsMode": TLS_MODE_ISTIO})
        lb.metadata.CopyFrom(base_pb2.Metadata(filter_metadata={TLS_MODE_KEY: marker}))
    return lb


def _locality(zone: str, priority: int, targets: list[Target]) -> Any:
    weighted = any(t.weight != FULL_WEIGHT for t in targets)
    return endpoint_components_pb2.LocalityLbEndpoints(
        locality=base_pb2.Locality(sub_zone=zone),
        lb_endpoints=[_lb_endpoint(t, weighted) for t in targets],
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
