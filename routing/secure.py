"""Mesh mTLS wired into a proxy's generated config: a pure pass over routing's output.

:func:`secure` runs last in :func:`routing.generate`. It reads the world, the proxy and the
connected sidecars, never a clock, so equal inputs still give equal bytes.

A proxy takes part in mTLS only if it has a workload identity
(:func:`mtls.identity.workload_identity`): its pod is in the world, and the control plane
may send it that pod's certificate. Such a proxy gets:

* **Outbound clusters** whose endpoints include pods reached through their sidecar
  (``tlsMode: istio`` endpoint metadata) a ``transport_socket_match`` that speaks mTLS to
  those endpoints and accepts only the SPIFFE IDs of the Service's pods. Other endpoints
  stay plaintext. A ``strict`` Service's clusters use mTLS for every endpoint.
* **The inbound listener**, if its pod backs a Service, a TLS filter chain that requires a
  client certificate from the mesh CA, and a plaintext chain only while some Service the
  pod backs is ``permissive``. A ``tls_inspector`` tells the two apart. A plaintext client
  of a ``strict``-only pod matches no chain and its connection is closed.

Every sidecar's inbound HTTP connection manager gets an RBAC filter, which by itself lets
everything through. Per route, it answers 403 to:

* a request to the ``critical`` route (and to the catch-all route when the Service's default
  class is critical) from any peer whose authenticated SPIFFE ID is not on the Service's
  critical-callers list; a plaintext peer has no authenticated ID, so it is always refused;
* any plaintext request to a ``strict`` Service (it can arrive only when the same pod also
  backs a permissive Service and so has a plaintext chain).

Routes guarded by the critical-callers check are marked (:func:`routing.refusals.mark_route`),
so that their 403s say ``x-inferlane-refused: critical-caller``.

A proxy without an identity cannot present a certificate: its outbound traffic stays
plaintext (a strict Service then refuses it, as it should), and its inbound listener stays
plaintext too, with the RBAC rules above refusing what needs an authenticated peer.

Rotation reaches every connection within a bound: an upstream mesh connection lives at most
``connection_lifetime_s``, and the inbound side closes downstream connections after twice
that, so the client, not the server, normally ends a kept-alive connection (no request
races a server-side close).

Critical-callers entries are matched in the mesh's own trust domain: ``ns/sa`` and a SPIFFE
ID naming ``ns/sa`` in any trust domain both mean ``spiffe://TRUST_DOMAIN/ns/NS/sa/SA``,
exactly as the outbound clamp (:mod:`routing.clamp`) reads them; ``ns/*`` is any service
account of ``ns``. Certificates are issued only in the mesh's trust domain, so nothing else
could match anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from mesh import xds
from mesh.model import InferenceService, MtlsMode, Priority, Refusal, World
from mesh.proxy import Proxy, ProxyKind
from mtls.ca import BadIdentity, spiffe_id
from mtls.identity import DEFAULT_TRUST_DOMAIN, workload_identity
from mtls.tls_context import downstream_mtls, upstream_mtls
from routing import clamp, endpoints, names, refusals
from routing.catalog import served_ports, served_services
from routing.clusters import HTTP_OPTIONS
from routing.protos import duration, pack

log = logging.getLogger(__name__)

#: Longest life of an upstream mesh connection, in seconds, when nothing shorter is asked
#: for. An hour bounds how long a renewed certificate (due at 12 h of a 24 h life) takes to
#: reach every connection, at the cost of one reconnect per connection per hour.
DEFAULT_CONNECTION_LIFETIME_S: Final = 3600.0
#: The inbound side closes a downstream connection after this multiple of the lifetime.
INBOUND_LIFETIME_FACTOR: Final = 2.0

RBAC_FILTER: Final = "envoy.filters.http.rbac"
TLS_INSPECTOR: Final = "envoy.filters.listener.tls_inspector"
#: Filter-chain and transport-socket-match names, as they appear in stats and config dumps.
TLS_CHAIN: Final = "mtls"
PLAINTEXT_CHAIN: Final = "plaintext"
TLS_MODE_MATCH: Final = "tlsMode-istio"
#: RBAC policy names.
CRITICAL_CALLERS_POLICY: Final = "critical-callers"
AUTHENTICATED_POLICY: Final = "authenticated-peers"


@dataclass(frozen=True)
class SecurityOptions:
    """What the mTLS pass needs beyond the world and the proxy."""

    trust_domain: str = DEFAULT_TRUST_DOMAIN
    #: Seconds an upstream mesh connection may live; see the module docstring.
    connection_lifetime_s: float = DEFAULT_CONNECTION_LIFETIME_S


def secure(
    resources: Mapping[str, Sequence[Message]],
    world: World,
    proxy: Proxy,
    sidecars: Mapping[tuple[str, str], Proxy],
    options: SecurityOptions | None = None,
) -> dict[str, list[Message]]:
    """``resources`` (as :func:`routing.generate` builds them) with mesh mTLS added.

    Messages that change are copied; the lists keep their order (names do not change).
    """
    opts = options or SecurityOptions()
    out: dict[str, list[Any]] = {t: list(msgs) for t, msgs in resources.items()}
    if proxy.proxyless:
        return out
    by_host = {svc.hostname: svc for svc in served_services(world)}
    has_identity = workload_identity(world, proxy, opts.trust_domain) is not None
    if has_identity and xds.CLUSTER in out:
        out[xds.CLUSTER] = [
            _secure_cluster(c, by_host, world, sidecars, opts) for c in out[xds.CLUSTER]
        ]
    if proxy.kind is not ProxyKind.SIDECAR:
        return out
    backed = _backed_services(out.get(xds.ROUTE, ()), world)
    if xds.ROUTE in out:
        out[xds.ROUTE] = [
            _guard_inbound_routes(r, backed, opts.trust_domain)
            if r.name == names.INBOUND_ROUTE
            else r
            for r in out[xds.ROUTE]
        ]
    if xds.LISTENER in out:
        terminate = has_identity and bool(backed)
        out[xds.LISTENER] = [
            _secure_inbound(listener, backed.values(), terminate, opts)
            if listener.name == names.INBOUND_LISTENER
            else listener
            for listener in out[xds.LISTENER]
        ]
    return out


# --------------------------------------------------------------------------- outbound


def service_spiffe_ids(
    svc: InferenceService,
    port: int,
    world: World,
    sidecars: Mapping[tuple[str, str], Proxy],
    trust_domain: str,
) -> tuple[list[str], bool]:
    """(SPIFFE IDs of the pods serving ``port`` through a sidecar, whether there are any
    such endpoints). An endpoint whose pod is not in the world adds no ID.

    Ready or not: an unready pod is still one of the Service's servers, and a pod's
    readiness must change its load assignment only, never the cluster (see
    :func:`routing.clusters.caller_limits`)."""
    found: set[str] = set()
    via_sidecar = False
    for endpoint in svc.endpoints_for(port):
        if not endpoints.endpoint_target(endpoint, sidecars, world).via_sidecar:
            continue
        via_sidecar = True
        key = endpoint.pod_key
        workload = world.workloads.get(key) if key is not None else None
        if workload is None:
            continue
        try:
            found.add(spiffe_id(trust_domain, workload.namespace, workload.service_account))
        except BadIdentity as exc:
            log.warning("pod %s/%s has no usable SPIFFE ID: %s", *workload.key, exc)
    return sorted(found), via_sidecar


def _nobody(svc: InferenceService, trust_domain: str) -> list[str]:
    """A pin that no certificate satisfies (an empty service account), for a Service none
    of whose sidecar-fronted pods is known: the handshake then fails closed."""
    return [f"spiffe://{trust_domain}/ns/{svc.namespace}/sa/"]


def _secure_cluster(
    cluster: Any,
    by_host: Mapping[str, InferenceService],
    world: World,
    sidecars: Mapping[tuple[str, str], Proxy],
    opts: SecurityOptions,
) -> Any:
    parsed = names.parse_cluster_name(cluster.name)
    if parsed is None or parsed.direction != names.OUTBOUND:
        return cluster
    svc = by_host.get(parsed.host)
    if svc is None:
        return cluster
    strict = svc.config.mtls is MtlsMode.STRICT
    ids, via_sidecar = service_spiffe_ids(svc, parsed.port, world, sidecars, opts.trust_domain)
    if not strict and not via_sidecar:
        return cluster
    socket = upstream_mtls(ids or _nobody(svc, opts.trust_domain), alpn_protocols=("http/1.1",))
    secured = type(cluster)()
    secured.CopyFrom(cluster)
    if strict:
        secured.transport_socket.CopyFrom(socket)
    else:
        match = struct_pb2.Struct()
        match.update({"tlsMode": endpoints.TLS_MODE_ISTIO})
        entry = secured.transport_socket_matches.add(name=TLS_MODE_MATCH, match=match)
        entry.transport_socket.CopyFrom(socket)
    _limit_upstream_lifetime(secured, opts.connection_lifetime_s)
    return secured


def _limit_upstream_lifetime(cluster: Any, seconds: float) -> None:
    packed = cluster.typed_extension_protocol_options.get(HTTP_OPTIONS)
    if packed is None:
        return
    options = http_protocol_options_pb2.HttpProtocolOptions()
    packed.Unpack(options)
    options.common_http_protocol_options.max_connection_duration.CopyFrom(duration(seconds))
    cluster.typed_extension_protocol_options[HTTP_OPTIONS].CopyFrom(pack(options))


# --------------------------------------------------------------------------- inbound routes


def _backed_services(routes: Iterable[Any], world: World) -> dict[str, InferenceService]:
    """Virtual-host name -> Service, for the Services the proxy's own pod serves (those
    with a virtual host in its ``inbound`` route configuration)."""
    by_vhost = {
        names.virtual_host(svc.hostname, port.port): svc
        for svc in served_services(world)
        for port in served_ports(svc)
    }
    backed: dict[str, InferenceService] = {}
    for route_config in routes:
        if route_config.name != names.INBOUND_ROUTE:
            continue
        for vhost in route_config.virtual_hosts:
            svc = by_vhost.get(vhost.name)
            if svc is not None:
                backed[vhost.name] = svc
    return backed


def caller_principal(entry: str, trust_domain: str) -> Any | None:
    """The RBAC principal of one critical-callers entry; None if the entry is malformed."""
    identity = clamp.entry_identity(entry)
    if identity is None:
        return None
    namespace, account = identity
    base = f"spiffe://{trust_domain}/ns/{namespace}/sa/"
    matcher = (
        string_pb2.StringMatcher(prefix=base)
        if account == "*"
        else string_pb2.StringMatcher(exact=base + account)
    )
    return rbac_config_pb2.Principal(
        authenticated=rbac_config_pb2.Principal.Authenticated(principal_name=matcher)
    )


def _allow_only(policy_name: str, principals: Sequence[Any]) -> Any:
    """Per-route RBAC that allows only ``principals`` (nobody, when the list is empty)."""
    policies = {}
    if principals:
        policies[policy_name] = rbac_config_pb2.Policy(
            permissions=[rbac_config_pb2.Permission(any=True)], principals=list(principals)
        )
    rules = rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.ALLOW, policies=policies)
    return pack(rbac_pb2.RBACPerRoute(rbac=rbac_pb2.RBAC(rules=rules)))


def _any_authenticated() -> Any:
    return rbac_config_pb2.Principal(authenticated=rbac_config_pb2.Principal.Authenticated())


def _claims_critical(route_name: str, svc: InferenceService) -> bool:
    if route_name == Priority.CRITICAL.value:
        return True
    return route_name == names.DEFAULT_ROUTE and svc.config.default_priority is Priority.CRITICAL


def _guards_critical(route_name: str, svc: InferenceService) -> bool:
    """Whether the route's guard is the critical-callers check (its 403s say so)."""
    return bool(svc.config.critical_callers) and _claims_critical(route_name, svc)


def _route_guard(route_name: str, svc: InferenceService, trust_domain: str) -> Any | None:
    if _guards_critical(route_name, svc):
        principals = [
            p
            for p in (caller_principal(e, trust_domain) for e in svc.config.critical_callers)
            if p is not None
        ]
        return _allow_only(CRITICAL_CALLERS_POLICY, principals)
    if svc.config.mtls is MtlsMode.STRICT:
        return _allow_only(AUTHENTICATED_POLICY, [_any_authenticated()])
    return None


def _guard_inbound_routes(
    route_config: Any, backed: Mapping[str, InferenceService], trust_domain: str
) -> Any:
    guarded = type(route_config)()
    guarded.CopyFrom(route_config)
    for vhost in guarded.virtual_hosts:
        svc = backed.get(vhost.name)
        if svc is None:
            continue
        for route in vhost.routes:
            guard = _route_guard(route.name, svc, trust_domain)
            if guard is not None:
                route.typed_per_filter_config[RBAC_FILTER].CopyFrom(guard)
                if _guards_critical(route.name, svc):
                    refusals.mark_route(route, Refusal.CRITICAL_CALLER)
    return guarded


# --------------------------------------------------------------------------- inbound listener


def rbac_filter() -> Any:
    """The inbound RBAC filter with no rules of its own: only per-route configs enforce."""
    return hcm_pb2.HttpFilter(name=RBAC_FILTER, typed_config=pack(rbac_pb2.RBAC()))


def _hcm_index(chain: Any) -> int | None:
    for index, network_filter in enumerate(chain.filters):
        if network_filter.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
            return index
    return None


def _inbound_manager(packed: Any, lifetime_s: float | None) -> Any:
    """The HCM with RBAC first, client-certificate details for the workload, and (when
    terminating mTLS) a bounded downstream connection lifetime."""
    manager = hcm_pb2.HttpConnectionManager()
    packed.Unpack(manager)
    if not any(f.name == RBAC_FILTER for f in manager.http_filters):
        manager.http_filters.insert(0, rbac_filter())
    # The workload may trust x-forwarded-client-cert: whatever a client sent is replaced
    # by the verified peer's URI SAN and certificate hash (or removed, for plaintext).
    manager.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
    manager.set_current_client_cert_details.uri = True
    if lifetime_s is not None:
        manager.common_http_protocol_options.max_connection_duration.CopyFrom(duration(lifetime_s))
    return manager


def _variant(
    base: Any,
    hcm_index: int,
    manager: Any,
    *,
    name: str,
    transport_protocol: str,
    socket: Any | None,
) -> Any:
    """A copy of ``base`` with its HCM replaced, matched on ``transport_protocol``."""
    chain = listener_components_pb2.FilterChain()
    chain.CopyFrom(base)
    chain.name = name
    chain.filter_chain_match.transport_protocol = transport_protocol
    chain.filters[hcm_index].typed_config.CopyFrom(pack(manager))
    chain.ClearField("transport_socket")
    if socket is not None:
        chain.transport_socket.CopyFrom(socket)
    return chain


def _secure_inbound(
    listener: Any,
    backed: Iterable[InferenceService],
    terminate: bool,
    opts: SecurityOptions,
) -> Any:
    if not listener.filter_chains:
        return listener
    base = listener.filter_chains[0]
    hcm_index = _hcm_index(base)
    if hcm_index is None:
        return listener
    lifetime = opts.connection_lifetime_s * INBOUND_LIFETIME_FACTOR if terminate else None
    manager = _inbound_manager(base.filters[hcm_index].typed_config, lifetime)
    secured = type(listener)()
    secured.CopyFrom(listener)
    if not terminate:
        secured.filter_chains[0].filters[hcm_index].typed_config.CopyFrom(pack(manager))
        return secured
    tls = downstream_mtls(require_client_certificate=True)
    chains = [
        _variant(base, hcm_index, manager, name=TLS_CHAIN, transport_protocol="tls", socket=tls)
    ]
    if any(svc.config.mtls is not MtlsMode.STRICT for svc in backed):
        plaintext = _variant(
            base,
            hcm_index,
            manager,
            name=PLAINTEXT_CHAIN,
            transport_protocol="raw_buffer",
            socket=None,
        )
        chains.append(plaintext)
    del secured.filter_chains[:]
    secured.filter_chains.extend(chains)
    if not any(f.name == TLS_INSPECTOR for f in secured.listener_filters):
        secured.listener_filters.add(
            name=TLS_INSPECTOR, typed_config=pack(tls_inspector_pb2.TlsInspector())
        )
    return secured
