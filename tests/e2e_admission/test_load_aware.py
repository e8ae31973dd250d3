"""Issue 10, "What it must show" 4: the EDS-weight path moves traffic away from a pod
whose queue grows.

Two GPU pods serve llama. gpu-0 runs one sequence at a time and is given nine long
requests straight to the pod, so eight wait in its queue. The control plane scrapes the
queue, and every caller's EDS gives gpu-0 a weight of 8 against gpu-1's 128; the caller's
sidecar then sends new requests to gpu-1 almost always, although its own in-flight counts
to both pods are equal. Counted by the caller's own Envoy, per host.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.envoy import Envoy
from tests.e2e_admission.harness import (
    OUTBOUND_CLUSTER,
    complete,
    mesh,
    sim,
    sim_stats,
)
from tests.support.envoy import require_envoy
from tests.support.wait import eventually
from xds_server.rls.runtime import RateLimitSettings

pytestmark = pytest.mark.envoy

GPU0, GPU1 = "127.0.96.1", "127.0.96.2"
REQUESTS = 40


async def _hosts(envoy: Envoy, cluster: str) -> dict[str, dict[str, Any]]:
    """Host IP -> {weight, requests} of one cluster, as the caller's Envoy holds them."""
    out = {}
    for host in await envoy.host_statuses(cluster):
        stats = {s["name"]: int(s.get("value", 0)) for s in host.get("stats", [])}
        ip = host["address"]["socket_address"]["address"]
        out[ip] = {"weight": host.get("weight", 1), "requests": stats.get("rq_total", 0)}
    return out


async def test_traffic_moves_away_from_a_pod_whose_queue_grows(tmp_path: Path) -> None:
    require_envoy()
    pods = [sim("gpu-0", GPU0, max_num_seqs=1), sim("gpu-1", GPU1)]
    settings = RateLimitSettings(scrape_interval_s=0.2, queue_weights=True)
    cluster = OUTBOUND_CLUSTER.format("standard")
    async with (
        mesh(tmp_path, {}, pods, ["127.0.96.10"], ratelimit=settings) as m,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        caller = m.caller_envoys[0]
        assert {h["weight"] for h in (await _hosts(caller, cluster)).values()} == {1}
        queued = m.pods["gpu-0"]
        fillers = [
            asyncio.create_task(complete(session, queued.url, "standard", 500)) for _ in range(9)
        ]

        async def weighed() -> bool:
            hosts = await _hosts(caller, cluster)
            return bool(hosts.get(GPU0, {}).get("weight") == 8 and hosts[GPU1]["weight"] == 128)

        await eventually(weighed, timeout=15, what="gpu-0 weighed down in the caller's EDS")
        assert (await sim_stats(queued))["waiting"] == 8
        before = await _hosts(caller, cluster)
        sent = [
            asyncio.create_task(complete(session, m.caller_url(), "standard", 2))
            for _ in range(REQUESTS)
        ]

        async def all_routed() -> bool:
            hosts = await _hosts(caller, cluster)
            routed = sum(int(h["requests"]) - before[ip]["requests"] for ip, h in hosts.items())
            return bool(routed >= REQUESTS)

        await eventually(all_routed, timeout=15, what="every request routed")
        after = await _hosts(caller, cluster)
        to_queued = after[GPU0]["requests"] - before[GPU0]["requests"]
        assert to_queued <= REQUESTS // 5, after  # 8 against 128: about 1 in 17
        for task in (*fillers, *sent):
            task.cancel()
        await asyncio.gather(*fillers, *sent, return_exceptions=True)
