"""A hand-written generator for xDS-core tests: one listener, one route, EDS clusters.

The xDS core must not depend on the routing translators, so its tests describe the
config they want directly and change it between pushes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, duration_pb2

from mesh import xds
from mesh.proxy import Proxy
from xds_server.ads.cache import ConfigCache
from xds_server.ads.server import ServerSettings, XdsServer

LISTENER_NAME = "test-listener"
ROUTE_NAME = "test-routes"


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _millis(ms: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(ms)
    return d


def _any(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


@dataclass(frozen=True)
class StaticConfig:
    """Route everything to ``route_cluster``; ``clusters`` maps names to (host, port)s."""

    clusters: Mapping[str, Sequence[tuple[str, int]]]
    route_cluster: str
    listener_port: int = 0
    connect_timeout_ms: int = 1000
    #: Extra response header the route adds, to tell route versions apart.
    route_tag: str = "v1"
    #: A listener field Envoy rejects when true (a NACK test).
    broken_listener: bool = False
    max_requests: int = 1024
    extra_clusters: tuple[str, ...] = field(default=())

    def with_(self, **changes: Any) -> StaticConfig:
        return replace(self, **changes)


def listener(cfg: StaticConfig) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="test",
        rds=hcm_pb2.Rds(route_config_name=ROUTE_NAME, config_source=_ads()),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
            )
        ],
    )
    address = "127.0.0.1" if not cfg.broken_listener else "not-an-ip"
    return listener_pb2.Listener(
        name=LISTENER_NAME,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=address, port_value=cfg.listener_port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_any(hcm),
                    )
                ]
            )
        ],
    )


def route(cfg: StaticConfig) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=ROUTE_NAME,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="all",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(cluster=cfg.route_cluster),
                    )
                ],
                response_headers_to_add=[
                    _header("x-route-tag", cfg.route_tag),
                ],
            )
        ],
    )


def _header(key: str, value: str) -> Any:
    from envoy.config.core.v3 import base_pb2

    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value))


def cluster(cfg: StaticConfig, name: str) -> cluster_pb2.Cluster:
    from envoy.config.cluster.v3 import circuit_breaker_pb2
    from google.protobuf import wrappers_pb2

    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=_millis(cfg.connect_timeout_ms),
        circuit_breakers=circuit_breaker_pb2.CircuitBreakers(
            thresholds=[
                circuit_breaker_pb2.CircuitBreakers.Thresholds(
                    max_requests=wrappers_pb2.UInt32Value(value=cfg.max_requests)
                )
            ]
        ),
    )


def assignment(name: str, hosts: Sequence[tuple[str, int]]) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(
                                socket_address=address_pb2.SocketAddress(address=h, port_value=p)
                            )
                        )
                    )
                    for h, p in hosts
                ]
            )
        ],
    )


class StaticGenerator:
    """Every proxy gets the same config."""

    def __init__(self, cfg: StaticConfig) -> None:
        self.cfg = cfg

    def key(self, proxy: Proxy) -> Hashable:
        return None

    def generate(self, proxy: Proxy) -> Mapping[str, Sequence[Any]]:
        cfg = self.cfg
        return {
            xds.LISTENER: [listener(cfg)],
            xds.ROUTE: [route(cfg)],
            xds.CLUSTER: [cluster(cfg, n) for n in sorted(cfg.clusters)],
            xds.ENDPOINT: [assignment(n, hosts) for n, hosts in sorted(cfg.clusters.items())],
        }


@contextlib.asynccontextmanager
async def serving(
    cache: ConfigCache, settings: ServerSettings | None = None
) -> AsyncIterator[tuple[XdsServer, int]]:
    """An in-process ADS server on an ephemeral loopback port."""
    server = grpc.aio.server()
    xds = XdsServer(cache, settings=settings)
    xds.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield xds, port
    finally:
        await server.stop(None)
