"""Listeners: an HTTP connection manager fetching its routes by RDS over ADS.

A sidecar gets ``virtualOutbound`` (its workload's outgoing calls) and ``virtualInbound``
(calls into its workload); a gateway gets one listener on its gateway port. The builders
take extra HTTP filters (placed before the router) and, for the inbound listener, a
transport socket and filter chain match, so mTLS termination and rate-limit filters plug
in without touching this module. Outbound and gateway listeners log per-request stats
(:mod:`routing.telemetry`). Every one of them says why it refused a request
(:mod:`routing.refusals`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from mesh.proxy import Proxy
from routing import names, refusals, telemetry
from routing.protos import ads_config_source, pack

HCM_FILTER: Final = "envoy.filters.network.http_connection_manager"
ROUTER_FILTER: Final = "envoy.filters.http.router"


def router_filter() -> Any:
    return hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=pack(router_pb2.Router()))


def http_connection_manager(
    stat_prefix: str,
    route_config_name: str,
    *,
    http_filters: Sequence[Any] = (),
    optional_filters: bool = False,
    use_remote_address: bool = False,
    mark_refusals: bool = False,
) -> Any:
    """An HCM whose routes come by RDS over ADS; ``http_filters`` run before the router.

    ``optional_filters`` marks every filter but the router ``is_optional``, which a gRPC
    proxyless client needs for filters it does not implement. ``mark_refusals`` adds
    :func:`routing.refusals.local_reply_config`.
    """
    filters = []
    for given in http_filters:
        http_filter = hcm_pb2.HttpFilter()
        http_filter.CopyFrom(given)
        if optional_filters:
            http_filter.is_optional = True
        filters.append(http_filter)
    filters.append(router_filter())
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_config_source(), route_config_name=route_config_name),
        http_filters=filters,
    )
    if use_remote_address:
        manager.use_remote_address.value = True
    if mark_refusals:
        manager.local_reply_config.CopyFrom(refusals.local_reply_config())
    return manager


def hcm_network_filter(manager: Any) -> Any:
    return listener_components_pb2.Filter(name=HCM_FILTER, typed_config=pack(manager))


def socket_listener(
    name: str,
    bind_address: str,
    port: int,
    manager: Any,
    *,
    direction: int,
    transport_socket: Any | None = None,
    filter_chain_match: Any | None = None,
) -> Any:
    """A listener with one filter chain holding ``manager``."""
    chain = listener_components_pb2.FilterChain(filters=[hcm_network_filter(manager)])
    if transport_socket is not None:
        chain.transport_socket.CopyFrom(transport_socket)
    if filter_chain_match is not None:
        chain.filter_chain_match.CopyFrom(filter_chain_match)
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=bind_address, port_value=port)
        ),
        filter_chains=[chain],
        traffic_direction=direction,
    )


def outbound_listener(proxy: Proxy, *, http_filters: Sequence[Any] = ()) -> Any:
    """``virtualOutbound`` on the sidecar's outbound port, routes ``outbound``."""
    manager = http_connection_manager(
        f"outbound_{proxy.outbound_port}",
        names.OUTBOUND_ROUTE,
        http_filters=http_filters,
        mark_refusals=True,
    )
    manager.access_log.append(telemetry.request_stats_log())
    return socket_listener(
        names.OUTBOUND_LISTENER,
        proxy.bind_address,
        proxy.outbound_port,
        manager,
        direction=base_pb2.OUTBOUND,
    )


def inbound_listener(
    proxy: Proxy,
    *,
    http_filters: Sequence[Any] = (),
    transport_socket: Any | None = None,
    filter_chain_match: Any | None = None,
) -> Any:
    """``virtualInbound`` on the sidecar's inbound port, routes ``inbound``."""
    manager = http_connection_manager(
        f"inbound_{proxy.inbound_port}",
        names.INBOUND_ROUTE,
        http_filters=http_filters,
        mark_refusals=True,
    )
    return socket_listener(
        names.INBOUND_LISTENER,
        proxy.bind_address,
        proxy.inbound_port,
        manager,
        direction=base_pb2.INBOUND,
        transport_socket=transport_socket,
        filter_chain_match=filter_chain_match,
    )


def gateway_listener(proxy: Proxy, *, http_filters: Sequence[Any] = ()) -> Any:
    """The gateway's listener on its gateway port, routes ``http.PORT``.

    A gateway is the edge: ``use_remote_address`` makes Envoy treat its clients as
    external, so they cannot steer it with ``x-envoy-*`` request headers.
    """
    manager = http_connection_manager(
        f"gateway_{proxy.gateway_port}",
        names.gateway_route(proxy.gateway_port),
        http_filters=http_filters,
        use_remote_address=True,
        mark_refusals=True,
    )
    manager.access_log.append(telemetry.request_stats_log())
    return socket_listener(
        names.gateway_listener(proxy.bind_address, proxy.gateway_port),
        proxy.bind_address,
        proxy.gateway_port,
        manager,
        direction=base_pb2.OUTBOUND,
    )


def api_listener(name: str, manager: Any) -> Any:
    """A listener with no socket, for gRPC's proxyless client: it holds the HCM only."""
    return listener_pb2.Listener(
        name=name, api_listener=api_listener_pb2.ApiListener(api_listener=pack(manager))
    )
