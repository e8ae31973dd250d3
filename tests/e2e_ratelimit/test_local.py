"""Issue 5, #1: a sheddable burst over the per-endpoint limit gets 429s; critical does not.

``llama`` admits 1 sheddable request per second per endpoint (``rate-limit:
sheddable=1``), and its default class is sheddable. The backend's own sidecar enforces
it. A burst of sheddable and critical requests at the same time, through the caller's
sidecar: sheddable gets 429 with ``x-envoy-ratelimited``, critical is untouched. Then
requests straight to the backend's inbound port without a class header (the catch-all
route) draw from the same sheddable bucket.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mesh.model import PRIORITY_HEADER
from tests.e2e_mtls.harness import (
    SERVICE_PORT,
    XFCC,
    Sidecar,
    header,
    inference_service,
    llama_pod,
    running,
    workload_pod,
    write_manifests,
)
from tests.e2e_ratelimit.harness import (
    control_plane,
    inbound_bucket_ms,
    serve_settings,
    statuses,
)
from tests.support.backends import echo_server
from tests.support.envoy import require_envoy
from tests.support.wait import eventually
from xds_server.rls.runtime import RateLimitSettings

pytestmark = pytest.mark.envoy

GPU, CHAT = "127.0.71.1", "127.0.71.10"
LLAMA = f"llama:{SERVICE_PORT}"
BURST = 20


async def _send(
    session: aiohttp.ClientSession, host: str, port: int, priority: str | None
) -> tuple[int, Any]:
    headers = {"Host": LLAMA}
    if priority is not None:
        headers[PRIORITY_HEADER] = priority
    async with session.get(f"http://{host}:{port}/v1/completions", headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers


async def test_sheddable_burst_is_limited_and_critical_is_untouched(tmp_path: Path) -> None:
    require_envoy()
    manifest = tmp_path / "mesh.yaml"
    async with echo_server("gpu-0", host=GPU) as backend:
        write_manifests(
            manifest,
            [
                inference_service(
                    "llama",
                    {
                        "inferlane.io/rate-limit": "sheddable=1",
                        "inferlane.io/default-priority": "sheddable",
                        "inferlane.io/critical-callers": "default/chat",
                    },
                ),
                llama_pod("gpu-0", GPU, backend.port),
                workload_pod("chat-0", ip=CHAT, service_account="chat"),
            ],
        )
        server, client = Sidecar(GPU, "gpu-0"), Sidecar(CHAT, "chat-0")
        settings = serve_settings(tmp_path / "ca", RateLimitSettings())
        async with (
            control_plane(manifest, settings) as plane,
            running(server.options(plane.ports["xds"], service_account="llama")) as server_envoy,
            running(client.options(plane.ports["xds"], service_account="chat")),
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        ):

            async def through_mesh() -> bool:
                status, _ = await _send(session, CHAT, client.outbound_port, "critical")
                return status == 200 and bool(header(backend.headers[-1], XFCC))

            await eventually(through_mesh, timeout=15, what="critical through both sidecars")
            # One token per second, and a bucket one token deep.
            assert await inbound_bucket_ms(server_envoy, "sheddable") == 1000.0
            assert await inbound_bucket_ms(server_envoy, "critical") is None

            shed = [_send(session, CHAT, client.outbound_port, "sheddable") for _ in range(BURST)]
            crit = [_send(session, CHAT, client.outbound_port, "critical") for _ in range(BURST)]
            results = await asyncio.gather(*shed, *crit)
            shed_results, crit_results = results[:BURST], results[BURST:]
            assert statuses(crit_results) == {200: BURST}
            counted = statuses(shed_results)
            # The bucket holds 1 and refills 1 per second: a burst this short gets 1 or 2.
            assert counted.get(429, 0) >= BURST - 3, counted
            assert set(counted) <= {200, 429}, counted
            for status, headers in shed_results:
                if status == 429:
                    assert headers.get("x-envoy-ratelimited") == "true"
            limited = await server_envoy.stats("rate_limited")
            assert any(v >= BURST - 3 for k, v in limited.items() if "local_rate_limit" in k)

            # Plaintext callers without a class header hit the inbound catch-all route:
            # the default class, sheddable, and the same bucket.
            direct = [_send(session, GPU, server.inbound_port, p) for p in [None, "sheddable"] * 5]
            counted = statuses(await asyncio.gather(*direct))
            assert counted.get(429, 0) >= 7, counted
