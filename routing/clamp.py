"""The caller clamp: who may ask for ``critical``.

A Service that names its critical callers (``inferlane.io/critical-callers``) lets only
those identities get the ``critical`` class. Everyone else's own proxy lowers the class
to ``standard`` before the request leaves: the critical-header route goes to the standard
cluster and rewrites the header. That is the caller's side; the server's side does not
depend on it: each endpoint's inbound sidecar refuses ``critical`` from a caller not on
the list with 403 (:mod:`routing.secure`: an RBAC check of the caller's certificate, so it
needs mTLS).

Gateways are clamped like any other caller, by the gateway's own identity. A gateway
forwards requests from outside the mesh, whose class header nobody vouches for; and the
server's inbound check sees the gateway's identity anyway, so an unlisted gateway that
forwarded ``critical`` would only earn its clients a 403. To let a gateway's traffic be
critical, list the gateway's service account.
"""

from __future__ import annotations

from mesh.model import Priority, ServiceConfig
from mesh.proxy import Proxy

_SPIFFE = "spiffe://"


def entry_identity(entry: str) -> tuple[str, str] | None:
    """``(namespace, service_account)`` of one critical-callers entry; None if malformed.

    Accepts ``ns/sa``, ``ns/*`` (service account ``*``) and
    ``spiffe://TRUST_DOMAIN/ns/NS/sa/SA`` (any trust domain: it is matched on its
    namespace and service account).
    """
    entry = entry.strip()
    if entry.startswith(_SPIFFE):
        parts = entry[len(_SPIFFE) :].split("/")
        if len(parts) != 5 or not parts[0] or parts[1] != "ns" or parts[3] != "sa":
            return None
        namespace, account = parts[2], parts[4]
    else:
        namespace, slash, account = entry.partition("/")
        if not slash or "/" in account:
            return None
    if not namespace or not account:
        return None
    return namespace, account


def caller_matches(entry: str, namespace: str, service_account: str) -> bool:
    """Whether one critical-callers entry names the caller ``namespace/service_account``."""
    identity = entry_identity(entry)
    if identity is None:
        return False
    entry_ns, entry_sa = identity
    return entry_ns == namespace and entry_sa in ("*", service_account)


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
