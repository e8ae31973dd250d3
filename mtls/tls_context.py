"""Transport sockets for mesh mTLS, with certificates and roots fetched over ADS SDS.

Both sides present the ``default`` secret and verify the peer against ``ROOTCA``, the
names of :mod:`mtls.sds`. The client side also pins the server's identity: its URI SAN
must be one of the expected SPIFFE IDs. The server side authenticates clients only;
deciding which client may do what is left to the HTTP filters (RBAC), which see the
verified SPIFFE ID.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, wrappers_pb2

from mtls.sds import ROOT_SECRET, WORKLOAD_SECRET

#: The transport socket's extension name.
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
#: The DNS name every control-plane replica's serving certificate carries, and the one
#: proxies check (SNI too), whatever address they dial.
CONTROL_PLANE_NAME = "inferlane"
#: What the inbound side offers; the HTTP connection manager (codec AUTO) follows ALPN.
DOWNSTREAM_ALPN: tuple[str, ...] = ("h2", "http/1.1")


def ads_config_source() -> config_source_pb2.ConfigSource:
    """``{ads: {}, resource_api_version: V3}``: fetch over the proxy's ADS stream."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads_config_source())


def _common(
    alpn_protocols: Sequence[str],
    validation: common_pb2.CertificateValidationContext | None,
) -> tls_pb2.CommonTlsContext:
    return tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[_sds(WORKLOAD_SECRET)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=validation or common_pb2.CertificateValidationContext(),
            validation_context_sds_secret_config=_sds(ROOT_SECRET),
        ),
        alpn_protocols=list(alpn_protocols),
    )


def _socket(
    context: tls_pb2.UpstreamTlsContext | tls_pb2.DownstreamTlsContext,
) -> base_pb2.TransportSocket:
    typed = any_pb2.Any()
    typed.Pack(context)
    return base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=typed)


def spiffe_san_matchers(spiffe_ids: Sequence[str]) -> list[common_pb2.SubjectAltNameMatcher]:
    """One exact URI-SAN matcher per ID, in order, without duplicates."""
    return [
        common_pb2.SubjectAltNameMatcher(
            san_type=common_pb2.SubjectAltNameMatcher.URI,
            matcher=string_pb2.StringMatcher(exact=spiffe_id),
        )
        for spiffe_id in dict.fromkeys(spiffe_ids)
    ]


def upstream_tls_context(
    expected_spiffe_ids: Sequence[str],
    *,
    alpn_protocols: Sequence[str] = (),
    sni: str = "",
) -> tls_pb2.UpstreamTlsContext:
    """The client side of mesh mTLS: the server must present one of the expected IDs.

    An empty ``expected_spiffe_ids`` trusts any certificate ``ROOTCA`` signed. Leave
    ``alpn_protocols`` empty for clusters with ``auto_config`` (Envoy then offers the
    cluster's protocols itself); name the protocol for an explicit-HTTP cluster.
    """
    validation = common_pb2.CertificateValidationContext(
        match_typed_subject_alt_names=spiffe_san_matchers(expected_spiffe_ids)
    )
    return tls_pb2.UpstreamTlsContext(
        common_tls_context=_common(alpn_protocols, validation), sni=sni
    )


def upstream_mtls(
    expected_spiffe_ids: Sequence[str],
    *,
    alpn_protocols: Sequence[str] = (),
    sni: str = "",
) -> base_pb2.TransportSocket:
    """:func:`upstream_tls_context` wrapped as a cluster's ``transport_socket``."""
    return _socket(
        upstream_tls_context(expected_spiffe_ids, alpn_protocols=alpn_protocols, sni=sni)
    )


def downstream_tls_context(
    require_client_certificate: bool,
    *,
    alpn_protocols: Sequence[str] = DOWNSTREAM_ALPN,
) -> tls_pb2.DownstreamTlsContext:
    """The server side of mesh mTLS.

    With ``require_client_certificate`` a client without a certificate ``ROOTCA`` trusts
    is refused in the handshake; without it, a client certificate is asked for and
    verified when one is sent, and a client without one is still served.
    """
    return tls_pb2.DownstreamTlsContext(
        common_tls_context=_common(alpn_protocols, None),
        require_client_certificate=wrappers_pb2.BoolValue(value=require_client_certificate),
    )


def downstream_mtls(
    require_client_certificate: bool,
    *,
    alpn_protocols: Sequence[str] = DOWNSTREAM_ALPN,
) -> base_pb2.TransportSocket:
    """:func:`downstream_tls_context` wrapped as a filter chain's ``transport_socket``."""
    return _socket(
        downstream_tls_context(require_client_certificate, alpn_protocols=alpn_protocols)
    )


def upstream_control_plane_mtls(
    server_name: str = CONTROL_PLANE_NAME, *, alpn_protocols: Sequence[str] = ("h2",)
) -> base_pb2.TransportSocket:
    """A sidecar's mTLS to the control plane's services (the global rate-limit service):
    it presents its ``default`` certificate and checks the server against ``ROOTCA`` and
    the DNS name ``server_name``, which every replica's serving certificate carries."""
    validation = common_pb2.CertificateValidationContext(
        match_typed_subject_alt_names=[
            common_pb2.SubjectAltNameMatcher(
                san_type=common_pb2.SubjectAltNameMatcher.DNS,
                matcher=string_pb2.StringMatcher(exact=server_name),
            )
        ]
    )
    return _socket(
        tls_pb2.UpstreamTlsContext(
            common_tls_context=_common(alpn_protocols, validation), sni=server_name
        )
    )
