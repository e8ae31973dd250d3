"""The inbound sidecar reaches its workload over loopback (issue 11, #12).

The model server listens on 127.0.0.1 only, as a workload that trusts its sidecar would:
nothing listens at its pod IP. The pod's sidecar leaves ``INFERLANE_WORKLOAD_ADDRESS`` at
its default, so a caller's request reaches the model server through the two sidecars over
mTLS, while a direct call to the pod's IP finds nothing to talk to.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.model import PRIORITY_HEADER
from tests.e2e_mtls.harness import (
    SERVICE_PORT,
    XFCC,
    Http,
    Sidecar,
    control_plane,
    header,
    inference_service,
    llama_pod,
    running,
    settings,
    workload_pod,
    write_manifests,
)
from tests.support.backends import echo_server
from tests.support.envoy import require_envoy
from tests.support.wait import eventually

pytestmark = pytest.mark.envoy

GPU, CHAT = "127.0.57.1", "127.0.57.10"


async def test_the_sidecar_forwards_to_a_workload_listening_on_loopback_only(
    tmp_path: Path,
) -> None:
    require_envoy()
    manifest = tmp_path / "mesh.yaml"
    http = Http()
    async with echo_server("gpu-0", host="127.0.0.1") as backend:
        write_manifests(
            manifest,
            [
                inference_service("llama", {"inferlane.io/mtls": "strict"}),
                llama_pod("gpu-0", GPU, backend.port),
                workload_pod("chat-0", ip=CHAT, service_account="chat"),
            ],
        )
        server = Sidecar(GPU, "gpu-0", workload_address="127.0.0.1")
        client = Sidecar(CHAT, "chat-0")
        async with (
            control_plane(manifest, settings(tmp_path / "ca")) as plane,
            running(server.options(plane.ports["xds"])),
            running(client.options(plane.ports["xds"])),
        ):

            async def served() -> bool:
                status, body = await http.get(
                    CHAT,
                    client.outbound_port,
                    f"llama:{SERVICE_PORT}",
                    headers={PRIORITY_HEADER: "standard"},
                )
                return status == 200 and body == "gpu-0"

            await eventually(served, timeout=20, what="llama through both sidecars")
            assert backend.requests >= 1
            # The pod's own IP has no listener on the workload's port: only the sidecar's
            # inbound port is there for other pods.
            assert await http.refused(GPU, backend.port)
            # It came through the inbound sidecar, which sets the verified caller.
            xfcc = header(backend.headers[-1], XFCC)
            assert xfcc is not None and "spiffe://cluster.local/ns/default/sa/chat" in xfcc
