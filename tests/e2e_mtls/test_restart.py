"""A control plane restarted with the same ``--ca-dir`` keeps its root (issue 4, #4).

Two sidecars talk over mTLS; the control plane stops and a new one starts on the same
port and CA directory. The sidecars reconnect; the new control plane derives the very
certificates they hold until each one's renewal period ends, then renews them, signed by
the same root: every Envoy still holds the one root it had, and new handshakes with the
renewed certificates succeed while requests keep flowing. (That nothing is re-sent on a
restart is tested with ``inferlane serve`` itself, in tests/e2e/test_restart.py.)

Certificates live ten seconds here, so they are renewed every five, connections are
recycled every few seconds and new handshakes come quickly.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from bench.envoy import Envoy
from bench.testbed import free_port
from tests.e2e_mtls.harness import (
    SERVICE_PORT,
    Http,
    Sidecar,
    certs,
    control_plane,
    inference_service,
    listener_handshakes,
    llama_pod,
    own_serials,
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

GPU, CHAT = "127.0.54.1", "127.0.54.10"
LLAMA = f"llama:{SERVICE_PORT}"


async def _roots(envoy: Envoy) -> set[str]:
    return set((await certs(envoy))["ca"])


async def test_restart_with_the_same_ca_dir_keeps_trust(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_envoy()
    manifest = tmp_path / "mesh.yaml"
    http = Http()
    xds_port = free_port("127.0.0.1")
    serve = settings(tmp_path / "ca", cert_ttl=timedelta(seconds=10), xds_port=xds_port)
    async with echo_server("gpu-0", host=GPU) as backend:
        write_manifests(
            manifest,
            [
                inference_service("llama", {"inferlane.io/mtls": "strict"}),
                llama_pod("gpu-0", GPU, backend.port),
                workload_pod("chat-0", ip=CHAT, service_account="chat"),
            ],
        )
        server, client = Sidecar(GPU, "gpu-0"), Sidecar(CHAT, "chat-0")

        async def served() -> bool:
            return await http.get(CHAT, client.outbound_port, LLAMA) == (200, "gpu-0")

        async with (
            running(server.options(xds_port)) as server_envoy,
            running(client.options(xds_port)) as client_envoy,
        ):
            async with control_plane(manifest, serve) as first:
                assert first.secrets is not None
                root = first.secrets.ca.root_fingerprint
                await eventually(served, timeout=20, what="mTLS through the first control plane")
                roots = await _roots(client_envoy)
                assert roots == await _roots(server_envoy) and len(roots) == 1
                before = {
                    "client": await own_serials(client_envoy, spiffe("chat")),
                    "server": await own_serials(server_envoy, spiffe("llama")),
                }
            # The data plane keeps serving on its cached config while no control plane runs.
            assert await served()

            async with control_plane(manifest, serve) as second:
                assert second.secrets is not None
                assert second.secrets.ca.root_fingerprint == root

                async def renewed() -> bool:
                    client_now = await own_serials(client_envoy, spiffe("chat"))
                    server_now = await own_serials(server_envoy, spiffe("llama"))
                    return bool(client_now - before["client"]) and bool(
                        server_now - before["server"]
                    )

                await eventually(
                    renewed, timeout=20, what="certificates renewed by the second plane"
                )
                assert await _roots(client_envoy) == roots
                assert await _roots(server_envoy) == roots

                # New handshakes, with the new certificates, against the unchanged root.
                handshakes = await listener_handshakes(server_envoy)

                async def new_handshake_served() -> bool:
                    assert await served()
                    return await listener_handshakes(server_envoy) > handshakes

                await eventually(new_handshake_served, timeout=20, what="a new handshake")
