"""The caller clamp through real sidecars: an unlisted caller cannot get ``critical``.

``llama`` names ``default/chat-frontend`` as its only critical caller. Two client
sidecars send the same ``critical`` requests: the listed one's arrive as critical through
the critical cluster; the other's own sidecar rewrites the class to ``standard`` and
sends them through the standard cluster. (The server side's 403 needs mTLS.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.envoy import Envoy
from mesh.manifests import ManifestSource
from mesh.model import PRIORITIES, PRIORITY_HEADER
from routing.names import outbound_cluster
from tests.e2e.harness import (
    Client,
    control_plane,
    header,
    http_session,
    inference_service,
    model_pod,
    sidecar,
    write_manifests,
)
from tests.support.backends import echo_server
from tests.support.envoy import require_envoy, running_envoy
from tests.support.wait import eventually

pytestmark = pytest.mark.envoy

GPU0 = "127.0.32.1"
LISTED, UNLISTED = "127.0.32.10", "127.0.32.11"
HOST = "llama.default.svc.cluster.local"
LLAMA = f"{HOST}:8000"
REQUESTS = 12


async def _rq_total(envoy: Envoy) -> dict[str, int]:
    """``cluster.<name>.upstream_rq_total`` per outbound class cluster of llama."""
    text = await envoy.admin_get("/stats?filter=upstream_rq_total")
    out: dict[str, int] = {}
    wanted = {f"cluster.{outbound_cluster(8000, p, HOST)}.upstream_rq_total": p for p in PRIORITIES}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key in wanted:
            out[wanted[key].value] = int(value)
    return out


async def test_unlisted_caller_is_lowered_to_standard(tmp_path: Path) -> None:
    require_envoy()
    manifest = tmp_path / "cluster.yaml"
    async with echo_server("gpu-0", host=GPU0) as gpu0:
        write_manifests(
            manifest,
            [
                inference_service(
                    "llama", annotations={"inferlane.io/critical-callers": "default/chat-frontend"}
                ),
                model_pod("gpu-0", app="llama", ip=GPU0, port=gpu0.port, gpu=True),
            ],
        )
        listed_id, listed_meta, listed_port = sidecar(
            LISTED, "chat-0", service_account="chat-frontend"
        )
        unlisted_id, unlisted_meta, unlisted_port = sidecar(
            UNLISTED, "batch-0", service_account="batch"
        )
        async with (
            control_plane(ManifestSource(manifest)) as plane,
            running_envoy(listed_id, plane.ports["xds"], metadata=listed_meta) as listed,
            running_envoy(unlisted_id, plane.ports["xds"], metadata=unlisted_meta) as unlisted,
            http_session() as session,
        ):
            for envoy, client, expected in (
                (unlisted, Client(session, UNLISTED, unlisted_port), "standard"),
                (listed, Client(session, LISTED, listed_port), "critical"),
            ):
                await client.wait_served_by(LLAMA, ["gpu-0"], priority="critical")
                before = await _rq_total(envoy)
                gpu0.headers.clear()
                seen = await client.served(LLAMA, "CRITICAL", count=REQUESTS)
                assert seen == ["gpu-0"] * REQUESTS

                received = {header(h, PRIORITY_HEADER) for h in gpu0.headers}
                assert received == {expected}

                async def counted(
                    envoy: Envoy = envoy, before: dict[str, int] = before, expected: str = expected
                ) -> bool:
                    after = await _rq_total(envoy)
                    grown = {c: after.get(c, 0) - before.get(c, 0) for c in after}
                    return grown.get(expected) == REQUESTS

                await eventually(counted, timeout=5, what=f"{expected} cluster counted")
                after = await _rq_total(envoy)
                other = "critical" if expected == "standard" else "standard"
                assert after.get(other, 0) == before.get(other, 0)
