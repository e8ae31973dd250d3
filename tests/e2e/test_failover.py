"""GPU-backed pods first; critical fails over to the CPU pod and back, from manifests.

Two GPU-backed pods (one requests ``nvidia.com/gpu``, the other runs on a Node labelled
``nvidia.com/gpu.present``) and one CPU pod serve ``llama``. A real Envoy sidecar routes
by what the control plane makes of the manifest file, which the test rewrites as a
kubelet would flip the Pods' Ready condition.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from mesh.manifests import ManifestSource
from tests.e2e.harness import (
    Client,
    control_plane,
    http_session,
    inference_service,
    model_pod,
    node,
    sidecar,
    write_manifests,
)
from tests.support.backends import echo_server
from tests.support.envoy import require_envoy, running_envoy

pytestmark = pytest.mark.envoy

GPU0, GPU1, CPU0 = "127.0.31.1", "127.0.31.2", "127.0.31.3"
CLIENT = "127.0.31.10"
LLAMA = "llama.default.svc.cluster.local:8000"
CLASSES = ("critical", "standard")


def _objects(ports: Mapping[str, int], ready: Mapping[str, bool]) -> list[dict[str, Any]]:
    return [
        node("gpu-node", gpu=True),
        node("cpu-node"),
        inference_service("llama"),
        model_pod("gpu-0", app="llama", ip=GPU0, port=ports["gpu-0"], gpu=True,
                  ready=ready["gpu-0"], node_name="cpu-node"),
        model_pod("gpu-1", app="llama", ip=GPU1, port=ports["gpu-1"],
                  ready=ready["gpu-1"], node_name="gpu-node"),
        model_pod("cpu-0", app="llama", ip=CPU0, port=ports["cpu-0"], node_name="cpu-node"),
    ]  # fmt: skip


async def test_gpu_first_then_fallback_and_back(tmp_path: Path) -> None:
    require_envoy()
    manifest = tmp_path / "cluster.yaml"
    async with (
        echo_server("gpu-0", host=GPU0) as gpu0,
        echo_server("gpu-1", host=GPU1) as gpu1,
        echo_server("cpu-0", host=CPU0) as cpu0,
    ):
        ports = {"gpu-0": gpu0.port, "gpu-1": gpu1.port, "cpu-0": cpu0.port}

        def write(**ready: bool) -> None:
            write_manifests(manifest, _objects(ports, {"gpu-0": True, "gpu-1": True, **ready}))

        write()
        node_id, metadata, outbound = sidecar(CLIENT, "chat-0")
        async with (
            control_plane(ManifestSource(manifest)) as plane,
            running_envoy(node_id, plane.ports["xds"], metadata=metadata),
            http_session() as session,
        ):
            client = Client(session, CLIENT, outbound)
            llama = plane.world.service("default", "llama") if plane.world else None
            assert llama is not None
            assert {(e.pod_name, e.gpu) for e in llama.endpoints} == {
                ("gpu-0", True),
                ("gpu-1", True),
                ("cpu-0", False),
            }

            # Every GPU-backed pod ready: both classes stay on them, and use both.
            for cls in CLASSES:
                await client.wait_served_by(LLAMA, ["gpu-0", "gpu-1"], priority=cls)
            seen = await client.served(LLAMA, "critical", count=20)
            seen += await client.served(LLAMA, "standard", count=20)
            assert set(seen) == {"gpu-0", "gpu-1"}
            assert cpu0.requests == 0

            # One GPU pod unready: the other takes everything, nothing spills to the CPU.
            write(**{"gpu-0": False})
            for cls in CLASSES:
                await client.wait_served_by(LLAMA, ["gpu-1"], priority=cls)
            seen = await client.served(LLAMA, "critical", count=20)
            seen += await client.served(LLAMA, "standard", count=20)
            assert set(seen) == {"gpu-1"}
            assert cpu0.requests == 0

            # No GPU pod ready: critical fails over to the fallback pod.
            write(**{"gpu-0": False, "gpu-1": False})
            await client.wait_served_by(LLAMA, ["cpu-0"], priority="critical")
            assert set(await client.served(LLAMA, "critical", count=20)) == {"cpu-0"}

            # The GPU pods recover: critical goes back to them, and the CPU pod rests.
            write()
            await client.wait_served_by(LLAMA, ["gpu-0", "gpu-1"], priority="critical")
            before = cpu0.requests
            seen = await client.served(LLAMA, "critical", count=20)
            assert set(seen) == {"gpu-0", "gpu-1"}
            assert cpu0.requests == before
