"""The authenticated gRPC ports, served by gRPC's own TLS (no relay in the byte path).

grpcio cannot ask for an *optional* client certificate: ``ssl_server_credentials`` either
requires one or never asks. A proxy proves who it is in one of two ways, so each has a
port, as Istio's 15011 and 15012 once did:

- **15012** (``--xds-tls-port``): server TLS only. No client certificate is asked for;
  the proxy sends a service-account token (``authorization: Bearer``).
- **15011** (``--xds-mtls-port``): mutual TLS. gRPC's TLS stack requires a client
  certificate that chains to the mesh roots and is within its validity; a handshake that
  fails never reaches a handler (the client sees ``UNAVAILABLE``). The authorizer then
  reads the certificate's SPIFFE ID.

The global rate-limit service uses the mutual-TLS credentials too. :func:`stream_peer`
says what a handler's ``context`` knows about its peer: its real address (gRPC accepted the
connection itself) and, on a mutual-TLS port, the certificate gRPC verified.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from mtls.ca import CertificateAuthority


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


class Transport(enum.StrEnum):
    PLAINTEXT = "plaintext"
    #: Server TLS; the client did not present a certificate.
    TLS = "tls"
    #: Mutual TLS; the client's certificate chains to the mesh roots.
    MTLS = "mtls"


@dataclass(frozen=True)
class Peer:
    """A stream's peer as gRPC accepted it."""

    #: The client's IP (``""`` when it is not an IP peer, e.g. a Unix socket).
    address: str
    port: int
    transport: Transport
    #: The PEM leaf certificate gRPC verified (mutual TLS only).
    certificate: bytes | None = None


def stream_peer(context: Any) -> Peer:
    """The peer of a ``grpc.aio.ServicerContext``, from its peer string and auth context."""
    parsed = parse_grpc_peer(context.peer()) or ("", 0)
    auth = context.auth_context() or {}
    if auth.get("transport_security_type") != [b"ssl"]:
        return Peer(*parsed, Transport.PLAINTEXT)
    certificates = auth.get("x509_pem_cert") or []
    if not certificates:
        return Peer(*parsed, Transport.TLS)
    return Peer(*parsed, Transport.MTLS, bytes(certificates[0]))


@dataclass(frozen=True)
class ServerCredentials:
    """One serving certificate from the mesh CA, as the credentials of each kind of port."""

    #: Server TLS, no client certificate asked for (the token port).
    tls: grpc.ServerCredentials
    #: Mutual TLS, a client certificate from the mesh CA required (15011 and the RLS).
    mtls: grpc.ServerCredentials


def server_credentials(ca: CertificateAuthority, names: Sequence[str]) -> ServerCredentials:
    """Credentials for the authenticated ports: a certificate from ``ca`` for ``names``
    (DNS names and IPs; proxies check ``inferlane``), trusting the mesh roots for clients.

    Issuing signs a key, so call this off the event loop (``asyncio.to_thread``).
    """
    issued = ca.issue_server(list(names))
    pair = [(issued.key_pem, issued.chain_pem)]
    return ServerCredentials(
        tls=grpc.ssl_server_credentials(pair),
        mtls=grpc.ssl_server_credentials(
            pair, root_certificates=ca.trust_bundle_pem, require_client_auth=True
        ),
    )
