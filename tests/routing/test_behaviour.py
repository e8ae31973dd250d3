"""Behaviour through the simulator: which cluster does each request reach?"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from mesh import xds
from mesh.model import Priority, ServiceConfig
from mesh.proxy import Proxy
from routing import simulate
from routing.simulate import Decision
from tests.routing.factories import (
    HOST,
    build,
    cluster_name,
    config,
    endpoint,
    gateway,
    llama_world,
    proxy,
    service,
    world,
)


def _route(
    resources: Any, authority: str = "llama:8000", port: int = 15001, **headers: str
) -> Decision:
    sent: Mapping[str, str] = {k.replace("_", "-"): v for k, v in headers.items()}
    decision = simulate.route(resources, port=port, authority=authority, headers=sent)
    assert isinstance(decision, Decision), decision
    return decision


@pytest.mark.parametrize(
    ("value", "served"),
    [
        ("critical", Priority.CRITICAL),
        ("CRITICAL", Priority.CRITICAL),
        ("Standard", Priority.STANDARD),
        ("sheddable", Priority.SHEDDABLE),
        ("sHeDdAbLe", Priority.SHEDDABLE),
        ("urgent", Priority.STANDARD),
        ("", Priority.STANDARD),
        ("critical-ish", Priority.STANDARD),
    ],
)
def test_class_header_picks_the_class_cluster(value: str, served: Priority) -> None:
    decision = _route(build(llama_world(), proxy(), {}), x_inference_priority=value)
    assert decision.cluster == cluster_name(served)
    assert decision.headers_added == {"x-inference-priority": served.value}


def test_missing_header_goes_to_the_services_default_class() -> None:
    assert _route(build(llama_world(), proxy(), {})).cluster == cluster_name(Priority.STANDARD)
    shed = llama_world(config(default=Priority.SHEDDABLE))
    decision = _route(build(shed, proxy(), {}))
    assert (decision.route, decision.cluster) == ("default", cluster_name(Priority.SHEDDABLE))


def test_class_route_settings() -> None:
    cfg = config(timeouts={Priority.CRITICAL: 30.0, Priority.SHEDDABLE: 120.5})
    resources = build(llama_world(cfg), proxy(), {})
    critical = _route(resources, x_inference_priority="critical")
    standard = _route(resources, x_inference_priority="standard")
    sheddable = _route(resources, x_inference_priority="sheddable")
    # The class timeout is an idle timeout, and the total timeout is off: a stream that
    # keeps producing tokens is never cut.
    assert [(d.timeout_s, d.idle_timeout_s) for d in (critical, standard, sheddable)] == [
        (0.0, 30.0),
        (0.0, 300.0),
        (0.0, 120.5),
    ]
    assert (critical.priority, critical.num_retries) == ("HIGH", 2)
    assert set(critical.retry_on.split(",")) == {
        "reset",
        "connect-failure",
        "refused-stream",
        "retriable-status-codes",
    }
    assert (standard.priority, standard.num_retries) == ("DEFAULT", 3)
    assert standard.retry_on == "connect-failure,refused-stream,retriable-headers"
    # Sheddable is retried only when a full endpoint refuses it, never on errors.
    assert (sheddable.priority, sheddable.num_retries) == ("DEFAULT", 3)
    assert sheddable.retry_on == "retriable-headers"
    refusal = ("x-inferlane-refused", "concurrency")
    assert standard.retriable_headers == sheddable.retriable_headers == (refusal,)


@pytest.mark.parametrize("priority", list(Priority))
def test_retries_avoid_the_hosts_already_tried(priority: Priority) -> None:
    resources = build(llama_world(), proxy(), {})
    (outbound,) = [r for r in resources[xds.ROUTE] if r.name == "outbound"]
    (route,) = [r for r in outbound.virtual_hosts[0].routes if r.name == priority.value]
    policy = route.route.retry_policy
    assert [p.name for p in policy.retry_host_predicate] == [
        "envoy.retry_host_predicates.previous_hosts"
    ]
    assert policy.host_selection_retry_max_attempts >= 3
    if priority is Priority.CRITICAL:  # any 503, a refusal included
        assert list(policy.retriable_status_codes) == [503]


CLAMPED = config(callers=["prod/api"])


@pytest.mark.parametrize(
    ("caller", "allowed"),
    [
        (proxy(namespace="dev", service_account="api"), False),
        (proxy(namespace="prod", service_account="web"), False),
        (proxy(namespace="prod", service_account="api"), True),
    ],
)
def test_clamp_for_ns_sa_entries(caller: Proxy, allowed: bool) -> None:
    decision = _route(
        build(llama_world(CLAMPED), caller, {}),
        authority="llama.default:8000",
        x_inference_priority="critical",
    )
    served = Priority.CRITICAL if allowed else Priority.STANDARD
    assert decision.cluster == cluster_name(served)
    assert decision.headers_added == {"x-inference-priority": served.value}
    assert decision.priority == ("HIGH" if allowed else "DEFAULT")


@pytest.mark.parametrize(
    "entry", ["prod/*", "spiffe://cluster.local/ns/prod/sa/api", "spiffe://corp/ns/prod/sa/api"]
)
def test_clamp_accepts_wildcard_and_spiffe_entries(entry: str) -> None:
    cfg = config(callers=[entry])
    listed = proxy(namespace="prod", service_account="api")
    unlisted = proxy(namespace="dev", service_account="api")
    for caller, served in ((listed, Priority.CRITICAL), (unlisted, Priority.STANDARD)):
        resources = build(llama_world(cfg), caller, {})
        decision = _route(resources, authority=f"{HOST}:8000", x_inference_priority="Critical")
        assert decision.cluster == cluster_name(served)


def test_clamp_also_covers_a_critical_default_class() -> None:
    cfg = config(default=Priority.CRITICAL, callers=["prod/api"])
    unlisted = _route(build(llama_world(cfg), proxy(namespace="dev"), {}), "llama.default")
    assert unlisted.cluster == cluster_name(Priority.STANDARD)
    assert unlisted.headers_added == {"x-inference-priority": "standard"}
    listed = proxy(namespace="prod", service_account="api")
    assert _route(build(llama_world(cfg), listed, {}), "llama.default").cluster == (
        cluster_name(Priority.CRITICAL)
    )


def test_clamp_leaves_lower_classes_alone() -> None:
    resources = build(llama_world(CLAMPED), proxy(namespace="dev"), {})
    decision = _route(resources, "llama.default", x_inference_priority="sheddable")
    assert decision.cluster == cluster_name(Priority.SHEDDABLE)


@pytest.mark.parametrize(
    "authority",
    [
        "llama",
        "llama:8000",
        "llama.default",
        "llama.default:8000",
        "llama.default.svc",
        "LLAMA.default.svc:8000",
        HOST,
        f"{HOST}:8000",
    ],
)
def test_every_service_name_form_routes(authority: str) -> None:
    decision = _route(build(llama_world(), proxy(), {}), authority)
    assert decision.cluster == cluster_name(Priority.STANDARD)


def test_short_name_only_in_the_callers_namespace() -> None:
    resources = build(llama_world(), proxy(namespace="other"), {})
    assert isinstance(simulate.route(resources, port=15001, authority="llama"), simulate.NoRoute)
    assert _route(resources, "llama.default").cluster == cluster_name(Priority.STANDARD)


def test_same_name_in_two_namespaces() -> None:
    two = world(service(namespace="default"), service(namespace="prod"))
    resources = build(two, proxy(namespace="prod"), {})
    prod_host = "llama.prod.svc.cluster.local"
    assert _route(resources, "llama").cluster == cluster_name(Priority.STANDARD, host=prod_host)
    assert _route(resources, "llama.default").cluster == cluster_name(Priority.STANDARD)


def test_multi_port_service() -> None:
    svc = service(ports=(8000, 8001))
    resources = build(world(svc), proxy(), {})
    assert _route(resources, "llama.default").cluster == cluster_name(Priority.STANDARD, 8000)
    assert _route(resources, "llama.default:8001").cluster == cluster_name(Priority.STANDARD, 8001)


def test_unknown_host_reaches_nothing() -> None:
    resources = build(llama_world(), proxy(), {})
    found = simulate.route(resources, port=15001, authority="mistral.default")
    assert isinstance(found, simulate.NoRoute)


def test_disabled_services_get_nothing() -> None:
    off = service(cfg=ServiceConfig(enabled=False))
    resources = build(world(off), proxy(), {})
    assert isinstance(simulate.route(resources, port=15001, authority="llama"), simulate.NoRoute)


def test_sidecar_listeners_use_the_proxy_ports_and_bind_address() -> None:
    me = proxy(outbound_port=16001, inbound_port=16006, bind_address="127.0.0.5")
    resources = build(llama_world(), me, {})
    addresses = {
        listener.name: (
            listener.address.socket_address.address,
            listener.address.socket_address.port_value,
        )
        for listener in resources[xds.LISTENER]
    }
    assert addresses == {
        "virtualOutbound": ("127.0.0.5", 16001),
        "virtualInbound": ("127.0.0.5", 16006),
    }
    assert _route(resources, port=16001).cluster == cluster_name(Priority.STANDARD)


def test_gateway_gets_every_virtual_host_on_its_port() -> None:
    two = world(
        service(endpoints=[endpoint("10.0.0.1", gpu=True, pod="g")]),
        service("mistral", "prod", ports=(9000,)),
    )
    resources = build(two, gateway(namespace="ingress", gateway_port=8443), {})
    assert [listener.name for listener in resources[xds.LISTENER]] == ["0.0.0.0_8443"]
    assert [r.name for r in resources[xds.ROUTE]] == ["http.8443"]
    assert _route(resources, "llama.default", port=8443).cluster == cluster_name(Priority.STANDARD)
    assert _route(resources, "mistral.prod:9000", port=8443).cluster == cluster_name(
        Priority.STANDARD, 9000, "mistral.prod.svc.cluster.local"
    )


def test_gateway_is_clamped_unless_listed() -> None:
    unlisted = build(llama_world(CLAMPED), gateway(namespace="ingress"), {})
    decision = _route(unlisted, "llama.default", 8080, x_inference_priority="critical")
    assert decision.cluster == cluster_name(Priority.STANDARD)
    cfg = config(callers=["ingress/gateway"])
    listed = build(llama_world(cfg), gateway(namespace="ingress"), {})
    decision = _route(listed, "llama.default", 8080, x_inference_priority="critical")
    assert decision.cluster == cluster_name(Priority.CRITICAL)


def test_inbound_forwards_to_the_pods_own_workload() -> None:
    me = proxy(pod="gpu-0", ip="10.0.0.1")
    resources = build(llama_world(), me, {})
    decision = _route(resources, "llama.default:8000", port=15006, x_inference_priority="critical")
    assert decision.cluster == "inbound|8000|critical|llama.default.svc.cluster.local"
    assert (decision.route, decision.priority) == ("critical", "HIGH")
    assert decision.headers_added == {}
    # The inbound side does not retry: the caller retries on another endpoint.
    assert decision.num_retries == 0
    assert (decision.timeout_s, decision.idle_timeout_s) == (0.0, 300.0)
    default = _route(resources, "llama", port=15006)
    assert (default.route, default.cluster) == (
        "default",
        "inbound|8000|standard|llama.default.svc.cluster.local",
    )


def test_inbound_is_empty_for_a_pod_that_serves_nothing() -> None:
    resources = build(llama_world(), proxy(pod="client-0", ip="10.0.0.1"), {})
    (inbound,) = [r for r in resources[xds.ROUTE] if r.name == "inbound"]
    assert not inbound.virtual_hosts
    assert isinstance(simulate.route(resources, port=15006, authority="llama"), simulate.NoRoute)


def test_inbound_matches_by_address_when_the_endpoint_names_no_pod() -> None:
    svc = service(endpoints=[endpoint("10.0.0.7", gpu=True)])
    resources = build(world(svc), proxy(pod="anything", ip="10.0.0.7"), {})
    assert _route(resources, "llama", port=15006).cluster == (
        "inbound|8000|standard|llama.default.svc.cluster.local"
    )


def test_inbound_listener_is_only_for_sidecars() -> None:
    for other in (gateway(), proxy(proxyless=True)):
        names = [listener.name for listener in build(llama_world(), other, {})[xds.LISTENER]]
        assert "virtualInbound" not in names
