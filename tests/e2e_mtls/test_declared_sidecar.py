"""A pod whose manifest declares the sidecar is reached over mTLS through it from the start.

``gpu-0`` runs ``llama``'s model server and declares the ``inferlane-proxy`` container,
as ``inferlane inject`` writes it. Before that sidecar has ever connected, the caller's
Envoy already addresses the endpoint at the pod IP and the sidecar's inbound port
(15006), with the mTLS transport socket; when the sidecar starts, requests flow through
it over mTLS, and the caller is sent nothing at all: its sidecar connecting changed no
endpoint (nor will a control-plane restart, before it reconnects).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mesh.proxy import DEFAULT_INBOUND_PORT
from tests.e2e.harness import admin_text
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
    spiffe,
    workload_pod,
    write_manifests,
)
from tests.support.backends import echo_server
from tests.support.envoy import require_envoy
from tests.support.wait import eventually

pytestmark = pytest.mark.envoy

GPU, CHAT = "127.0.58.1", "127.0.58.10"
LLAMA = f"llama:{SERVICE_PORT}"
STANDARD = f"outbound|{SERVICE_PORT}|standard|llama.default.svc.cluster.local"


async def _hosts(envoy: Any, cluster: str) -> set[str]:
    """``ADDRESS:PORT`` of every host Envoy holds for ``cluster``."""
    return {
        f"{h['address']['socket_address']['address']}:{h['address']['socket_address']['port_value']}"
        for h in await envoy.host_statuses(cluster)
    }


async def _sent(plane: Any, node_id: str) -> dict[str, str]:
    """The last nonce sent to ``node_id`` per type: unchanged means nothing was sent."""
    entries = json.loads(await admin_text(plane, "/debug/syncz"))
    (entry,) = [e for e in entries if e["node_id"] == node_id]
    return {t: s["nonce"] for t, s in entry["types"].items()}


async def test_a_declared_sidecar_is_used_before_it_connects_and_sends_callers_nothing(
    tmp_path: Path,
) -> None:
    require_envoy()
    manifest = tmp_path / "mesh.yaml"
    http = Http()
    async with echo_server("gpu-0", host=GPU) as backend:
        write_manifests(
            manifest,
            [
                inference_service("llama"),
                llama_pod("gpu-0", GPU, backend.port, sidecar=True),
                workload_pod("chat-0", ip=CHAT, service_account="chat", sidecar=True),
            ],
        )
        client = Sidecar(CHAT, "chat-0")
        server = Sidecar(GPU, "gpu-0", inbound_port=DEFAULT_INBOUND_PORT)
        async with control_plane(manifest, settings(tmp_path / "ca")) as plane:
            xds_port = plane.ports["xds"]
            async with running(client.options(xds_port)) as client_envoy:

                async def through_the_sidecar() -> bool:
                    return await _hosts(client_envoy, STANDARD) == {f"{GPU}:{DEFAULT_INBOUND_PORT}"}

                await eventually(through_the_sidecar, timeout=20, what="the declared sidecar")
                dump = json.loads(await client_envoy.admin_get("/config_dump"))
                assert "tlsMode-istio" in json.dumps(dump), "no mTLS transport socket match"
                before = await _sent(plane, client.node_id)

                async with running(server.options(xds_port)) as server_envoy:
                    # In a cluster the pod turns Ready once its sidecar listens (the injected
                    # probe); here the world calls it Ready already, so wait for the listener
                    # rather than have the caller eject a host that refuses connections.
                    await server_envoy.listener_port("virtualInbound")

                    async def served() -> bool:
                        return await http.get(CHAT, client.outbound_port, LLAMA) == (200, "gpu-0")

                    await eventually(served, timeout=20, what="llama through its sidecar")
                    # Through the sidecar, over mTLS: it vouches for the caller's identity.
                    assert f"URI={spiffe('chat')}" in (header(backend.headers[-1], XFCC) or "")
                    assert await _sent(plane, client.node_id) == before
