"""routing.secure: the pure mTLS pass, table-style, without a proxy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import pytest
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from mesh import xds
from mesh.model import MtlsMode, Priority, Workload, World
from mesh.proxy import Proxy
from mtls.identity import workload_identity
from routing import names, simulate
from routing.secure import (
    AUTHENTICATED_POLICY,
    CRITICAL_CALLERS_POLICY,
    PLAINTEXT_CHAIN,
    RBAC_FILTER,
    TLS_CHAIN,
    TLS_INSPECTOR,
    TLS_MODE_MATCH,
    SecurityOptions,
    caller_principal,
)
from tests.routing.factories import build, config, endpoint, gateway, proxy, service

SERVER = proxy(pod="gpu-0", ip="10.0.0.1", service_account="whatever")
CLIENT = proxy(pod="client-0", ip="10.1.0.1")
SIDECARS = {("default", "gpu-0"): SERVER}


def _world(
    *,
    mtls: MtlsMode = MtlsMode.PERMISSIVE,
    callers: tuple[str, ...] = ("default/chat", "ops/*", "spiffe://elsewhere/ns/x/sa/y"),
    default: Priority = Priority.STANDARD,
    pods: Mapping[str, str] | None = None,
) -> World:
    """llama: gpu-0 (10.0.0.1) and cpu-0 (10.0.0.3); pods -> service account."""
    accounts = {"gpu-0": "llama", "cpu-0": "llama", "client-0": "chat"} if pods is None else pods
    workloads = {
        ("default", pod): Workload(namespace="default", name=pod, service_account=sa)
        for pod, sa in accounts.items()
    }
    svc = service(
        cfg=config(mtls=mtls, callers=callers, default=default),
        endpoints=[
            endpoint("10.0.0.1", gpu=True, pod="gpu-0"),
            endpoint("10.0.0.3", pod="cpu-0"),
        ],
    )
    return World(services=(svc,), workloads=MappingProxyType(workloads))


def _by_name(resources: Mapping[str, list[Any]], type_url: str) -> dict[str, Any]:
    return {xds.resource_name(m): m for m in resources[type_url]}


def _cluster(resources: Mapping[str, list[Any]], priority: Priority = Priority.STANDARD) -> Any:
    name = names.outbound_cluster(8000, priority, "llama.default.svc.cluster.local")
    return _by_name(resources, xds.CLUSTER)[name]


def _upstream_sans(socket: Any) -> list[str]:
    context = tls_pb2.UpstreamTlsContext()
    socket.typed_config.Unpack(context)
    validation = context.common_tls_context.combined_validation_context.default_validation_context
    return [m.matcher.exact for m in validation.match_typed_subject_alt_names]


def _lifetime(cluster: Any) -> float:
    options = http_protocol_options_pb2.HttpProtocolOptions()
    cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].Unpack(options)
    return float(options.common_http_protocol_options.max_connection_duration.ToNanoseconds() / 1e9)


def _inbound(resources: Mapping[str, list[Any]]) -> Any:
    return _by_name(resources, xds.LISTENER)[names.INBOUND_LISTENER]


def _manager(chain: Any) -> Any:
    manager = hcm_pb2.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(manager)
    return manager


def _guards(resources: Mapping[str, list[Any]]) -> dict[str, Any]:
    """Inbound route name -> its RBAC rules (None when unguarded)."""
    inbound = _by_name(resources, xds.ROUTE)[names.INBOUND_ROUTE]
    out: dict[str, Any] = {}
    for vhost in inbound.virtual_hosts:
        for route in vhost.routes:
            packed = route.typed_per_filter_config.get(RBAC_FILTER)
            if packed is None:
                out[route.name] = None
                continue
            per_route = rbac_pb2.RBACPerRoute()
            packed.Unpack(per_route)
            out[route.name] = per_route.rbac.rules
    return out


# --------------------------------------------------------------------------- identity


@pytest.mark.parametrize(
    ("who", "expected"),
    [
        (CLIENT, ("default", "chat")),
        (proxy(pod="stranger-0"), None),
        (proxy(pod="client-0", proxyless=True), None),
        (replace(CLIENT, secrets_allowed=False), None),
        (replace(CLIENT, authenticated_identity="default/chat"), ("default", "chat")),
        (replace(CLIENT, authenticated_identity="default/llama"), None),
    ],
    ids=["pod-in-world", "no-pod", "proxyless", "no-secrets", "authenticated", "mismatch"],
)
def test_identity_comes_from_the_pod_in_the_world(
    who: Proxy, expected: tuple[str, str] | None
) -> None:
    # The metadata's service account ("client") is never the identity.
    assert workload_identity(_world(), who) == expected


# --------------------------------------------------------------------------- outbound


def test_outbound_mtls_only_to_sidecar_endpoints_pinned_to_the_backend_identity() -> None:
    resources = build(_world(), CLIENT, SIDECARS)
    cluster = _cluster(resources)
    assert not cluster.HasField("transport_socket")
    [match] = cluster.transport_socket_matches
    assert match.name == TLS_MODE_MATCH
    assert dict(match.match.fields)["tlsMode"].string_value == "istio"
    assert _upstream_sans(match.transport_socket) == ["spiffe://cluster.local/ns/default/sa/llama"]
    assert _lifetime(cluster) == 3600.0
    # The simulator still sees the sidecar-fronted endpoint and the plain one.
    found = simulate.cluster_endpoints(resources, cluster.name)
    assert not isinstance(found, simulate.NoRoute)
    assert {e.via_sidecar for e in found} == {True, False}


def test_outbound_stays_plaintext_without_sidecars_or_without_an_identity() -> None:
    assert not _cluster(build(_world(), CLIENT, {})).transport_socket_matches
    stranger = proxy(pod="stranger-0")
    assert not _cluster(build(_world(), stranger, SIDECARS)).transport_socket_matches


def test_strict_services_use_mtls_for_every_endpoint() -> None:
    cluster = _cluster(build(_world(mtls=MtlsMode.STRICT), CLIENT, SIDECARS))
    assert _upstream_sans(cluster.transport_socket) == [
        "spiffe://cluster.local/ns/default/sa/llama"
    ]


def test_a_trust_domain_and_lifetime_are_honoured() -> None:
    from routing import generate

    opts = SecurityOptions(trust_domain="example.org", connection_lifetime_s=2.5)
    resources: dict[str, list[Any]] = dict(generate(_world(), CLIENT, SIDECARS, tls=opts))
    [match] = _cluster(resources).transport_socket_matches
    assert _upstream_sans(match.transport_socket) == ["spiffe://example.org/ns/default/sa/llama"]
    assert _lifetime(_cluster(resources)) == 2.5


def test_unknown_backend_pods_fail_closed() -> None:
    world = _world(pods={"client-0": "chat"})  # gpu-0's pod is not known
    [match] = _cluster(build(world, CLIENT, SIDECARS)).transport_socket_matches
    assert _upstream_sans(match.transport_socket) == ["spiffe://cluster.local/ns/default/sa/"]


def test_gateways_use_mtls_and_get_no_inbound() -> None:
    gw = gateway(namespace="default")
    world = _world(pods={"gateway-0": "gateway", "gpu-0": "llama"})
    resources = build(world, gw, SIDECARS)
    assert _cluster(resources).transport_socket_matches
    assert names.INBOUND_LISTENER not in _by_name(resources, xds.LISTENER)


# --------------------------------------------------------------------------- inbound


@pytest.mark.parametrize(
    ("mtls", "chains"),
    [(MtlsMode.PERMISSIVE, [TLS_CHAIN, PLAINTEXT_CHAIN]), (MtlsMode.STRICT, [TLS_CHAIN])],
)
def test_inbound_terminates_mtls(mtls: MtlsMode, chains: list[str]) -> None:
    listener = _inbound(build(_world(mtls=mtls), SERVER, SIDECARS))
    assert [c.name for c in listener.filter_chains] == chains
    assert [f.name for f in listener.listener_filters] == [TLS_INSPECTOR]
    tls_chain = listener.filter_chains[0]
    assert tls_chain.filter_chain_match.transport_protocol == "tls"
    context = tls_pb2.DownstreamTlsContext()
    tls_chain.transport_socket.typed_config.Unpack(context)
    assert context.require_client_certificate.value
    manager = _manager(tls_chain)
    assert manager.http_filters[0].name == RBAC_FILTER
    assert manager.forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE_SET
    assert manager.common_http_protocol_options.max_connection_duration.seconds == 7200
    if len(chains) == 2:
        assert listener.filter_chains[1].filter_chain_match.transport_protocol == "raw_buffer"
        assert not listener.filter_chains[1].HasField("transport_socket")


def test_inbound_without_an_identity_stays_plaintext_but_guarded() -> None:
    world = _world(pods={"client-0": "chat"})  # the server's own pod is unknown
    resources = build(world, SERVER, SIDECARS)
    listener = _inbound(resources)
    [chain] = listener.filter_chains
    assert not chain.HasField("transport_socket") and not listener.listener_filters
    assert _manager(chain).http_filters[0].name == RBAC_FILTER
    assert _guards(resources)["critical"] is not None


def test_critical_route_allows_only_the_listed_callers() -> None:
    guards = _guards(build(_world(), SERVER, SIDECARS))
    assert guards["standard"] is None and guards["sheddable"] is None
    assert guards["default"] is None  # the default class is standard
    rules = guards["critical"]
    assert rules.action == rbac_config_pb2.RBAC.ALLOW
    principals = rules.policies[CRITICAL_CALLERS_POLICY].principals
    matchers = [p.authenticated.principal_name for p in principals]
    assert [(m.exact, m.prefix) for m in matchers] == [
        ("spiffe://cluster.local/ns/default/sa/chat", ""),
        ("", "spiffe://cluster.local/ns/ops/sa/"),
        ("spiffe://cluster.local/ns/x/sa/y", ""),
    ]


def test_default_route_is_guarded_when_the_default_class_is_critical() -> None:
    guards = _guards(build(_world(default=Priority.CRITICAL), SERVER, SIDECARS))
    assert guards["default"] is not None and guards["standard"] is None


def test_strict_routes_require_an_authenticated_peer() -> None:
    guards = _guards(build(_world(mtls=MtlsMode.STRICT, callers=()), SERVER, SIDECARS))
    for name in ("critical", "standard", "sheddable", "default"):
        [principal] = guards[name].policies[AUTHENTICATED_POLICY].principals
        assert principal.HasField("authenticated")
        assert not principal.authenticated.HasField("principal_name")


def test_no_valid_caller_means_nobody_gets_critical() -> None:
    guards = _guards(build(_world(callers=("not an entry",)), SERVER, SIDECARS))
    assert guards["critical"].action == rbac_config_pb2.RBAC.ALLOW
    assert not guards["critical"].policies


@pytest.mark.parametrize(
    ("entry", "exact", "prefix"),
    [
        ("a/b", "spiffe://td/ns/a/sa/b", ""),
        ("a/*", "", "spiffe://td/ns/a/sa/"),
        ("spiffe://other/ns/a/sa/b", "spiffe://td/ns/a/sa/b", ""),
        ("nonsense", None, None),
        ("spiffe://td/ns/a", None, None),
    ],
)
def test_caller_principal(entry: str, exact: str | None, prefix: str | None) -> None:
    principal = caller_principal(entry, "td")
    if exact is None:
        assert principal is None
        return
    assert principal is not None
    matcher = principal.authenticated.principal_name
    assert (matcher.exact, matcher.prefix) == (exact, prefix)


def test_the_pass_is_deterministic() -> None:
    first = build(_world(), SERVER, SIDECARS)
    second = build(_world(), SERVER, SIDECARS)
    for type_url in first:
        assert [m.SerializeToString(deterministic=True) for m in first[type_url]] == [
            m.SerializeToString(deterministic=True) for m in second[type_url]
        ]


def test_proxyless_clients_are_untouched() -> None:
    who = proxy(pod="client-0", proxyless=True)
    resources = build(_world(), who, SIDECARS)
    assert not _cluster(resources).transport_socket_matches
