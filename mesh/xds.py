"""The xDS vocabulary every layer shares: the resource types inferlane serves, their short
names, and how a resource is named."""

from __future__ import annotations

from typing import Any, Final

from envoy.config.endpoint.v3 import endpoint_pb2

_PREFIX = "type.googleapis.com/"

LISTENER: Final = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE: Final = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER: Final = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET: Final = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

#: Make-before-break: what a resource refers to goes out before it. Secrets before the
#: clusters and listeners whose TLS contexts name them, clusters and their endpoints before
#: the listeners and routes that send traffic to them. Removals wait for the later types
#: (see ``stream.py``), which gives the reverse order on the way out.
PUSH_ORDER: Final[tuple[str, ...]] = (SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE)

#: Types for which an empty first request means "everything" (the legacy wildcard).
WILDCARD_TYPES: Final = frozenset({LISTENER, CLUSTER})
#: The types whose State-of-the-World responses must carry every resource: a client
#: deletes what a response of these leaves out, and keeps it for the other types (the
#: xDS protocol, "Grouping Resources into Responses").
FULL_STATE_TYPES: Final = frozenset({LISTENER, CLUSTER})

SHORT_NAMES: Final = {
    LISTENER: "LDS",
    ROUTE: "RDS",
    CLUSTER: "CDS",
    ENDPOINT: "EDS",
    SECRET: "SDS",
}


def short(type_url: str) -> str:
    """``LDS``, ``CDS``... for logs and metric labels; the type URL itself when unknown."""
    return SHORT_NAMES.get(type_url, type_url)


def resource_name(message: Any) -> str:
    """The xDS name of a resource (a ClusterLoadAssignment's is its cluster's)."""
    if isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return str(message.cluster_name)
    return str(message.name)
