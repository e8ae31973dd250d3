from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import xds
from mesh.model import InferenceService, Priority, ServicePort
from routing import names
from routing.catalog import served_ports
from tests.routing.factories import config, service


def test_type_urls_are_the_envoy_v3_ones() -> None:
    assert xds.LISTENER == "type.googleapis.com/envoy.config.listener.v3.Listener"
    assert xds.ROUTE == "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
    assert xds.CLUSTER == "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    assert xds.ENDPOINT == "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (
            names.outbound_cluster(8000, Priority.CRITICAL, "llama.default.svc.cluster.local"),
            "outbound|8000|critical|llama.default.svc.cluster.local",
        ),
        (
            names.inbound_cluster(8000, "llama.default.svc.cluster.local", Priority.SHEDDABLE),
            "inbound|8000|sheddable|llama.default.svc.cluster.local",
        ),
        (names.gateway_listener("0.0.0.0", 8080), "0.0.0.0_8080"),
        (names.gateway_route(8080), "http.8080"),
        (names.proxyless_target("a.b.svc.cluster.local", 50051), "a.b.svc.cluster.local:50051"),
    ],
)
def test_names(built: str, expected: str) -> None:
    assert built == expected


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("outbound|8000|standard|h", names.ClusterName("outbound", 8000, "standard", "h")),
        ("inbound|8000||h", names.ClusterName("inbound", 8000, "", "h")),
        ("outbound|x|standard|h", None),
        ("sideways|8000|standard|h", None),
        ("outbound|8000|standard|", None),
        ("outbound|8000|standard", None),
        ("", None),
    ],
)
def test_parse_cluster_name(name: str, parsed: names.ClusterName | None) -> None:
    assert names.parse_cluster_name(name) == parsed


@given(
    port=st.integers(1, 65535),
    priority=st.sampled_from(list(Priority)),
    host=st.from_regex(r"[a-z][a-z0-9-]{0,20}\.[a-z]{1,10}\.svc\.cluster\.local", fullmatch=True),
)
def test_outbound_cluster_name_round_trips(port: int, priority: Priority, host: str) -> None:
    parsed = names.parse_cluster_name(names.outbound_cluster(port, priority, host))
    assert parsed is not None
    assert (parsed.port, parsed.priority, parsed.host) == (port, priority, host)


@given(st.text())
def test_parse_cluster_name_never_raises(text: str) -> None:
    names.parse_cluster_name(text)


def test_domains_in_own_namespace_include_the_short_name() -> None:
    svc = service()
    assert names.service_domains(svc, svc.ports[0], "default") == [
        "llama",
        "llama:8000",
        "llama.default",
        "llama.default:8000",
        "llama.default.svc",
        "llama.default.svc:8000",
        "llama.default.svc.cluster.local",
        "llama.default.svc.cluster.local:8000",
    ]


def test_domains_from_another_namespace_leave_out_the_short_name() -> None:
    svc = service()
    domains = names.service_domains(svc, svc.ports[0], "other")
    assert "llama" not in domains
    assert "llama:8000" not in domains
    assert "llama.default:8000" in domains


def test_only_the_first_port_gets_portless_domains() -> None:
    svc = service(ports=(8000, 8001))
    first = names.service_domains(svc, svc.ports[0], "default")
    second = names.service_domains(svc, svc.ports[1], "default")
    assert "llama.default" in first
    assert second == [
        "llama:8001",
        "llama.default:8001",
        "llama.default.svc:8001",
        "llama.default.svc.cluster.local:8001",
    ]
    assert not set(first) & set(second)


def test_portless_domains_go_to_the_first_tcp_port() -> None:
    svc = InferenceService(
        "default", "llama", (ServicePort(53, protocol="UDP"), ServicePort(8000)), config()
    )
    assert "llama.default" in names.service_domains(svc, svc.ports[1], "default")


def test_duplicate_port_numbers_are_served_once() -> None:
    svc = InferenceService("default", "llama", (ServicePort(80), ServicePort(80)), config())
    assert served_ports(svc) == (ServicePort(80),)
