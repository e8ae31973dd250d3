"""Who a stream is: the authorizer every ADS stream passes before it is served.

:class:`MeshAuthorizer`: every stream on the TLS port must authenticate, with a client
certificate from the mesh CA or a Kubernetes service-account token (audience
``inferlane``, checked with a TokenReview), and the node ID must claim that identity: its
namespace, and (once the pod is known) the pod's service account. Streams on the
plaintext port are served, but only peers in ``--plaintext-secrets-from`` get secrets.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence

import grpc

from mesh.model import World
from mesh.proxy import Proxy
from mtls.ca import CertificateAuthority, MtlsError, parse_spiffe_id
from mtls.identity import DEFAULT_TRUST_DOMAIN
from mtls.tokens import TokenIdentity, TokenReviewer, bearer_token
from xds_server.ads.server import Refusal, StreamAuthorizer
from xds_server.auth.settings import IpNetwork
from xds_server.auth.tls_front import TlsPeer, TlsPeers, parse_grpc_peer

log = logging.getLogger(__name__)


class MeshAuthorizer(StreamAuthorizer):
    """Authenticates TLS streams; keeps secrets from plaintext peers outside the allowlist."""

    def __init__(
        self,
        *,
        ca: CertificateAuthority,
        world: Callable[[], World | None],
        front: TlsPeers | None = None,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        plaintext_secrets_from: Sequence[IpNetwork] = (),
        tokens: TokenReviewer | None = None,
    ) -> None:
        self.ca = ca
        self.world = world
        self.front = front
        self.trust_domain = trust_domain
        self.plaintext_secrets_from = tuple(plaintext_secrets_from)
        self.tokens = tokens

    async def admit(self, proxy: Proxy, context: grpc.aio.ServicerContext) -> Proxy | Refusal:
        grpc_peer = context.peer()
        peer = self.front.peer(grpc_peer) if self.front is not None else None
        if peer is None:
            return self._plaintext(proxy, grpc_peer)
        who = await self._authenticate(peer, context.invocation_metadata())
        if isinstance(who, Refusal):
            return who
        return self._match(proxy, who)

    def _plaintext(self, proxy: Proxy, grpc_peer: str) -> Proxy:
        parsed = parse_grpc_peer(grpc_peer)
        if parsed is not None:
            address = ipaddress.ip_address(parsed[0])
            if any(address in network for network in self.plaintext_secrets_from):
                return proxy
        log.info(
            "plaintext stream from %s (%s) is outside --plaintext-secrets-from: no secrets",
            grpc_peer,
            proxy.node_id,
        )
        return dataclasses.replace(proxy, secrets_allowed=False)

    async def _authenticate(
        self, peer: TlsPeer, metadata: Iterable[tuple[str, str | bytes]] | None
    ) -> TokenIdentity | Refusal:
        if peer.certificate is not None:
            try:
                uri = self.ca.verify_client(peer.certificate, trust_domain=self.trust_domain)
            except MtlsError as exc:
                return Refusal(
                    f"client certificate refused: {exc}", grpc.StatusCode.UNAUTHENTICATED
                )
            parsed = parse_spiffe_id(uri)
            return TokenIdentity(parsed.namespace, parsed.service_account)
        token = bearer_token(metadata)
        if token is None:
            return Refusal(
                "the TLS xDS port needs a client certificate from the mesh CA or an "
                "'authorization: Bearer' service-account token",
                grpc.StatusCode.UNAUTHENTICATED,
            )
        if self.tokens is None:
            return Refusal(
                "service-account tokens are checked only when running against Kubernetes; "
                "present a client certificate",
                grpc.StatusCode.UNAUTHENTICATED,
            )
        reviewed = await self.tokens.review(token)
        if isinstance(reviewed, str):
            return Refusal(reviewed, grpc.StatusCode.UNAUTHENTICATED)
        return reviewed

    def _match(self, proxy: Proxy, who: TokenIdentity) -> Proxy | Refusal:
        identity = f"{who.namespace}/{who.service_account}"
        if proxy.namespace != who.namespace:
            return Refusal(
                f"node ID {proxy.node_id!r} claims namespace {proxy.namespace!r}, but the "
                f"stream authenticated as {identity}"
            )
        if who.pod_name and who.pod_name != proxy.pod_name:
            return Refusal(
                f"node ID {proxy.node_id!r} claims pod {proxy.pod_name!r}, but the token was "
                f"issued for pod {who.pod_name!r}"
            )
        world = self.world()
        workload = world.workload(proxy.namespace, proxy.pod_name) if world else None
        if workload is not None and workload.service_account != who.service_account:
            return Refusal(
                f"node ID {proxy.node_id!r} claims pod {proxy.namespace}/{proxy.pod_name}, "
                f"which runs as {workload.namespace}/{workload.service_account}, but the "
                f"stream authenticated as {identity}"
            )
        return dataclasses.replace(
            proxy,
            service_account=who.service_account,
            authenticated_identity=identity,
            secrets_allowed=True,
        )
