"""Mesh security at run time: the CA, workload secrets and their renewal, authenticated xDS.

* :func:`load_ca`: the CA from ``--ca-secret`` (one Secret shared by every replica), from
  ``--ca-dir`` (created there on first start, kept across restarts), or, with neither, one
  that lives only as long as the process.
* :class:`SecretStore`: the ``default`` and ``ROOTCA`` secrets per workload identity, one
  certificate per identity, renewed at half life with jitter. A renewal calls
  ``on_change``, which installs a new generation: only the secrets differ, so the proxies
  of other identities are sent nothing.
* :class:`TlsFront`: the TLS xDS port. Python's gRPC server cannot ask for a client
  certificate without requiring one (its only switch is ``require_client_auth``), and a
  client may authenticate with a token instead. So TLS is terminated here, asking for an
  optional client certificate verified against the mesh roots, and the bytes are relayed
  to the gRPC server's loopback port. The relay connection's local port names the TLS
  peer, which is how :class:`MeshAuthorizer` finds a stream's certificate.
* :class:`MeshAuthorizer`: every stream on the TLS port must authenticate, with a client
  certificate from the mesh CA or a Kubernetes service-account token (audience
  ``inferlane``, checked with a TokenReview), and the node ID must claim that identity:
  its namespace, and (once the pod is known) the pod's service account. Streams on the
  plaintext port are served, but only peers in ``--plaintext-secrets-from`` get secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import random
import ssl
import tempfile
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
import grpc
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from kubernetes.aio.client import ApiException, V1TokenReview, V1TokenReviewSpec

from mesh.model import World
from mesh.proxy import Proxy
from mtls.ca import (
    DEFAULT_WORKLOAD_TTL,
    CaLoadError,
    CertificateAuthority,
    MtlsError,
    parse_spiffe_id,
    utcnow,
)
from mtls.rotation import WorkloadCertificates
from mtls.sds import secrets_for
from mtls.store import SecretsApi, load_or_create_shared_ca
from routing.security import DEFAULT_TRUST_DOMAIN
from xds_server.server import Refusal, StreamAuthorizer

log = logging.getLogger(__name__)

Identity = tuple[str, str]
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The audience a service-account token must be issued for.
TOKEN_AUDIENCE: Final = "inferlane"
#: Peers that get secrets on the plaintext port unless told otherwise: this host only.
DEFAULT_PLAINTEXT_SECRETS_FROM: Final = ("127.0.0.1/32", "::1/128")
#: Names the TLS port's certificate carries. Bootstraps verify ``inferlane`` (the SNI and
#: SAN ``inferlane bootstrap`` uses), whatever address they connect to.
DEFAULT_SERVER_NAMES: Final = ("inferlane", "localhost", "127.0.0.1", "::1")
#: Where a Pod finds its own namespace (for a ``--ca-secret`` given without one).
SERVICE_ACCOUNT_NAMESPACE_FILE: Final = Path(
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
)
_SA_PREFIX: Final = "system:serviceaccount:"
_POD_NAME_EXTRA: Final = "authentication.kubernetes.io/pod-name"


@dataclass(frozen=True)
class SecuritySettings:
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    #: Directory holding the CA (tls.crt, tls.key, ca.crt); created there if absent.
    ca_dir: Path | None = None
    #: ``[NAMESPACE/]NAME`` of a Secret holding the CA, shared by every replica.
    ca_secret: str | None = None
    #: Workload certificate lifetime (SPEC: 24 h), renewed at half of it.
    cert_ttl: timedelta = DEFAULT_WORKLOAD_TTL
    #: Networks whose plaintext-port streams get secrets; everyone else gets none.
    plaintext_secrets_from: tuple[IpNetwork, ...] = tuple(
        ipaddress.ip_network(n) for n in DEFAULT_PLAINTEXT_SECRETS_FROM
    )
    #: DNS names and IPs of the TLS port's certificate.
    server_names: tuple[str, ...] = DEFAULT_SERVER_NAMES
    token_audience: str = TOKEN_AUDIENCE

    @property
    def connection_lifetime_s(self) -> float:
        """How long a mesh connection may live: at most an hour, and at most a quarter of
        a certificate's life, so renewed certificates reach every connection well before
        the old ones expire."""
        return min(3600.0, self.cert_ttl.total_seconds() / 4)


# --------------------------------------------------------------------------- parsing


def parse_networks(text: str) -> tuple[IpNetwork, ...] | str:
    """Comma-separated CIDRs (or bare addresses); the networks, or what is wrong."""
    found: list[IpNetwork] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            found.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            return f"{part!r} is not an IP network (e.g. 10.0.0.0/8 or ::1/128)"
    return tuple(found)


def parse_grpc_peer(peer: str) -> tuple[str, int] | None:
    """``ipv4:1.2.3.4:5`` or ``ipv6:[::1]:5`` -> (address, port); None for anything else.

    An IPv4 address mapped into IPv6 (a dual-stack socket) comes back as IPv4.
    """
    family, _, rest = peer.partition(":")
    if family not in ("ipv4", "ipv6"):
        return None
    host, sep, port_s = rest.rpartition(":")
    if not sep or not port_s.isdigit():
        return None
    host = host.replace("%5B", "[").replace("%5D", "]")
    if family == "ipv6":
        if not (host.startswith("[") and host.endswith("]")):
            return None
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    port = int(port_s)
    if port > 65535:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), port


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer TOKEN`` header, if there is one."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def parse_secret_ref(text: str, default_namespace: str) -> tuple[str, str] | str:
    """``[NAMESPACE/]NAME`` -> (namespace, name), or what is wrong."""
    namespace, slash, name = text.strip().rpartition("/")
    if not slash:
        namespace = default_namespace
    if not name or not namespace or "/" in namespace:
        return f"{text!r} is not NAME or NAMESPACE/NAME"
    return namespace, name


def own_namespace() -> str:
    """The namespace this process runs in: ``POD_NAMESPACE``, the service-account
    namespace file, or ``default``."""
    from_env = os.environ.get("POD_NAMESPACE", "").strip()
    if from_env:
        return from_env
    try:
        return SERVICE_ACCOUNT_NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


# --------------------------------------------------------------------------- the CA


async def load_ca(
    settings: SecuritySettings, secrets_api: SecretsApi | None = None
) -> CertificateAuthority:
    """The mesh CA: from ``--ca-secret``, else ``--ca-dir``, else a new in-memory one.

    Raises :class:`mtls.ca.MtlsError` (a CA that cannot be loaded or stored) with a
    message naming the input.
    """
    if settings.ca_secret:
        ref = parse_secret_ref(settings.ca_secret, own_namespace())
        if isinstance(ref, str):
            raise CaLoadError(f"--ca-secret: {ref}")
        if secrets_api is None:
            raise CaLoadError("--ca-secret needs the Kubernetes API")
        return await load_or_create_shared_ca(secrets_api, *ref)
    if settings.ca_dir is not None:
        return await asyncio.to_thread(CertificateAuthority.load_or_create, settings.ca_dir)
    log.warning(
        "no --ca-dir or --ca-secret: the mesh CA lives only as long as this process, and "
        "proxies must be given the new root after a restart"
    )
    return CertificateAuthority.generate()


# --------------------------------------------------------------------------- secrets


@dataclass(frozen=True)
class SecretBundle:
    """One identity's SDS secrets, built once per certificate."""

    identity: Identity
    serial: int
    not_after: datetime
    secrets: tuple[secret_pb2.Secret, ...]


class SecretStore:
    """The workload secrets served to proxies, and their renewal.

    A certificate is issued the first time a generation asks for an identity
    (:meth:`bundle`) and renewed only by :meth:`run`, so every proxy of one generation
    sees the same certificate. Identities no connected proxy uses are dropped at the next
    renewal instead of being renewed.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        rng: random.Random | None = None,
    ) -> None:
        self.ca = ca
        self.trust_domain = trust_domain
        self.ttl = ttl
        self._certs = WorkloadCertificates(ca, trust_domain, ttl=ttl, rng=rng)
        self._bundles: dict[Identity, SecretBundle] = {}
        self._wake = asyncio.Event()
        #: Called when secrets changed outside a generation (renewals, rotate_all).
        self.on_change: Callable[[], None] = lambda: None
        self.issued = 0
        self.renewed = 0

    @property
    def trust_bundle_pem(self) -> bytes:
        return self.ca.trust_bundle_pem

    @property
    def min_renewal_interval(self) -> float:
        """Seconds between renewal passes at the least, so no schedule can spin."""
        return max(0.05, min(1.0, self.ttl.total_seconds() / 20))

    def bundle(self, identity: Identity) -> SecretBundle:
        """The identity's secrets; a certificate is issued if it has none yet.

        Raises :class:`mtls.ca.BadIdentity` for names that cannot form a SPIFFE ID.
        """
        found = self._bundles.get(identity)
        if found is not None:
            return found
        return self._refresh(identity)

    def _refresh(self, identity: Identity) -> SecretBundle:
        issued = self._certs.current(*identity)
        bundle = SecretBundle(
            identity=identity,
            serial=issued.serial,
            not_after=issued.not_after,
            secrets=tuple(secrets_for(issued, self.trust_bundle_pem)),
        )
        self._bundles[identity] = bundle
        self.issued += 1
        self._wake.set()
        return bundle

    def identities(self) -> list[Identity]:
        return sorted(self._bundles)

    def rotate_all(self) -> int:
        """Replace every certificate now (on the next generation); how many there were."""
        count = len(self._bundles)
        for identity in list(self._bundles):
            self._certs.forget(*identity)
            del self._bundles[identity]
        if count:
            self.on_change()
        return count

    def renew_due(self, in_use: Collection[Identity] | None = None) -> list[Identity]:
        """Renew the certificates that are due; drop those of identities not in use."""
        if in_use is not None:
            for identity in [i for i in self._bundles if i not in in_use]:
                self._certs.forget(*identity)
                del self._bundles[identity]
        renewed = [i for i in self._certs.renew_due() if i in self._bundles]
        for identity in renewed:
            self._refresh(identity)
        self.renewed += len(renewed)
        if renewed:
            self.on_change()
        return renewed

    async def run(self, in_use: Callable[[], Collection[Identity]]) -> None:
        """Renew certificates as they fall due, until cancelled."""
        while True:
            self._wake.clear()
            due = self._certs.next_renewal()
            timeout = None
            if due is not None:
                timeout = max(self.min_renewal_interval, (due - utcnow()).total_seconds())
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow a
            # cancellation that arrives as the event is set, and the task would never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            due = self._certs.next_renewal()
            if due is not None and due <= utcnow():
                self.renew_due(in_use())


# --------------------------------------------------------------------------- the TLS port


@dataclass(frozen=True)
class TlsPeer:
    """A client of the TLS port, as the handshake left it."""

    address: str
    port: int
    #: The DER certificate it presented (already verified against the mesh roots).
    certificate: bytes | None


def server_ssl_context(ca: CertificateAuthority, names: Sequence[str]) -> ssl.SSLContext:
    """TLS for the xDS port: a certificate from the CA for ``names``, ALPN ``h2``, and an
    optional client certificate that must chain to the mesh roots when sent."""
    issued = ca.issue_server(list(names))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="inferlane-tls-") as directory:
        chain, key = Path(directory, "tls.crt"), Path(directory, "tls.key")
        key.touch(mode=0o600)
        key.write_bytes(issued.key_pem)
        chain.write_bytes(issued.chain_pem)
        context.load_cert_chain(chain, key)
    context.load_verify_locations(cadata=ca.trust_bundle_pem.decode("ascii"))
    context.verify_mode = ssl.CERT_OPTIONAL
    context.set_alpn_protocols(["h2"])
    return context


class TlsPeers(Protocol):
    """Who is behind a gRPC peer that came through the TLS port (:class:`TlsFront`)."""

    def peer(self, grpc_peer: str) -> TlsPeer | None: ...


class TlsFront:
    """Terminates TLS on the xDS TLS port and relays each connection to the gRPC server.

    Every relayed connection comes from ``127.0.0.1`` at a port this front records, so a
    stream whose gRPC peer is one of those ports arrived over TLS, from :meth:`peer`.
    A handshake that fails (an untrusted or expired client certificate) ends the
    connection; it is logged and counted in :attr:`refused`.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        backend_port: int,
        *,
        backend_host: str = "127.0.0.1",
        handshake_timeout: float = 10.0,
    ) -> None:
        self._context = context
        self._backend = (backend_host, backend_port)
        self._handshake_timeout = handshake_timeout
        self._peers: dict[int, TlsPeer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.refused = 0
        self.last_refusal = ""

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port); the port bound."""
        self._server = await asyncio.start_server(self._accept, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def peer(self, grpc_peer: str) -> TlsPeer | None:
        """The TLS client behind a gRPC peer string, if that stream came through here."""
        parsed = parse_grpc_peer(grpc_peer)
        if parsed is None or parsed[0] != self._backend[0]:
            return None
        return self._peers.get(parsed[1])

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer), name="xds-tls-connection")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote = writer.get_extra_info("peername") or ("?", 0)
        try:
            async with asyncio.timeout(self._handshake_timeout):
                await writer.start_tls(self._context)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            self.refused += 1
            self.last_refusal = _describe(exc)
            log.warning("TLS xDS connection from %s refused: %s", remote[0], self.last_refusal)
            writer.transport.abort()
            return
        tls = writer.get_extra_info("ssl_object")
        certificate = tls.getpeercert(binary_form=True) if tls is not None else None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._backend)
        except OSError as exc:
            log.error("TLS xDS relay cannot reach the gRPC server: %s", exc)
            writer.transport.abort()
            return
        local_port = int(up_writer.get_extra_info("sockname")[1])
        self._peers[local_port] = TlsPeer(str(remote[0]), int(remote[1]), certificate)
        try:
            await _relay(reader, writer, up_reader, up_writer)
        finally:
            self._peers.pop(local_port, None)


def _describe(exc: BaseException) -> str:
    """``certificate has expired``, ``CERTIFICATE_VERIFY_FAILED``... rather than a repr."""
    for attribute in ("verify_message", "reason"):
        value = getattr(exc, attribute, None)
        if value:
            return str(value)
    return str(exc) or type(exc).__name__


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def _relay(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until either side closes, then close both."""
    pumps = [
        asyncio.create_task(_pump(a_reader, b_writer)),
        asyncio.create_task(_pump(b_reader, a_writer)),
    ]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for writer in (a_writer, b_writer):
            writer.transport.abort()


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class TokenIdentity:
    """Who a service-account token belongs to."""

    namespace: str
    service_account: str
    #: The pod the token was issued for (bound tokens name it); "" when not known.
    pod_name: str = ""


class TokenReviewer(Protocol):
    async def review(self, token: str) -> TokenIdentity | str:
        """The token's identity, or why it is not accepted."""
        ...


class TokenReviewApi(Protocol):
    """The one call used, as ``kubernetes.aio.client.AuthenticationV1Api`` provides it."""

    async def create_token_review(self, body: Any) -> Any: ...


class KubernetesTokenReviewer:
    """Checks tokens with a TokenReview: authenticated, for our audience, a service account."""

    def __init__(self, api: TokenReviewApi, audience: str = TOKEN_AUDIENCE) -> None:
        self.api = api
        self.audience = audience

    async def review(self, token: str) -> TokenIdentity | str:
        body = V1TokenReview(spec=V1TokenReviewSpec(token=token, audiences=[self.audience]))
        try:
            result = await self.api.create_token_review(body=body)
        except ApiException as exc:
            return f"TokenReview failed: {exc.status} {exc.reason}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return f"TokenReview failed: {exc}"
        status = getattr(result, "status", None)
        if status is None or not status.authenticated:
            error = getattr(status, "error", None) or "not authenticated"
            return f"token refused: {error}"
        if self.audience not in (status.audiences or ()):
            return f"token is not for audience {self.audience!r}"
        username = str(getattr(status.user, "username", "") or "")
        namespace, _, account = username.removeprefix(_SA_PREFIX).partition(":")
        if not username.startswith(_SA_PREFIX) or not namespace or not account:
            return f"token belongs to {username!r}, not a service account"
        extra: Mapping[str, Sequence[str]] = getattr(status.user, "extra", None) or {}
        pods = extra.get(_POD_NAME_EXTRA) or [""]
        return TokenIdentity(namespace, account, str(pods[0]))


# --------------------------------------------------------------------------- authorization


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
