"""Shapes of the SDS secrets and transport sockets (Envoy itself checks them in
test_envoy_mtls.py)."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from google.protobuf import any_pb2

from mesh import xds
from mtls.ca import CertificateAuthority
from mtls.sds import ROOT_SECRET, WORKLOAD_SECRET, secrets_for
from mtls.tls_context import (
    TLS_TRANSPORT_SOCKET,
    downstream_mtls,
    upstream_mtls,
)

IDS = ["spiffe://cluster.local/ns/default/sa/llama", "spiffe://cluster.local/ns/default/sa/vllm"]


def _ads(source: config_source_pb2.ConfigSource) -> bool:
    return bool(source.HasField("ads") and source.resource_api_version == config_source_pb2.V3)


def test_secrets_for_one_workload() -> None:
    ca = CertificateAuthority.generate()
    issued = ca.issue_workload("cluster.local", "default", "llama")
    default, root = secrets_for(issued, ca.trust_bundle_pem)
    assert (default.name, root.name) == (WORKLOAD_SECRET, ROOT_SECRET) == ("default", "ROOTCA")
    assert default.tls_certificate.certificate_chain.inline_bytes == issued.chain_pem
    assert default.tls_certificate.private_key.inline_bytes == issued.key_pem
    assert root.validation_context.trusted_ca.inline_bytes == ca.trust_bundle_pem
    assert not default.HasField("validation_context") and not root.HasField("tls_certificate")
    packed = any_pb2.Any()
    packed.Pack(default)
    assert packed.type_url == xds.SECRET
    assert secret_pb2.Secret.FromString(default.SerializeToString()) == default


def _unpack(socket: Any, cls: Any) -> Any:
    assert socket.name == TLS_TRANSPORT_SOCKET
    message = cls()
    assert socket.typed_config.Unpack(message)
    return message


def test_upstream_mtls_pins_the_server_identities() -> None:
    ctx = _unpack(upstream_mtls([*IDS, IDS[0]]), tls_pb2.UpstreamTlsContext)
    common = ctx.common_tls_context
    [cert_sds] = common.tls_certificate_sds_secret_configs
    assert cert_sds.name == "default" and _ads(cert_sds.sds_config)
    combined = common.combined_validation_context
    assert combined.validation_context_sds_secret_config.name == "ROOTCA"
    assert _ads(combined.validation_context_sds_secret_config.sds_config)
    matchers = combined.default_validation_context.match_typed_subject_alt_names
    assert [(m.san_type, m.matcher.exact) for m in matchers] == [
        (common_pb2.SubjectAltNameMatcher.URI, i) for i in IDS
    ]  # in order, without the duplicate
    assert list(common.alpn_protocols) == []
    assert not common.tls_certificates  # no inline key ever travels in a cluster


def test_upstream_mtls_options() -> None:
    ctx = _unpack(upstream_mtls([], alpn_protocols=["h2"], sni="x"), tls_pb2.UpstreamTlsContext)
    assert ctx.sni == "x"
    assert list(ctx.common_tls_context.alpn_protocols) == ["h2"]
    validation = ctx.common_tls_context.combined_validation_context.default_validation_context
    assert not validation.match_typed_subject_alt_names


def test_downstream_mtls() -> None:
    for required in (True, False):
        ctx = _unpack(downstream_mtls(required), tls_pb2.DownstreamTlsContext)
        assert ctx.HasField("require_client_certificate")
        assert ctx.require_client_certificate.value is required
        common = ctx.common_tls_context
        assert [s.name for s in common.tls_certificate_sds_secret_configs] == ["default"]
        sds = common.combined_validation_context.validation_context_sds_secret_config
        assert sds.name == "ROOTCA" and _ads(sds.sds_config)
        assert list(common.alpn_protocols) == ["h2", "http/1.1"]
