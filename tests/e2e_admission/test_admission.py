"""Issue 10, "What it must show" 1 and 2: admission at the pod, and retries elsewhere.

1. Eight calling sidecars send sheddable at one GPU pod. The pod's own sidecar admits at
   most sheddable's cap across all of them (``max-concurrency: "8"``: half, 4), read from
   the pod; the rest are refused at once with 503 and ``x-inferlane-refused:
   concurrency``. A critical request sent meanwhile gets a slot at once.
2. A request refused by a full pod is retried by the caller's sidecar on the other pod,
   and succeeds: sheddable's only retry.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from bench.gpu_sim import SERVED_BY_HEADER
from mesh.model import REFUSED_HEADER, Refusal
from tests.e2e_admission.harness import (
    INBOUND_CLUSTER,
    OUTBOUND_CLUSTER,
    complete,
    counter,
    mesh,
    sim,
    sim_stats,
)
from tests.support.envoy import require_envoy
from tests.support.wait import eventually

pytestmark = pytest.mark.envoy

SHEDDABLE = "sheddable"
#: Envoy's count of requests refused over a cluster's max_requests.
OVERFLOW = "upstream_rq_active_overflow"


async def test_eight_callers_cannot_hold_more_than_the_pods_sheddable_cap(
    tmp_path: Path,
) -> None:
    require_envoy()
    cap = 4  # max-concurrency 8, of which sheddable's share is half
    callers = [f"127.0.91.{10 + i}" for i in range(8)]
    pods = [sim("gpu-0", "127.0.91.1", step_ms=20)]
    async with (
        mesh(tmp_path, {"inferlane.io/max-concurrency": "8"}, pods, callers) as m,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        pod = m.pods["gpu-0"]
        # Three long sheddable requests (200 tokens: 4 s) from each of the eight callers.
        shed = [
            asyncio.create_task(complete(session, m.caller_url(i), SHEDDABLE, 200))
            for i in range(len(callers))
            for _ in range(3)
        ]

        async def at_cap() -> bool:
            return int((await sim_stats(pod))["in_flight"].get(SHEDDABLE, 0)) >= cap

        await eventually(at_cap, timeout=15, what="the pod holding its sheddable cap")
        # Critical gets a slot at once while sheddable holds its cap.
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, _, _ = await complete(session, m.caller_url(3), "critical", 5)
        critical_s = loop.time() - started
        during = await sim_stats(pod)
        results = await asyncio.gather(*shed)

        assert status == 200
        assert critical_s < 2.0, critical_s  # 5 tokens at 20 ms; sheddable takes 4 s
        assert during["in_flight"].get(SHEDDABLE) == cap
        stats = await sim_stats(pod)
        assert stats["peak_in_flight"][SHEDDABLE] == cap
        assert stats["peak_in_flight"]["critical"] >= 1
        served = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] != 200]
        assert len(served) >= cap and len(refused) >= len(results) - 2 * cap, (served, refused)
        for code, headers, _ in refused:
            assert (code, headers.get(REFUSED_HEADER)) == (503, Refusal.CONCURRENCY)
        # Refused by the pod's own sidecar, the one place every caller's requests meet;
        # each refused request was tried again (on the only pod there is) before failing.
        inbound = INBOUND_CLUSTER.format(SHEDDABLE)
        assert await counter(m.pod_envoys["gpu-0"], inbound, OVERFLOW) >= len(refused)


async def test_a_request_refused_by_a_full_pod_is_retried_on_another_and_succeeds(
    tmp_path: Path,
) -> None:
    require_envoy()
    pods = [sim("gpu-0", "127.0.92.1"), sim("gpu-1", "127.0.92.2")]
    annotations = {"inferlane.io/max-concurrency": "sheddable=2"}
    async with (
        mesh(tmp_path, annotations, pods, ["127.0.92.10"]) as m,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        full = m.pods["gpu-0"]
        # gpu-0 is full: two long sheddable requests, straight to its sidecar.
        held = [
            asyncio.create_task(complete(session, m.inbound_url("gpu-0"), SHEDDABLE, 400))
            for _ in range(2)
        ]

        async def gpu0_full() -> bool:
            return int((await sim_stats(full))["in_flight"].get(SHEDDABLE, 0)) == 2

        await eventually(gpu0_full, timeout=10, what="gpu-0 holding its sheddable cap")
        inbound = INBOUND_CLUSTER.format(SHEDDABLE)
        sent = 0
        # The caller's least-request choice is blind to gpu-0 being full: keep sending
        # until gpu-0 has refused at least one (about half of them, in practice).
        while sent < 10 or await counter(m.pod_envoys["gpu-0"], inbound, OVERFLOW) == 0:
            assert sent < 60, "the caller never picked gpu-0"
            status, headers, body = await complete(session, m.caller_url(), SHEDDABLE, 2)
            assert status == 200, (status, body)
            assert headers[SERVED_BY_HEADER] == "gpu-1"
            sent += 1
        outbound = OUTBOUND_CLUSTER.format(SHEDDABLE)
        assert await counter(m.caller_envoys[0], outbound, "upstream_rq_retry_success") >= 1
        assert (await sim_stats(full))["in_flight"].get(SHEDDABLE) == 2
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
