"""Settings of mesh security at run time: the CA's source, certificate lifetimes, who may
get secrets on the plaintext port, and the TLS port's certificate names."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Final

from mtls.ca import DEFAULT_WORKLOAD_TTL
from mtls.identity import DEFAULT_TRUST_DOMAIN
from mtls.tls_context import CONTROL_PLANE_NAME
from mtls.tokens import TOKEN_AUDIENCE

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Peers that get secrets on the plaintext port unless told otherwise: this host only.
DEFAULT_PLAINTEXT_SECRETS_FROM: Final = ("127.0.0.1/32", "::1/128")
#: Names the certificate of the TLS ports and the rate-limit service carries. Proxies
#: verify ``inferlane`` (the SNI and SAN of bootstraps, injected sidecars and the RLS
#: cluster), whatever address they connect to.
DEFAULT_SERVER_NAMES: Final = (CONTROL_PLANE_NAME, "localhost", "127.0.0.1", "::1")


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
    #: DNS names and IPs of the TLS ports' certificate.
    server_names: tuple[str, ...] = DEFAULT_SERVER_NAMES
    token_audience: str = TOKEN_AUDIENCE

    @property
    def connection_lifetime_s(self) -> float:
        """How long a mesh connection may live: at most an hour, and at most a quarter of
        a certificate's life, so renewed certificates reach every connection well before
        the old ones expire."""
        return min(3600.0, self.cert_ttl.total_seconds() / 4)


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
