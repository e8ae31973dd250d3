"""The caller clamp: who may ask for ``critical``.

A Service that names its critical callers (``inferlane.io/critical-callers``) lets only
those identities get the ``critical`` class. Everyone else's own proxy lowers the class
to ``standard`` before the request leaves: the critical-header route goes to the standard
cluster and rewrites the header. (The server's inbound sidecar enforcing the same list
with a 403 needs mTLS and lives with that work.)

Gateways are clamped like any other caller, by the gateway's own identity. A gateway
forwards requests from outside the mesh, whose class header nobody vouches for; and the
server's inbound check sees the gateway's identity anyway, so an unlisted gateway that
forwarded ``critical`` would only earn its clients a 403. To let a gateway's traffic be
critical, list the gateway's service account.
"""

from __future__ import annotations

from mesh.annotations import caller_matches, entry_identity
from mesh.model import Priority, ServiceConfig
from mesh.proxy import Proxy

__all__ = ["caller_matches", "effective_class", "entry_identity", "may_request_critical"]


def may_request_critical(config: ServiceConfig, proxy: Proxy) -> bool:
    """True when the Service names no critical callers, or names this proxy's identity."""
    if not config.critical_callers:
        return True
    return any(
        caller_matches(entry, proxy.namespace, proxy.service_account)
        for entry in config.critical_callers
    )


def effective_class(requested: Priority, config: ServiceConfig, proxy: Proxy) -> Priority:
    """The class a request from ``proxy`` that asks for ``requested`` is served as."""
    if requested is Priority.CRITICAL and not may_request_critical(config, proxy):
        return Priority.STANDARD
    return requested
