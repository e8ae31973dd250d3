"""Who a stream is: the authorizer every ADS stream passes before it is served.

:class:`MeshAuthorizer` reads each stream's transport
(:func:`~xds_server.auth.transport.stream_peer`):

- **mutual TLS** (15011): gRPC verified a client certificate from the mesh CA; its SPIFFE
  ID (in our trust domain) is the identity;
- **TLS** (15012): the stream must carry a Kubernetes service-account token (audience
  ``inferlane``, checked with a TokenReview); a bound token also names its pod;
- **plaintext** (15010): nothing is proved. Only peers in ``--plaintext-secrets-from`` get
  secrets; where the world knows the one pod at the peer's IP, the node must claim that
  pod's namespace and service account, and is served as that account.

On the authenticated ports the identity comes from the proof and the pod in the world,
never from the metadata: :func:`mtls.identity.binding_problem` refuses a node whose claims
contradict them (another namespace or service account, another pod than a bound token's,
a pod at another IP than the stream's when a certificate proves only the service account).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from mesh.model import World
from mesh.proxy import Proxy
from mtls.ca import CertificateAuthority, MtlsError, parse_spiffe_id
from mtls.identity import DEFAULT_TRUST_DOMAIN, binding_problem
from mtls.tokens import TokenIdentity, TokenReviewer, bearer_token
from xds_server.ads.server import Refusal, StreamAuthorizer
from xds_server.auth.settings import IpNetwork
from xds_server.auth.transport import Peer, Transport, stream_peer

log = logging.getLogger(__name__)


class MeshAuthorizer(StreamAuthorizer):
    """Authenticates TLS streams against the world; narrows plaintext ones."""

    def __init__(
        self,
        *,
        ca: CertificateAuthority,
        world: Callable[[], World | None],
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        plaintext_secrets_from: Sequence[IpNetwork] = (),
        tokens: TokenReviewer | None = None,
    ) -> None:
        self.ca = ca
        self.world = world
        self.trust_domain = trust_domain
        self.plaintext_secrets_from = tuple(plaintext_secrets_from)
        self.tokens = tokens

    async def admit(self, proxy: Proxy, context: grpc.aio.ServicerContext) -> Proxy | Refusal:
        peer = stream_peer(context)
        if peer.transport is Transport.PLAINTEXT:
            return self._plaintext(proxy, peer)
        who = await self._authenticate(peer, context)
        if isinstance(who, Refusal):
            return who
        bound = dataclasses.replace(
            proxy,
            service_account=who.service_account,
            authenticated_identity=f"{who.namespace}/{who.service_account}",
            authenticated_pod=who.pod_name,
            peer_ip=peer.address,
            secrets_allowed=True,
        )
        world = self.world()
        problem = binding_problem(world if world is not None else World(), bound)
        if problem is not None:
            return Refusal(f"node ID {proxy.node_id!r}: {problem}")
        return bound

    def _plaintext(self, proxy: Proxy, peer: Peer) -> Proxy | Refusal:
        narrowed = dataclasses.replace(proxy, peer_ip=peer.address)
        world = self.world()
        pods = world.workloads_at(peer.address) if world is not None and peer.address else ()
        if len(pods) == 1:
            (pod,) = pods
            if (proxy.namespace, proxy.claimed_service_account or pod.service_account) != (
                pod.namespace,
                pod.service_account,
            ):
                claimed = f"{proxy.namespace}/{proxy.claimed_service_account or '(default)'}"
                return Refusal(
                    f"node ID {proxy.node_id!r} claims {claimed}, but the stream comes from "
                    f"{peer.address}, pod {pod.namespace}/{pod.name}, which runs as "
                    f"{pod.namespace}/{pod.service_account}"
                )
            narrowed = dataclasses.replace(narrowed, service_account=pod.service_account)
        if peer.address and any(
            ipaddress.ip_address(peer.address) in network for network in self.plaintext_secrets_from
        ):
            return narrowed
        log.info(
            "plaintext stream from %s (%s) is outside --plaintext-secrets-from: no secrets",
            peer.address or "a non-IP peer",
            proxy.node_id,
        )
        return dataclasses.replace(narrowed, secrets_allowed=False)

    async def _authenticate(self, peer: Peer, context: Any) -> TokenIdentity | Refusal:
        if peer.certificate is not None:
            try:
                uri = self.ca.verify_client(peer.certificate, trust_domain=self.trust_domain)
            except MtlsError as exc:
                return Refusal(
                    f"client certificate refused: {exc}", grpc.StatusCode.UNAUTHENTICATED
                )
            parsed = parse_spiffe_id(uri)
            return TokenIdentity(parsed.namespace, parsed.service_account)
        token = bearer_token(context.invocation_metadata())
        if token is None:
            return Refusal(
                "the TLS xDS port authenticates with an 'authorization: Bearer' "
                "service-account token; client certificates go to the mutual-TLS port",
                grpc.StatusCode.UNAUTHENTICATED,
            )
        if self.tokens is None:
            return Refusal(
                "service-account tokens are checked only when running against Kubernetes; "
                "present a client certificate on the mutual-TLS port",
                grpc.StatusCode.UNAUTHENTICATED,
            )
        reviewed = await self.tokens.review(token)
        if isinstance(reviewed, str):
            return Refusal(reviewed, grpc.StatusCode.UNAUTHENTICATED)
        return reviewed
