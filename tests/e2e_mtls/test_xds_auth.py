"""Authenticated xDS (issue 4, #3; issue 11, #9 and #10): who gets served on the two TLS
ports, who gets secrets, and which pod a stream may speak for.

gRPC clients open ADS streams on the mutual-TLS port (15011) with certificates of every
kind (right, from another CA, expired, none) and on the token port (15012) with tokens.
Real Envoys connect over mutual TLS from their pod's address and with a token; one claims
a sibling pod of its service account and is refused; one connects to the plaintext port
from 127.0.0.2, outside the allowlist. gRPC terminates TLS itself, so the control plane
sees each Envoy's own address.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
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
from tests.e2e.harness import admin_text, metric
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

GPU, CHAT, SIBLING, OUTSIDER = "127.0.53.1", "127.0.53.10", "127.0.53.11", "127.0.0.2"
#: A pod at the address gRPC clients in this process connect from (they cannot choose one).
LOCAL = "127.0.0.1"
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
            workload_pod("chat-1", ip=SIBLING, service_account="chat"),
            workload_pod("local-0", ip=LOCAL, service_account="chat"),
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
    port: str = "",
    metadata: dict[str, str] | None = None,
) -> list[Any] | grpc.StatusCode:
    """The secrets the mutual-TLS port (with ``cert``) or the token port sends to ``node``,
    or the status the stream ends with."""
    assert plane.secrets is not None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=plane.secrets.trust_bundle_pem,
        private_key=cert.key_pem if cert else None,
        certificate_chain=cert.chain_pem if cert else None,
    )
    target = f"127.0.0.1:{plane.ports[port or ('xds_mtls' if cert else 'xds_tls')]}"
    async with grpc.aio.secure_channel(target, credentials) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.StreamAggregatedResources(
            metadata=(("authorization", f"Bearer {token}"),) if token else None
        )
        request = discovery_pb2.DiscoveryRequest(
            type_url=xds.SECRET, resource_names=[WORKLOAD_SECRET, ROOT_SECRET]
        )
        request.node.id = node
        request.node.metadata.update(metadata or {})
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


async def test_tls_ports_authenticate_every_stream(tmp_path: Path) -> None:
    async with mesh(tmp_path) as plane:
        assert plane.secrets is not None
        ca = plane.secrets.ca
        chat = ca.issue_workload(TD, "default", "chat")

        # Mutual TLS: the right certificate, claiming the pod at its own address.
        assert workload_sans(
            await secrets_over_tls(plane, node_id("local-0", ip=LOCAL), cert=chat)
        ) == [spiffe("chat")]
        # A sibling pod of the same service account, another account's pod, or another
        # namespace: refused.
        for claim in (
            node_id("chat-0"),
            node_id("gpu-0", ip=GPU),
            node_id("local-0", namespace="prod", ip=LOCAL),
        ):
            assert (
                await secrets_over_tls(plane, claim, cert=chat) == grpc.StatusCode.PERMISSION_DENIED
            ), claim

        # A certificate from another CA, an expired one from ours, or none at all: gRPC
        # ends the handshake before any handler runs.
        stranger = CertificateAuthority.generate().issue_workload(TD, "default", "chat")
        data = ca.secret_data()
        then = CertificateAuthority.from_secret_data(data, clock=lambda: PAST)
        expired = then.issue_workload(TD, "default", "chat", ttl=timedelta(minutes=5))
        assert expired.not_after < datetime.now(UTC)
        for cert in (stranger, expired):
            assert await secrets_over_tls(plane, node_id("local-0", ip=LOCAL), cert=cert) == (
                grpc.StatusCode.UNAVAILABLE
            )
        assert await secrets_over_tls(plane, node_id("local-0", ip=LOCAL), port="xds_mtls") == (
            grpc.StatusCode.UNAVAILABLE
        )

        # The token port: a token or nothing. It never asks for a certificate.
        assert await secrets_over_tls(plane, node_id("chat-0")) == grpc.StatusCode.UNAUTHENTICATED
        assert (
            await secrets_over_tls(plane, node_id("chat-0"), cert=chat, port="xds_tls")
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            await secrets_over_tls(plane, node_id("chat-0"), token="forged")
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert workload_sans(
            await secrets_over_tls(plane, node_id("chat-0"), token="token-chat")
        ) == [spiffe("chat")]
        # A token bound to chat-0 cannot speak for another pod of the same account.
        assert (
            await secrets_over_tls(plane, node_id("chat-1", ip=SIBLING), token="token-chat")
            == grpc.StatusCode.PERMISSION_DENIED
        )
        assert (
            await secrets_over_tls(plane, node_id("gpu-0", ip=GPU), token="token-chat-unbound")
            == grpc.StatusCode.PERMISSION_DENIED
        )
        # Metadata that contradicts the proof is refused, not overridden.
        assert (
            await secrets_over_tls(
                plane,
                node_id("chat-0"),
                token="token-chat",
                metadata={"SERVICE_ACCOUNT": "llama"},
            )
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


def rejected(plane: ControlPlane, reason: str) -> float:
    return metric(plane, "inferlane_xds_rejected_streams_total", reason=reason)


async def test_envoys_over_tls_from_their_pods_and_a_sibling_claim_refused(
    tmp_path: Path,
) -> None:
    require_envoy()
    async with mesh(tmp_path) as plane:
        assert plane.secrets is not None
        chat = plane.secrets.ca.issue_workload(TD, "default", "chat")
        by_cert = _files(tmp_path / "cert", plane, chat)
        by_token = _files(tmp_path / "token", plane, None)
        # Two Envoys of pod chat-0, from its address: one with a client certificate on the
        # mutual-TLS port, one with a token on the TLS port. Each gets the pod's
        # certificate over SDS, and the control plane sees the Envoy's own address.
        for port, tls in (("xds_mtls", by_cert), ("xds_tls", by_token)):
            sidecar = Sidecar(CHAT, "chat-0")
            opts = sidecar.options(plane.ports[port], tls=tls, source_address=CHAT)
            async with running(opts) as envoy:

                async def has_identity(envoy: Any = envoy) -> bool:
                    return await sds_sans(envoy) == [spiffe("chat")]

                await eventually(has_identity, timeout=15, what=f"SDS certificate over {port}")
                conn = plane.xds.find(sidecar.node_id)
                assert conn is not None and conn.proxy.authenticated_identity == "default/chat"
                listed = json.loads(await admin_text(plane, "/debug/connections"))
                (peer,) = [c["peer"] for c in listed if c["node_id"] == sidecar.node_id]
                assert peer.startswith(f"ipv4:{CHAT}:"), peer

        # The same Envoy, with the same certificate, claiming chat-1: another pod of its
        # service account, at another address. Refused, and it gets nothing.
        sibling = Sidecar(SIBLING, "chat-1")
        before = rejected(plane, "unauthorized")
        opts = sibling.options(plane.ports["xds_mtls"], tls=by_cert, source_address=CHAT)
        async with running(opts) as envoy:

            async def refused() -> bool:
                return rejected(plane, "unauthorized") > before

            await eventually(refused, timeout=15, what="the sibling claim refused")
            assert plane.xds.find(sibling.node_id) is None
            assert await sds_sans(envoy) == []

        # Plaintext from chat-0's own address, claiming another service account: the pod
        # at that address runs as default/chat, so the claim is refused.
        liar = Sidecar(CHAT, "chat-0")
        before = rejected(plane, "unauthorized")
        opts = liar.options(plane.ports["xds"], service_account="llama", source_address=CHAT)
        async with running(opts):

            async def liar_refused() -> bool:
                return rejected(plane, "unauthorized") > before

            await eventually(liar_refused, timeout=15, what="the contradicting claim refused")
            assert plane.xds.find(liar.node_id) is None

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
