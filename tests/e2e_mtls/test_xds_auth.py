"""Authenticated xDS (issue 4, #3): who gets served on the TLS port, who gets secrets.

gRPC clients open ADS streams on the TLS port with certificates of every kind (right,
from another CA, expired, none) and tokens; real Envoys connect over TLS with a client
certificate and with a token, and one connects to the plaintext port from 127.0.0.2,
outside the allowlist.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from mesh import xds
from mtls.ca import CertificateAuthority, IssuedCert
from mtls.sds import ROOT_SECRET, WORKLOAD_SECRET
from mtls.tokens import TokenIdentity
from tests.e2e_mtls.harness import (
    TD,
    Sidecar,
    certs,
    control_plane,
    inference_service,
    running,
    settings,
    spiffe,
    workload_pod,
    write_manifests,
)
from tests.support.envoy import require_envoy
from tests.support.wait import eventually
from xds_server.app import ControlPlane
from xds_server.sidecar.bootstrap import TlsSettings

pytestmark = pytest.mark.envoy

GPU, CHAT, OUTSIDER = "127.0.53.1", "127.0.53.10", "127.0.0.2"
TOKENS = {
    "token-chat": TokenIdentity("default", "chat", "chat-0"),
    "token-chat-unbound": TokenIdentity("default", "chat"),
}


class FakeTokens:
    """A TokenReview stand-in: known tokens and who they belong to."""

    async def review(self, token: str) -> TokenIdentity | str:
        return TOKENS.get(token, "token refused: unknown token")


def node_id(pod: str, namespace: str = "default", ip: str = CHAT) -> str:
    return f"sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local"


#: The mesh CA is made three hours in the past, so it can also issue expired certificates.
PAST = datetime.now(UTC) - timedelta(hours=3)


@contextlib.asynccontextmanager
async def mesh(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    (tmp_path / "ca").mkdir(mode=0o700)
    CertificateAuthority.generate(clock=lambda: PAST).save(tmp_path / "ca")
    manifest = tmp_path / "mesh.yaml"
    write_manifests(
        manifest,
        [
            # Strict: every outbound cluster to llama uses mTLS, so sidecars ask for secrets.
            inference_service("llama", {"inferlane.io/mtls": "strict"}),
            workload_pod("gpu-0", ip=GPU, service_account="llama", app="llama", port=9000),
            workload_pod("chat-0", ip=CHAT, service_account="chat"),
        ],
    )
    async with control_plane(manifest, settings(tmp_path / "ca"), tokens=FakeTokens()) as plane:
        yield plane


async def secrets_over_tls(
    plane: ControlPlane,
    node: str,
    *,
    cert: IssuedCert | None = None,
    token: str = "",
) -> list[Any] | grpc.StatusCode:
    """The secrets the TLS port sends to ``node``, or the status the stream ends with."""
    assert plane.secrets is not None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=plane.secrets.trust_bundle_pem,
        private_key=cert.key_pem if cert else None,
        certificate_chain=cert.chain_pem if cert else None,
    )
    target = f"127.0.0.1:{plane.ports['xds_tls']}"
    async with grpc.aio.secure_channel(target, credentials) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        call = stub.StreamAggregatedResources(metadata=metadata)
        request = discovery_pb2.DiscoveryRequest(
            type_url=xds.SECRET, resource_names=[WORKLOAD_SECRET, ROOT_SECRET]
        )
        request.node.id = node
        try:
            await call.write(request)
            async with asyncio.timeout(10):
                response = await call.read()
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        finally:
            call.cancel()
        if response is grpc.aio.EOF:
            return grpc.StatusCode.UNKNOWN
        found = []
        for packed in response.resources:
            secret = secret_pb2.Secret()
            packed.Unpack(secret)
            found.append(secret)
        return found


def workload_sans(secrets: Sequence[Any] | grpc.StatusCode) -> list[str]:
    assert not isinstance(secrets, grpc.StatusCode), secrets
    by_name = {s.name: s for s in secrets}
    assert set(by_name) == {WORKLOAD_SECRET, ROOT_SECRET}
    pem = by_name[WORKLOAD_SECRET].tls_certificate.certificate_chain.inline_bytes
    leaf = x509.load_pem_x509_certificates(pem)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


async def test_tls_port_authenticates_every_stream(tmp_path: Path) -> None:
    async with mesh(tmp_path) as plane:
        assert plane.secrets is not None and plane.tls_front is not None
        ca = plane.secrets.ca
        chat = ca.issue_workload(TD, "default", "chat")

        # The right certificate, claiming its own pod: its own secrets only.
        assert workload_sans(await secrets_over_tls(plane, node_id("chat-0"), cert=chat)) == [
            spiffe("chat")
        ]
        # Claiming another pod's identity (same namespace, or another one): refused.
        assert (
            await secrets_over_tls(plane, node_id("gpu-0", ip=GPU), cert=chat)
            == grpc.StatusCode.PERMISSION_DENIED
        )
        assert (
            await secrets_over_tls(plane, node_id("chat-0", namespace="prod"), cert=chat)
            == grpc.StatusCode.PERMISSION_DENIED
        )

        # A certificate from another CA, and an expired one from ours: no TLS session.
        stranger = CertificateAuthority.generate().issue_workload(TD, "default", "chat")
        refused = plane.tls_front.refused
        assert await secrets_over_tls(plane, node_id("chat-0"), cert=stranger) == (
            grpc.StatusCode.UNAVAILABLE
        )
        assert plane.tls_front.refused > refused

        data = ca.secret_data()
        then = CertificateAuthority.from_secret_data(data, clock=lambda: PAST)
        expired = then.issue_workload(TD, "default", "chat", ttl=timedelta(minutes=5))
        assert expired.not_after < datetime.now(UTC)
        refused = plane.tls_front.refused
        assert await secrets_over_tls(plane, node_id("chat-0"), cert=expired) == (
            grpc.StatusCode.UNAVAILABLE
        )
        assert plane.tls_front.refused > refused
        assert "expired" in plane.tls_front.last_refusal.lower()

        # No certificate: a token or nothing.
        assert await secrets_over_tls(plane, node_id("chat-0")) == grpc.StatusCode.UNAUTHENTICATED
        assert (
            await secrets_over_tls(plane, node_id("chat-0"), token="forged")
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert workload_sans(
            await secrets_over_tls(plane, node_id("chat-0"), token="token-chat")
        ) == [spiffe("chat")]
        # A token bound to chat-0 cannot speak for another pod of the same account.
        assert (
            await secrets_over_tls(plane, node_id("chat-1"), token="token-chat")
            == grpc.StatusCode.PERMISSION_DENIED
        )
        assert (
            await secrets_over_tls(plane, node_id("gpu-0", ip=GPU), token="token-chat-unbound")
            == grpc.StatusCode.PERMISSION_DENIED
        )


async def sds_sans(envoy: Any) -> list[str]:
    """The URI SANs of the ``default`` secret Envoy holds from SDS (none: [])."""
    dump = await envoy.admin_json("/config_dump?resource=dynamic_active_secrets")
    for entry in dump.get("configs", []):
        if entry.get("name") != WORKLOAD_SECRET:
            continue
        chain = entry["secret"]["tls_certificate"]["certificate_chain"]["inline_bytes"]
        leaf = x509.load_pem_x509_certificates(base64.b64decode(chain))[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    return []


def _files(directory: Path, plane: ControlPlane, issued: IssuedCert | None) -> TlsSettings:
    assert plane.secrets is not None
    directory.mkdir(parents=True, exist_ok=True)
    root = directory / "root.pem"
    root.write_bytes(plane.secrets.trust_bundle_pem)
    if issued is None:
        return TlsSettings(str(root), token="token-chat")
    (directory / "tls.crt").write_bytes(issued.chain_pem)
    (directory / "tls.key").write_bytes(issued.key_pem)
    return TlsSettings(str(root), str(directory / "tls.crt"), str(directory / "tls.key"))


async def test_envoys_over_tls_and_from_outside_the_plaintext_allowlist(tmp_path: Path) -> None:
    require_envoy()
    async with mesh(tmp_path) as plane:
        assert plane.secrets is not None
        chat = plane.secrets.ca.issue_workload(TD, "default", "chat")
        tls_port = plane.ports["xds_tls"]
        by_cert = _files(tmp_path / "cert", plane, chat)
        by_token = _files(tmp_path / "token", plane, None)
        # Two Envoys for pod chat-0, over TLS: one with a client certificate, one with a
        # token. Each gets the pod's certificate over SDS.
        for tls in (by_cert, by_token):
            sidecar = Sidecar(CHAT, "chat-0")
            async with running(sidecar.options(tls_port, tls=tls)) as envoy:

                async def has_identity(envoy: Any = envoy) -> bool:
                    return await sds_sans(envoy) == [spiffe("chat")]

                await eventually(has_identity, timeout=15, what="SDS certificate over TLS")
                conn = plane.xds.find(sidecar.node_id)
                assert conn is not None and conn.proxy.authenticated_identity == "default/chat"

        # Plaintext from 127.0.0.2: served, but without secrets (and so without mTLS).
        sidecar = Sidecar(CHAT, "chat-0")
        opts = sidecar.options(plane.ports["xds"], source_address=OUTSIDER)
        async with running(opts) as envoy:

            async def listeners_acked() -> bool:
                conn = plane.xds.find(sidecar.node_id)
                if conn is None:
                    return False
                lds = conn.state.types.get(xds.LISTENER)
                return lds is not None and bool(lds.acked_version)

            await eventually(listeners_acked, timeout=15, what="plaintext Envoy synced")
            conn = plane.xds.find(sidecar.node_id)
            assert conn is not None and conn.peer.startswith(f"ipv4:{OUTSIDER}:")
            assert not conn.proxy.secrets_allowed
            assert conn.state.snapshot is not None
            assert not conn.state.snapshot.of_type(xds.SECRET)
            assert (await certs(envoy))["chain"] == []
            assert await sds_sans(envoy) == []
