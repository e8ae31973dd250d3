"""The simulator itself, on hand-written configs."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import regex_pb2, string_pb2

from mesh import xds
from routing import listeners, simulate
from routing.simulate import Decision, NoRoute


def _to(cluster: str, name: str, **match: Any) -> Any:
    headers = match.pop("headers", [])
    return rc.Route(
        name=name,
        match=rc.RouteMatch(headers=headers, **match),
        route=rc.RouteAction(cluster=cluster),
    )


def _resources(*vhosts: Any) -> dict[str, list[Any]]:
    """One listener on port 80 with the route configuration inline."""
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="t",
        route_config=route_pb2.RouteConfiguration(name="inline", virtual_hosts=vhosts),
    )
    listener = listeners.socket_listener("l", "0.0.0.0", 80, manager, direction=0)
    return {xds.LISTENER: [listener]}


def _cluster_of(resources: Any, authority: str, path: str = "/", **headers: str) -> str:
    decision = simulate.route(resources, port=80, authority=authority, path=path, headers=headers)
    return decision.cluster if isinstance(decision, Decision) else "NONE"


def test_virtual_host_precedence() -> None:
    resources = _resources(
        rc.VirtualHost(name="any", domains=["*"], routes=[_to("any", "r", prefix="/")]),
        rc.VirtualHost(name="pre", domains=["api.*"], routes=[_to("pre", "r", prefix="/")]),
        rc.VirtualHost(name="suf", domains=["*.example.com"], routes=[_to("suf", "r", prefix="/")]),
        rc.VirtualHost(
            name="longsuf", domains=["*.eu.example.com"], routes=[_to("longsuf", "r", prefix="/")]
        ),
        rc.VirtualHost(
            name="exact", domains=["api.example.com"], routes=[_to("exact", "r", prefix="/")]
        ),
    )
    assert _cluster_of(resources, "API.example.com") == "exact"
    assert _cluster_of(resources, "x.eu.example.com") == "longsuf"
    assert _cluster_of(resources, "api.eu.example.com") == "longsuf"
    assert _cluster_of(resources, "www.example.com") == "suf"
    assert _cluster_of(resources, "api.internal") == "pre"
    assert _cluster_of(resources, "elsewhere") == "any"


def _header_host(*matchers: Any) -> Any:
    return rc.VirtualHost(
        name="h",
        domains=["*"],
        routes=[_to("hit", "r", prefix="/", headers=list(matchers)), _to("miss", "d", prefix="/")],
    )


@pytest.mark.parametrize(
    ("matcher", "headers", "hit"),
    [
        (rc.HeaderMatcher(name="x", present_match=True), {"X": "1"}, True),
        (rc.HeaderMatcher(name="x", present_match=True), {}, False),
        (rc.HeaderMatcher(name="x", present_match=False), {}, True),
        (rc.HeaderMatcher(name="x", exact_match="a"), {"x": "a"}, True),
        (rc.HeaderMatcher(name="x", exact_match="a"), {"x": "A"}, False),
        (rc.HeaderMatcher(name="x", prefix_match="ab"), {"x": "abc"}, True),
        (rc.HeaderMatcher(name="x", suffix_match="bc"), {"x": "abc"}, True),
        (rc.HeaderMatcher(name="x", contains_match="b"), {"x": "abc"}, True),
        (rc.HeaderMatcher(name="x", exact_match="a", invert_match=True), {"x": "b"}, True),
        (
            rc.HeaderMatcher(
                name="x", string_match=string_pb2.StringMatcher(exact="abc", ignore_case=True)
            ),
            {"x": "ABC"},
            True,
        ),
        (
            rc.HeaderMatcher(name="x", string_match=string_pb2.StringMatcher(exact="abc")),
            {"x": "ABC"},
            False,
        ),
        (
            rc.HeaderMatcher(
                name="x", string_match=string_pb2.StringMatcher(prefix="A", ignore_case=True)
            ),
            {"x": "abc"},
            True,
        ),
        (
            rc.HeaderMatcher(
                name="x",
                string_match=string_pb2.StringMatcher(
                    safe_regex=regex_pb2.RegexMatcher(regex="a.c")
                ),
            ),
            {"x": "abc"},
            True,
        ),
        (rc.HeaderMatcher(name="x"), {"x": ""}, True),
        (rc.HeaderMatcher(name="x"), {}, False),
    ],
)
def test_header_matchers(matcher: Any, headers: dict[str, str], hit: bool) -> None:
    resources = _resources(_header_host(matcher))
    assert _cluster_of(resources, "h", **headers) == ("hit" if hit else "miss")


def test_path_matching_and_no_match() -> None:
    resources = _resources(
        rc.VirtualHost(
            name="v",
            domains=["*"],
            routes=[_to("exact", "e", path="/v1/models"), _to("chat", "p", prefix="/v1/chat")],
        )
    )
    assert _cluster_of(resources, "h", "/v1/models") == "exact"
    assert _cluster_of(resources, "h", "/v1/chat/completions") == "chat"
    found = simulate.route(resources, port=80, authority="h", path="/health")
    assert isinstance(found, NoRoute)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"port": 81}, "no listener on port 81"),
        ({"listener": "nope"}, "no listener 'nope'"),
        ({}, "give exactly one of port and listener"),
        ({"port": 80, "listener": "l"}, "give exactly one of port and listener"),
    ],
)
def test_bad_lookups_are_values_not_exceptions(kwargs: dict[str, Any], reason: str) -> None:
    assert simulate.route(_resources(), authority="h", **kwargs) == NoRoute(reason)


def test_unmodelled_matches_are_reported() -> None:
    regex = rc.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex="/.*"))
    vhost = rc.VirtualHost(
        name="v",
        domains=["*"],
        routes=[rc.Route(name="re", match=regex, route=rc.RouteAction(cluster="c"))],
    )
    found = simulate.route(_resources(vhost), port=80, authority="h")
    assert isinstance(found, NoRoute)
    assert "does not model" in found.reason


def test_missing_rds_is_reported() -> None:
    manager = listeners.http_connection_manager("t", "absent")
    resources = {xds.LISTENER: [listeners.socket_listener("l", "::", 80, manager, direction=0)]}
    assert simulate.route(resources, port=80, authority="h") == NoRoute(
        "no route configuration 'absent'"
    )


def _static_cluster(*priorities: int) -> Any:
    localities = [
        endpoint_components_pb2.LocalityLbEndpoints(
            priority=p,
            lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(
                    endpoint=endpoint_components_pb2.Endpoint(
                        address=address_pb2.Address(
                            socket_address=address_pb2.SocketAddress(
                                address=f"10.0.{p}.{i}", port_value=80
                            )
                        )
                    )
                )
                for i in range(1, 3)
            ],
        )
        for p in priorities
    ]
    return cluster_pb2.Cluster(
        name="s",
        type=cluster_pb2.Cluster.STATIC,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name="s", endpoints=localities),
    )


def test_static_cluster_endpoints_and_default_factor_loads() -> None:
    resources = {xds.CLUSTER: [_static_cluster(0, 1)]}
    found = simulate.cluster_endpoints(resources, "s")
    assert not isinstance(found, NoRoute)
    assert [(e.address, e.priority) for e in found] == [
        ("10.0.0.1", 0),
        ("10.0.0.2", 0),
        ("10.0.1.1", 1),
        ("10.0.1.2", 1),
    ]
    assert simulate.priority_loads(resources, "s") == (100, 0)
    assert simulate.priority_loads(resources, "s", frozenset({("10.0.0.1", 80)})) == (70, 30)
    everything = frozenset((e.address, e.port) for e in found)
    assert simulate.priority_loads(resources, "s", everything) == (100, 0)


def test_unknown_cluster() -> None:
    assert simulate.cluster_endpoints({}, "nope") == NoRoute("no endpoints for cluster 'nope'")
    assert isinstance(simulate.priority_loads({}, "nope"), NoRoute)
