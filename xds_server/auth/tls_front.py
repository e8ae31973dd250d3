"""The TLS xDS port.

Python's gRPC server cannot ask for a client certificate without requiring one (its only
switch is ``require_client_auth``), and a client may authenticate with a token instead.
So TLS is terminated here, asking for an optional client certificate verified against the
mesh roots, and the bytes are relayed to the gRPC server's loopback port. The relay
connection's local port names the TLS peer, which is how
:class:`~xds_server.auth.authorizer.MeshAuthorizer` finds a stream's certificate.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mtls.ca import CertificateAuthority

log = logging.getLogger(__name__)


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
