from __future__ import annotations

from typing import Any

from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from mesh import xds
from mesh.model import Priority
from routing import proxyless as proxyless_mod
from routing import simulate
from tests.routing.factories import (
    HOST,
    build,
    cluster_name,
    config,
    llama_world,
    proxy,
    service,
    world,
)

TARGET = f"{HOST}:8000"


def _manager(listener: Any) -> Any:
    manager = hcm_pb2.HttpConnectionManager()
    listener.api_listener.api_listener.Unpack(manager)
    return manager


def test_one_api_listener_per_service_port_named_as_the_target() -> None:
    two = world(service(ports=(8000, 8001)), service("mistral", "prod", ports=(50051,)))
    resources = build(two, proxy(proxyless=True), {})
    names = [listener.name for listener in resources[xds.LISTENER]]
    assert names == [TARGET, f"{HOST}:8001", "mistral.prod.svc.cluster.local:50051"]
    for listener in resources[xds.LISTENER]:
        assert listener.HasField("api_listener")
        assert not listener.HasField("address")
        assert not listener.filter_chains
        manager = _manager(listener)
        assert manager.rds.route_config_name == listener.name
        assert manager.rds.config_source.HasField("ads")
        assert [f.name for f in manager.http_filters] == ["envoy.filters.http.router"]
    assert [r.name for r in resources[xds.ROUTE]] == names


def test_extra_filters_are_optional_and_the_router_is_last() -> None:
    extra = hcm_pb2.HttpFilter(name="envoy.filters.http.local_ratelimit")
    listener = proxyless_mod.target_listener(TARGET, http_filters=[extra])
    filters = _manager(listener).http_filters
    assert [(f.name, f.is_optional) for f in filters] == [
        ("envoy.filters.http.local_ratelimit", True),
        ("envoy.filters.http.router", False),
    ]
    assert not extra.is_optional


def test_the_virtual_host_matches_the_target_and_routes_by_class() -> None:
    resources = build(llama_world(), proxy(proxyless=True), {})
    (route_config,) = resources[xds.ROUTE]
    assert TARGET in route_config.virtual_hosts[0].domains
    for value, served in (("critical", Priority.CRITICAL), ("nope", Priority.STANDARD)):
        decision = simulate.route(
            resources, listener=TARGET, authority=TARGET, headers={"x-inference-priority": value}
        )
        assert isinstance(decision, simulate.Decision)
        assert decision.cluster == cluster_name(served)


def test_proxyless_routes_carry_a_stream_duration_and_the_grpc_retry_code() -> None:
    resources = build(
        llama_world(config(timeouts={Priority.CRITICAL: 20})), proxy(proxyless=True), {}
    )
    (route_config,) = resources[xds.ROUTE]
    critical = route_config.virtual_hosts[0].routes[0].route
    assert critical.max_stream_duration.max_stream_duration.seconds == 20
    assert "unavailable" in critical.retry_policy.retry_on.split(",")


def test_proxyless_clients_are_clamped_too() -> None:
    cfg = config(callers=["prod/api"])
    resources = build(llama_world(cfg), proxy(proxyless=True, namespace="dev"), {})
    decision = simulate.route(
        resources, listener=TARGET, authority=TARGET, headers={"x-inference-priority": "critical"}
    )
    assert isinstance(decision, simulate.Decision)
    assert decision.cluster == cluster_name(Priority.STANDARD)


def test_every_locality_has_a_non_zero_weight_and_clusters_exist() -> None:
    resources = build(llama_world(), proxy(proxyless=True), {})
    assert len(resources[xds.CLUSTER]) == 3
    for assignment in resources[xds.ENDPOINT]:
        assert assignment.endpoints
        assert all(loc.load_balancing_weight.value > 0 for loc in assignment.endpoints)
