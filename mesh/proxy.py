"""Proxies as the control plane sees them: identity parsed from an Istio-style node ID.

Node ID: ``TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local``. ``TYPE`` is ``sidecar``
for a workload's sidecar and ``router`` for a gateway. Node metadata, as Istio sends it,
adds ``NAMESPACE``, ``SERVICE_ACCOUNT``, ``LABELS`` and inferlane's port and address
overrides.

All of it is a claim. Where the stream authenticated, the stream authorizer records the
proof on the :class:`Proxy` (``authenticated_identity``, ``authenticated_pod``,
``peer_ip``), and :func:`mtls.identity.binding_problem` holds the claim against the pod in
the world.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_INBOUND_PORT = 15006
DEFAULT_GATEWAY_PORT = 8080
DEFAULT_BIND_ADDRESS = "0.0.0.0"
#: Where the inbound sidecar reaches its own workload: over loopback, inside the pod, so
#: the workload need not listen on the pod's IP and nothing outside the pod reaches it
#: past the sidecar (with a NetworkPolicy, see ``inferlane inject``).
DEFAULT_WORKLOAD_ADDRESS = "127.0.0.1"

#: Longest node ID accepted; Istio's are well under this.
MAX_NODE_ID_LENGTH = 512


class ProxyKind(enum.StrEnum):
    SIDECAR = "sidecar"
    ROUTER = "router"


class NodeIdError(ValueError):
    """A node ID or node metadata that does not follow the Istio conventions."""


@dataclass(frozen=True)
class Proxy:
    """One connected proxy's identity and settings. Translators read it; nothing mutates it."""

    node_id: str
    kind: ProxyKind
    ip: str
    pod_name: str
    namespace: str
    dns_domain: str
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    outbound_port: int = DEFAULT_OUTBOUND_PORT
    inbound_port: int = DEFAULT_INBOUND_PORT
    gateway_port: int = DEFAULT_GATEWAY_PORT
    bind_address: str = DEFAULT_BIND_ADDRESS
    #: The loopback address the inbound sidecar forwards to (``INFERLANE_WORKLOAD_ADDRESS``).
    workload_address: str = DEFAULT_WORKLOAD_ADDRESS
    #: A gRPC proxyless client (grpcio's xDS resolver) rather than an Envoy. It subscribes
    #: by name and needs api_listeners; Envoy would reject those over LDS.
    proxyless: bool = False
    #: The ``SERVICE_ACCOUNT`` the node metadata claims (``""``: it claims none, and
    #: ``service_account`` is the default). Kept to refuse a claim the world contradicts.
    claimed_service_account: str = ""
    #: ``namespace/serviceaccount`` the xDS stream authenticated as (on the TLS ports), or
    #: ``""`` when it did not authenticate. Workload secrets then go to that identity only.
    authenticated_identity: str = ""
    #: The pod the stream's proof names: a bound service-account token names its pod; a
    #: certificate names none (``""``).
    authenticated_pod: str = ""
    #: The IP address the xDS stream comes from (``""`` when not an IP peer).
    peer_ip: str = ""
    #: Whether the stream may be sent workload secrets (SDS) at all: the plaintext xDS port
    #: clears it for peers outside its allowlist.
    secrets_allowed: bool = True

    @property
    def is_gateway(self) -> bool:
        return self.kind is ProxyKind.ROUTER

    @property
    def identity(self) -> str:
        """``namespace/serviceaccount``, the form critical-callers lists use."""
        return f"{self.namespace}/{self.service_account}"


@dataclass(frozen=True)
class NodeId:
    kind: ProxyKind
    ip: str
    pod_name: str
    namespace: str
    dns_domain: str


def parse_node_id(node_id: str) -> NodeId:
    """Parse ``TYPE~IP~POD.NAMESPACE~DOMAIN``; raise :class:`NodeIdError` saying what is wrong."""
    if not node_id:
        raise NodeIdError("node ID is empty; expected TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN")
    if len(node_id) > MAX_NODE_ID_LENGTH:
        raise NodeIdError(f"node ID is {len(node_id)} characters, over {MAX_NODE_ID_LENGTH}")
    parts = node_id.split("~")
    if len(parts) != 4:
        raise NodeIdError(
            f"node ID {node_id!r} has {len(parts)} '~'-separated parts, expected 4: "
            "TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local"
        )
    kind_s, ip, pod_ns, domain = parts
    try:
        kind = ProxyKind(kind_s)
    except ValueError:
        raise NodeIdError(
            f"node ID {node_id!r}: type {kind_s!r} is not 'sidecar' or 'router'"
        ) from None
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise NodeIdError(f"node ID {node_id!r}: {ip!r} is not an IP address") from None
    pod, dot, namespace = pod_ns.partition(".")
    if not dot or not pod or not namespace:
        raise NodeIdError(f"node ID {node_id!r}: {pod_ns!r} is not POD.NAMESPACE")
    return NodeId(kind=kind, ip=ip, pod_name=pod, namespace=namespace, dns_domain=domain)


def _port(metadata: Mapping[str, object], key: str, default: int) -> int:
    raw = metadata.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(str(raw))
    except ValueError:
        raise NodeIdError(f"node metadata {key}={raw!r} is not a port number") from None
    if not 0 < value < 65536:
        raise NodeIdError(f"node metadata {key}={raw!r} is not a port number (1-65535)")
    return value


def proxy_from_node(
    node_id: str, metadata: Mapping[str, object], *, proxyless: bool = False
) -> Proxy:
    """Build a :class:`Proxy` from a node ID and its metadata (a plain mapping)."""
    parsed = parse_node_id(node_id)
    meta_ns = metadata.get("NAMESPACE")
    if meta_ns not in (None, "", parsed.namespace):
        raise NodeIdError(
            f"node metadata NAMESPACE={meta_ns!r} contradicts the node ID's {parsed.namespace!r}"
        )
    labels_raw = metadata.get("LABELS") or {}
    if not isinstance(labels_raw, Mapping):
        raise NodeIdError("node metadata LABELS must be a map of strings")
    labels = {str(k): str(v) for k, v in labels_raw.items()}
    bind = str(metadata.get("INFERLANE_BIND_ADDRESS") or DEFAULT_BIND_ADDRESS)
    try:
        ipaddress.ip_address(bind)
    except ValueError:
        raise NodeIdError(f"node metadata INFERLANE_BIND_ADDRESS={bind!r} is not an IP") from None
    workload = str(metadata.get("INFERLANE_WORKLOAD_ADDRESS") or DEFAULT_WORKLOAD_ADDRESS)
    try:
        loopback = ipaddress.ip_address(workload).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise NodeIdError(
            f"node metadata INFERLANE_WORKLOAD_ADDRESS={workload!r} is not a loopback IP: "
            "the inbound sidecar reaches its workload inside the pod"
        )
    claimed_account = str(metadata.get("SERVICE_ACCOUNT") or "")
    return Proxy(
        node_id=node_id,
        kind=parsed.kind,
        ip=parsed.ip,
        pod_name=parsed.pod_name,
        namespace=parsed.namespace,
        dns_domain=parsed.dns_domain,
        service_account=claimed_account or "default",
        claimed_service_account=claimed_account,
        labels=MappingProxyType(labels),
        outbound_port=_port(metadata, "INFERLANE_OUTBOUND_PORT", DEFAULT_OUTBOUND_PORT),
        inbound_port=_port(metadata, "INFERLANE_INBOUND_PORT", DEFAULT_INBOUND_PORT),
        gateway_port=_port(metadata, "INFERLANE_GATEWAY_PORT", DEFAULT_GATEWAY_PORT),
        bind_address=bind,
        workload_address=workload,
        proxyless=proxyless,
    )
