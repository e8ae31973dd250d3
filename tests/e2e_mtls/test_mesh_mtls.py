"""A client sidecar reaches a backend through the server's sidecar over mTLS (issue 4, #1).

``llama`` names ``default/chat`` as its only critical caller. The server sidecar (pod
``gpu-0``, service account ``llama``) fronts the backend; the client sidecar (pod
``chat-0``, service account ``chat``) calls it. Both get their certificates over SDS.
Then other callers knock on the server sidecar's inbound port directly: in plaintext,
and over mTLS with certificates of listed and unlisted identities, first in permissive
and then in strict mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh.model import PRIORITY_HEADER
from tests.e2e.harness import admin_text
from tests.e2e_mtls.harness import (
    SERVICE_PORT,
    TD,
    XFCC,
    Http,
    Sidecar,
    certs,
    client_tls,
    control_plane,
    header,
    inference_service,
    listener_handshakes,
    llama_pod,
    running,
    settings,
    spiffe,
    workload_pod,
    write_manifests,
)
from tests.support.backends import echo_server
from tests.support.envoy import require_envoy
from tests.support.wait import eventually

pytestmark = pytest.mark.envoy

GPU, CHAT = "127.0.51.1", "127.0.51.10"
LLAMA = f"llama:{SERVICE_PORT}"


async def test_sidecar_to_sidecar_mtls_and_the_inbound_caller_check(tmp_path: Path) -> None:
    require_envoy()
    manifest = tmp_path / "mesh.yaml"
    http = Http()
    async with echo_server("gpu-0", host=GPU) as backend:

        def objects(mode: str) -> list[dict[str, object]]:
            return [
                inference_service(
                    "llama",
                    {"inferlane.io/critical-callers": "default/chat", "inferlane.io/mtls": mode},
                ),
                llama_pod("gpu-0", GPU, backend.port),
                workload_pod("chat-0", ip=CHAT, service_account="chat"),
            ]

        write_manifests(manifest, objects("permissive"))
        server, client = Sidecar(GPU, "gpu-0"), Sidecar(CHAT, "chat-0")
        async with control_plane(manifest, settings(tmp_path / "ca")) as plane:
            assert plane.secrets is not None
            ca = plane.secrets.ca
            xds = plane.ports["xds"]
            async with (
                running(server.options(xds, service_account="llama")) as server_envoy,
                # The client speaks Delta ADS, the server State-of-the-World.
                running(client.options(xds, service_account="chat", delta=True)) as client_envoy,
            ):

                async def through_mesh(priority: str = "standard") -> bool:
                    status, body = await http.get(
                        CHAT, client.outbound_port, LLAMA, headers={PRIORITY_HEADER: priority}
                    )
                    return status == 200 and body == "gpu-0"

                await eventually(through_mesh, timeout=20, what="client -> server sidecar -> gpu-0")

                # The request crossed the server sidecar's TLS listener, as the client.
                assert await listener_handshakes(server_envoy) > 0
                assert header(backend.headers[-1], XFCC) is not None
                assert f"URI={spiffe('chat')}" in (header(backend.headers[-1], XFCC) or "")

                # The control plane lists what it issued, without keys.
                page = await admin_text(plane, "/debug/certs")
                assert "PRIVATE KEY" not in page
                issued = {e["identity"] for e in json.loads(page)["identities"]}
                assert issued == {"default/chat", "default/llama"}

                # Each Envoy holds its own SPIFFE identity, and the mesh root.
                for envoy, mine, other in (
                    (client_envoy, spiffe("chat"), spiffe("llama")),
                    (server_envoy, spiffe("llama"), spiffe("chat")),
                ):
                    held = await certs(envoy)
                    sans = {san for _, chain_sans in held["chain"] for san in chain_sans}
                    assert mine in sans and other not in sans
                    assert {int(serial, 16) for serial in held["ca"]} == {ca.roots[0].serial_number}

                # The listed caller gets critical end to end.
                backend.headers.clear()
                assert await through_mesh("critical")
                assert header(backend.headers[-1], PRIORITY_HEADER) == "critical"

                listed = client_tls(ca, ca.issue_workload(TD, "default", "chat"), tmp_path / "c")
                unlisted = client_tls(ca, ca.issue_workload(TD, "default", "batch"), tmp_path / "b")
                inbound = (GPU, server.inbound_port)

                async def check_any_mode() -> None:
                    critical = {PRIORITY_HEADER: "critical"}
                    # An authenticated but unlisted peer claiming critical: 403.
                    status, _ = await http.get(*inbound, LLAMA, headers=critical, tls=unlisted)
                    assert status == 403
                    assert (await http.get(*inbound, LLAMA, tls=unlisted))[0] == 200
                    # The listed peer's certificate gets through.
                    assert (await http.get(*inbound, LLAMA, headers=critical, tls=listed)) == (
                        200,
                        "gpu-0",
                    )

                # Permissive: plaintext is served, but never as critical.
                await check_any_mode()
                critical = {PRIORITY_HEADER: "CRITICAL"}
                assert (await http.get(*inbound, LLAMA, headers=critical))[0] == 403
                assert await http.get(*inbound, LLAMA) == (200, "gpu-0")

                # Strict: a caller without a certificate gets nothing at all.
                write_manifests(manifest, objects("strict"))

                async def plaintext_refused() -> bool:
                    return await http.refused(*inbound)

                await eventually(plaintext_refused, timeout=10, what="strict refuses plaintext")
                no_cert = client_tls(ca, None, tmp_path / "n")
                assert await http.refused(*inbound, tls=no_cert)
                await check_any_mode()
                assert await through_mesh("critical")
