"""The global rate-limit service authenticates its callers (issue 11, #11).

First over real gRPC with mesh certificates: the service requires one, counts every call as
its certificate's identity whatever the descriptor's ``caller`` says (or leaves out), and
ignores limits a client sends. Then through real Envoys: each sidecar presents its SDS
certificate to the service; a pod that forges ``caller`` with its own certificate drains
only its own budget, never the victim's; and a proxy without an identity (a plaintext peer
outside the allowlist) cannot be counted, so its limited class is refused while critical
flows.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from mesh.model import PRIORITY_HEADER
from mtls.ca import CertificateAuthority, IssuedCert
from ratelimit.counters import InMemoryCounters
from ratelimit.rules import rules_from_world
from tests.e2e_mtls.harness import (
    SERVICE_PORT,
    TD,
    Http,
    Sidecar,
    inference_service,
    llama_pod,
    running,
    workload_pod,
    write_manifests,
)
from tests.e2e_ratelimit.harness import control_plane, serve_settings
from tests.ratelimit.test_rls import _request as rls_request
from tests.ratelimit.test_rls import _world as limited_world
from tests.support.backends import echo_server
from tests.support.envoy import require_envoy
from tests.support.wait import eventually
from xds_server.auth.transport import server_credentials
from xds_server.rls.runtime import RateLimitSettings
from xds_server.rls.service import PeerCallers, RateLimitService, start_rls_server

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
#: Per hour, so that no window rolls over during a test.
PER_HOUR = 3


def shed(caller: str | None) -> tuple[tuple[str, str], ...]:
    service = ("service", "default/llama")
    priority = ("priority", "sheddable")
    return (service, priority) if caller is None else (service, ("caller", caller), priority)


def request(entries: Sequence[tuple[str, str]], *, limit: int = 0) -> Any:
    """One descriptor; with ``limit``, carrying its own limit per hour."""
    built = rls_request(entries)
    if limit:
        built.descriptors[0].limit.requests_per_unit = limit
        built.descriptors[0].limit.unit = rls_pb2.RateLimitResponse.RateLimit.HOUR
    return built


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


@contextlib.asynccontextmanager
async def authenticated_rls(ca: CertificateAuthority) -> AsyncIterator[tuple[Any, int]]:
    service = RateLimitService(
        InMemoryCounters(),
        rules_from_world(limited_world(sheddable=PER_HOUR / 3600)),
        callers=PeerCallers(TD),
    )
    credentials = server_credentials(ca, ["inferlane", "127.0.0.1"])
    server, port = await start_rls_server(service, "127.0.0.1", 0, credentials.mtls)
    try:
        yield service, port
    finally:
        await server.stop(None)
        await service.counters.close()


@contextlib.asynccontextmanager
async def client(
    ca: CertificateAuthority, port: int, cert: IssuedCert | None
) -> AsyncIterator[Any]:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.trust_bundle_pem,
        private_key=cert.key_pem if cert else None,
        certificate_chain=cert.chain_pem if cert else None,
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        yield rls_pb2_grpc.RateLimitServiceStub(channel)


async def codes(stub: Any, entries: Sequence[tuple[str, str]], n: int, **kw: Any) -> list[int]:
    return [(await stub.ShouldRateLimit(request(entries, **kw))).overall_code for _ in range(n)]


async def test_each_call_is_counted_as_its_certificate(ca: CertificateAuthority) -> None:
    mallory = ca.issue_workload(TD, "default", "mallory")
    victim = ca.issue_workload(TD, "default", "victim")
    async with authenticated_rls(ca) as (service, port):
        async with client(ca, port, mallory) as stub:
            # Naming the victim as caller, leaving the caller out, or sending a generous
            # limit of its own: each call is counted against mallory's budget.
            assert await codes(stub, shed("default/victim"), 2) == [OK, OK]
            assert await codes(stub, shed(None), 1) == [OK]
            assert await codes(stub, shed("default/mallory"), 1, limit=1000) == [OVER]
        async with client(ca, port, victim) as stub:
            assert await codes(stub, shed("default/victim"), PER_HOUR + 1) == [OK] * PER_HOUR + [
                OVER
            ]
        corrected = service.counters.metrics.registry.get_sample_value
        assert corrected("inferlane_rls_descriptors_corrected_total", {"field": "caller"}) == 3
        assert corrected("inferlane_rls_descriptors_corrected_total", {"field": "limit"}) == 1


async def test_callers_without_a_mesh_certificate_are_not_served(
    ca: CertificateAuthority,
) -> None:
    stranger = CertificateAuthority.generate().issue_workload(TD, "default", "victim")
    elsewhere = ca.issue_workload("other.td", "default", "victim")
    async with authenticated_rls(ca) as (_service, port):
        for cert, code in (
            (None, grpc.StatusCode.UNAVAILABLE),  # no certificate: no TLS session
            (stranger, grpc.StatusCode.UNAVAILABLE),  # another CA: no TLS session
            (elsewhere, grpc.StatusCode.UNAUTHENTICATED),  # our CA, not our trust domain
        ):
            async with client(ca, port, cert) as stub:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.ShouldRateLimit(request(shed("default/victim")))
                assert info.value.code() is code


# --------------------------------------------------------------------------- with Envoy

GPU, CHAT, BATCH, OUTSIDER = "127.0.56.1", "127.0.56.10", "127.0.56.11", "127.0.0.2"
LLAMA = f"llama:{SERVICE_PORT}"


@pytest.mark.envoy
async def test_sidecars_present_their_certificate_and_forgeries_drain_only_their_own(
    tmp_path: Path,
) -> None:
    require_envoy()
    manifest = tmp_path / "mesh.yaml"
    http = Http()
    async with echo_server("gpu-0", host=GPU) as backend:
        write_manifests(
            manifest,
            [
                inference_service(
                    "llama", {"inferlane.io/global-rate-limit": f"sheddable={PER_HOUR / 3600}"}
                ),
                llama_pod("gpu-0", GPU, backend.port),
                workload_pod("chat-0", ip=CHAT, service_account="chat"),
                workload_pod("batch-0", ip=BATCH, service_account="batch"),
            ],
        )
        # Fail open: a caller the service refuses or cannot reach would be let through, so
        # every 429 below is the service counting.
        limits = RateLimitSettings(rls_port=0, rls_timeout_s=1.0)
        chat, batch = Sidecar(CHAT, "chat-0"), Sidecar(BATCH, "batch-0")
        async with (
            control_plane(manifest, serve_settings(tmp_path / "ca", limits)) as plane,
            running(chat.options(plane.ports["xds"])) as chat_envoy,
            running(batch.options(plane.ports["xds"])),
        ):
            assert plane.secrets is not None

            async def send(sidecar: Sidecar, priority: str) -> int:
                status, _ = await http.get(
                    sidecar.ip, sidecar.outbound_port, LLAMA, headers={PRIORITY_HEADER: priority}
                )
                return status

            for sidecar in (chat, batch):

                async def routed(sidecar: Sidecar = sidecar) -> bool:
                    return await send(sidecar, "critical") == 200

                await eventually(routed, timeout=15, what=f"routing through {sidecar.pod_name}")

            # batch's pod forges the caller with its own certificate: it drains its own
            # budget, and chat keeps all of its.
            batch_cert = plane.secrets.ca.issue_workload(TD, "default", "batch")
            async with client(plane.secrets.ca, plane.ports["rls"], batch_cert) as stub:
                forged = await codes(stub, shed("default/chat"), PER_HOUR + 1)
            assert forged == [OK] * PER_HOUR + [OVER]
            assert [await send(batch, "sheddable") for _ in range(2)] == [429, 429]
            chat_shed = [await send(chat, "sheddable") for _ in range(PER_HOUR + 1)]
            assert chat_shed == [200] * PER_HOUR + [429]

            # chat's Envoy reached the service over mTLS with its SDS certificate.
            stats = await chat_envoy.stats("inferlane-rls")
            assert stats.get("cluster.inferlane-rls.ssl.handshake", 0) >= 1
            metrics = plane.ratelimits.registry
            assert (
                metrics.get_sample_value("inferlane_rls_requests_total", {"code": "OVER_LIMIT"})
                or 0
            ) >= 3

        # A proxy without an identity (plaintext, outside the allowlist: no secrets) cannot
        # be counted: its limited class is refused whatever the failure mode; critical flows.
        async with control_plane(manifest, serve_settings(tmp_path / "ca", limits)) as plane:
            outsider = Sidecar(CHAT, "chat-0")
            opts = outsider.options(plane.ports["xds"], source_address=OUTSIDER)
            async with running(opts):

                async def routed_outside() -> bool:
                    return await send(outsider, "critical") == 200

                await eventually(routed_outside, timeout=15, what="routing without an identity")
                conn = plane.xds.find(outsider.node_id)
                assert conn is not None and not conn.proxy.secrets_allowed
                refused = [await send(outsider, "sheddable") for _ in range(2)]
                assert all(status >= 400 for status in refused), refused
                assert await send(outsider, "critical") == 200
                calls = plane.ratelimits.registry.get_sample_value(
                    "inferlane_rls_requests_total", {"code": "OK"}
                )
                assert not calls  # nothing it sent was counted
