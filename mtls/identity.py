"""Workload identities: who a proxy is, in the mesh's SPIFFE trust domain.

One definition of an identity, ``(namespace, service account)``, the default trust domain,
and the rule that gives a proxy its identity: the proxy's pod in the world, never the node
metadata's claim.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from mesh.model import World
from mesh.proxy import Proxy
from mtls.ca import BadIdentity, spiffe_id

#: The SPIFFE trust domain when none is configured (``--trust-domain``), as Istio's.
DEFAULT_TRUST_DOMAIN: Final = "cluster.local"


class Identity(NamedTuple):
    """A workload identity: ``spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT``."""

    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service_account}"


def workload_identity(
    world: World, proxy: Proxy, trust_domain: str = DEFAULT_TRUST_DOMAIN
) -> Identity | None:
    """The identity whose certificate ``proxy`` gets, or None.

    The identity is that of the proxy's pod in the world, never the node metadata's claim.
    None when: the proxy is a proxyless gRPC client (it does not use SDS); its stream may
    not receive secrets (a plaintext peer outside the allowlist); its pod is not in the
    world; the stream authenticated as someone else; or the names cannot form a SPIFFE ID.
    """
    if proxy.proxyless or not proxy.secrets_allowed:
        return None
    workload = world.workload(proxy.namespace, proxy.pod_name)
    if workload is None:
        return None
    identity = Identity(workload.namespace, workload.service_account)
    if proxy.authenticated_identity and proxy.authenticated_identity != str(identity):
        return None
    try:
        spiffe_id(trust_domain, *identity)
    except BadIdentity:
        return None
    return identity
