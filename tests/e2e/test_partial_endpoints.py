"""A SotW Envoy is sent the endpoints that changed, and keeps the others (the xDS protocol:
every type but listeners and clusters may be sent in part).

``llama`` and ``mistral`` each have a model pod. When llama's pod turns unready and
another takes its place, the Envoy (State of the World) gets a response carrying llama's
three class assignments only: mistral's stay as the first response left them (Envoy counts no
update of theirs), and both Services keep routing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh import xds
from mesh.manifests import ManifestSource
from tests.e2e.harness import (
    Client,
    control_plane,
    http_session,
    inference_service,
    metric,
    model_pod,
    sidecar,
    write_manifests,
)
from tests.support.backends import echo_server
from tests.support.envoy import require_envoy, running_envoy
from tests.support.wait import eventually

pytestmark = pytest.mark.envoy

LLAMA0, LLAMA1, MISTRAL0, CLIENT = "127.0.42.1", "127.0.42.2", "127.0.42.3", "127.0.42.10"
LLAMA = "llama.default.svc.cluster.local:8000"
MISTRAL = "mistral.default.svc.cluster.local:8000"


def _objects(ports: dict[str, int], llama_ready: str) -> list[dict[str, Any]]:
    return [
        inference_service("llama"),
        inference_service("mistral"),
        model_pod("llama-0", app="llama", ip=LLAMA0, port=ports["llama-0"], gpu=True,
                  ready=llama_ready == "llama-0"),
        model_pod("llama-1", app="llama", ip=LLAMA1, port=ports["llama-1"], gpu=True,
                  ready=llama_ready == "llama-1"),
        model_pod("mistral-0", app="mistral", ip=MISTRAL0, port=ports["mistral-0"], gpu=True),
    ]  # fmt: skip


async def _eds_updates(envoy: Any) -> dict[str, int]:
    """Per Service, the EDS updates its class clusters took (Envoy counts them per cluster)."""
    stats = await envoy.stats("cluster.outbound")
    out = {"llama": 0, "mistral": 0}
    for name, value in stats.items():
        if name.endswith(".update_success"):
            out["llama" if "|llama." in name else "mistral"] += value
    return out


async def test_a_sotw_envoy_is_sent_the_changed_endpoints_and_keeps_the_rest(
    tmp_path: Path,
) -> None:
    require_envoy()
    manifest = tmp_path / "cluster.yaml"
    async with (
        echo_server("llama-0", host=LLAMA0) as llama0,
        echo_server("llama-1", host=LLAMA1) as llama1,
        echo_server("mistral-0", host=MISTRAL0) as mistral0,
    ):
        ports = {"llama-0": llama0.port, "llama-1": llama1.port, "mistral-0": mistral0.port}
        write_manifests(manifest, _objects(ports, llama_ready="llama-0"))
        node_id, metadata, outbound = sidecar(CLIENT, "chat-0")
        async with (
            control_plane(ManifestSource(manifest, poll_interval=0.05)) as plane,
            running_envoy(node_id, plane.ports["xds"], metadata=metadata) as envoy,
            http_session() as session,
        ):
            client = Client(session, CLIENT, outbound)
            await client.wait_served_by(LLAMA, ["llama-0"])
            await client.wait_served_by(MISTRAL, ["mistral-0"])
            before = await _eds_updates(envoy)
            sent = metric(plane, "inferlane_xds_resources_sent_total", type=xds.short(xds.ENDPOINT))

            write_manifests(manifest, _objects(ports, llama_ready="llama-1"))
            await client.wait_served_by(LLAMA, ["llama-1"])

            async def llama_updated() -> bool:
                return (await _eds_updates(envoy))["llama"] == before["llama"] + 3

            await eventually(llama_updated, timeout=10, what="llama's three assignments updated")
            # Mistral's assignments were not in the response: Envoy kept them as they were.
            assert (await _eds_updates(envoy))["mistral"] == before["mistral"]
            after_sent = metric(
                plane, "inferlane_xds_resources_sent_total", type=xds.short(xds.ENDPOINT)
            )
            assert after_sent - sent == 3  # llama's three classes, nothing of mistral's
            assert await client.served(MISTRAL, count=5) == ["mistral-0"] * 5
