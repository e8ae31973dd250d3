"""Workload identities: who a proxy is, in the mesh's SPIFFE trust domain.

One definition of an identity, ``(namespace, service account)``, the default trust domain,
and the rule that gives a proxy its identity: the proxy's pod in the world, never the node
metadata's claim.

A stream that authenticated carries its proof on the proxy: the identity it proved, the
pod a bound token names, and the IP it comes from. :func:`binding_problem` holds the node's
claims against that proof and against the pod in the world. It runs when the stream is
admitted and again in every generation (through :func:`workload_identity`), so a claim
the world contradicts later (a pod that appears after a stream claimed its name) loses the
identity then.
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


def binding_problem(world: World, proxy: Proxy) -> str | None:
    """Why the world or the stream's proof contradicts what an authenticated proxy claims;
    None when nothing does (and always for a stream that did not authenticate).

    The proof fixes the namespace and service account: the node ID's namespace and the
    metadata's ``SERVICE_ACCOUNT``, when given, must be those. A bound token names its pod,
    which must be the node ID's. The pod the node ID names, once the world knows it, must
    run as that service account at the node ID's IP; and a proof that names only a service
    account (a certificate, an unbound token) binds the stream to a pod by the address it
    comes from: the peer must be the pod's IP, so a pod cannot claim a sibling of its
    service account.
    """
    if not proxy.authenticated_identity:
        return None
    proved = proxy.authenticated_identity
    namespace, _, account = proved.partition("/")
    if proxy.namespace != namespace:
        return f"node ID claims namespace {proxy.namespace!r}, but the stream proved {proved}"
    if proxy.claimed_service_account not in ("", account):
        return (
            f"node metadata claims service account {proxy.claimed_service_account!r}, "
            f"but the stream proved {proved}"
        )
    if proxy.authenticated_pod and proxy.authenticated_pod != proxy.pod_name:
        return (
            f"node ID claims pod {proxy.pod_name!r}, but the token was issued for pod "
            f"{proxy.authenticated_pod!r}"
        )
    pod = world.workload(proxy.namespace, proxy.pod_name)
    if pod is None:
        return None  # not known yet: the proxy has no identity until it is (see below)
    where = f"pod {pod.namespace}/{pod.name}"
    if pod.service_account != account:
        return f"{where} runs as {pod.namespace}/{pod.service_account}, not {proved}"
    if pod.ip and pod.ip != proxy.ip:
        return f"node ID claims IP {proxy.ip}, but {where} has IP {pod.ip}"
    if pod.ip and not proxy.authenticated_pod and pod.ip != proxy.peer_ip:
        return (
            f"its proof names no pod, and the stream comes from "
            f"{proxy.peer_ip or 'an unknown address'}, not from {where} at {pod.ip}"
        )
    return None


def workload_identity(
    world: World, proxy: Proxy, trust_domain: str = DEFAULT_TRUST_DOMAIN
) -> Identity | None:
    """The identity whose certificate ``proxy`` gets, or None.

    The identity is that of the proxy's pod in the world, never the node metadata's claim.
    None when: the proxy is a proxyless gRPC client (it does not use SDS); its stream may
    not receive secrets (a plaintext peer outside the allowlist); its pod is not in the
    world; the stream authenticated as someone else or its claims contradict the pod
    (:func:`binding_problem`); or the names cannot form a SPIFFE ID.
    """
    if proxy.proxyless or not proxy.secrets_allowed:
        return None
    workload = world.workload(proxy.namespace, proxy.pod_name)
    if workload is None:
        return None
    identity = Identity(workload.namespace, workload.service_account)
    if proxy.authenticated_identity and (
        proxy.authenticated_identity != str(identity) or binding_problem(world, proxy)
    ):
        return None
    try:
        spiffe_id(trust_domain, *identity)
    except BadIdentity:
        return None
    return identity
