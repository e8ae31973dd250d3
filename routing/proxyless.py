"""Resources for gRPC's proxyless xDS client (``xds:///NAME.NS.svc.cluster.local:PORT``).

gRPC has no sockets to configure: for each target it asks for a Listener named exactly
like the target, holding an HTTP connection manager in ``api_listener``. Envoy rejects
api_listeners over LDS, so only proxyless proxies get these. What gRPC requires (checked
against grpcio's client):

* the router filter present, and every other HTTP filter marked ``is_optional``;
* virtual-host domains that match the target (the route configuration is named like the
  target too, and its one virtual host lists ``HOST:PORT`` among its domains);
* a non-zero ``load_balancing_weight`` on every locality (endpoints.py sets 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mesh.model import InferenceService, ServicePort
from mesh.proxy import Proxy
from routing import listeners, names, routes
from routing.catalog import served_ports


def target_listener(target: str, *, http_filters: Sequence[Any] = ()) -> Any:
    """The api_listener for ``target``; its routes come by RDS under the same name."""
    manager = listeners.http_connection_manager(
        target, target, http_filters=http_filters, optional_filters=True
    )
    return listeners.api_listener(target, manager)


def target_routes(svc: InferenceService, port: ServicePort, proxy: Proxy) -> Any:
    """The route configuration of one target: a single virtual host, clamped for ``proxy``."""
    target = names.proxyless_target(svc.hostname, port.port)
    vhost = routes.virtual_host(
        svc, port, proxy.namespace, routes.outbound_routes(svc, port, proxy, proxyless=True)
    )
    return routes.route_configuration(target, [vhost])


def service_resources(
    svc: InferenceService, proxy: Proxy, *, http_filters: Sequence[Any] = ()
) -> tuple[list[Any], list[Any]]:
    """(listeners, route configurations) of one target per served port of ``svc``."""
    listener_list: list[Any] = []
    route_list: list[Any] = []
    for port in served_ports(svc):
        target = names.proxyless_target(svc.hostname, port.port)
        listener_list.append(target_listener(target, http_filters=http_filters))
        route_list.append(target_routes(svc, port, proxy))
    return listener_list, route_list
