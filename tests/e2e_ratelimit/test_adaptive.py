"""Issue 5, #2: adaptive limits follow one backend's saturation, and only its config moves.

Two simulated GPU pods (bench/gpu_sim.py, 2 slots, 100 ms per request) serve ``llama``
(``adaptive: "true"``, ``rate-limit: sheddable=20``, ``max-concurrency: "8"``), each
behind its own sidecar. The control plane scrapes their vLLM gauges every 100 ms, with a
controller tuned to react in tenths of seconds. Load sent straight to gpu-0 fills its
queue:

- gpu-0's sheddable bucket and its sheddable concurrency cap (4: half of 8) tighten, in
  its own sidecar, within a few seconds;
- once the load stops it recovers to the annotation's rate;
- the number of changes stays within the controller's budget, and gpu-0's sidecar takes
  at most one route update per change;
- gpu-1's sidecar and the caller's sidecar never see a new resource version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import aiohttp
import pytest

from bench.gpu_sim import RunningSim, SimConfig, StepCost, start_sim
from mesh.model import PRIORITY_HEADER, Priority
from ratelimit.adaptive import AdaptiveSettings
from tests.e2e.harness import envoy_versions
from tests.e2e_mtls.harness import (
    SERVICE_PORT,
    Sidecar,
    inference_service,
    llama_pod,
    running,
    workload_pod,
    write_manifests,
)
from tests.e2e_ratelimit.harness import (
    admin_get,
    control_plane,
    inbound_bucket_ms,
    inbound_cap,
    rds_updates,
    sample,
    serve_settings,
)
from tests.support.envoy import require_envoy
from tests.support.wait import eventually
from xds_server.rls.runtime import RateLimitSettings

pytestmark = pytest.mark.envoy

GPU0, GPU1, CHAT = "127.0.73.1", "127.0.73.2", "127.0.73.10"
LLAMA = f"llama:{SERVICE_PORT}"
#: The annotation's 20 rps is one token per 50 ms.
FULL_MS = 50.0
#: Sheddable's share of max-concurrency 8.
FULL_CAP = 4
CHANGES_PER_MINUTE = 60.0
CONTROLLER = AdaptiveSettings(
    tighten_hold_s=0.3, loosen_hold_s=0.4, max_changes_per_minute=CHANGES_PER_MINUTE
)
WORKERS = 12


def _sim(name: str, host: str) -> SimConfig:
    return SimConfig(name=name, host=host, max_num_seqs=2, cost=StepCost.flat(10.0))


async def _flood(session: aiohttp.ClientSession, sim: RunningSim) -> None:
    """Keep WORKERS requests of 100 ms each in flight at ``sim``: a queue of about 10."""
    body = {"model": "llama", "prompt": "busy", "max_tokens": 10}

    async def worker() -> None:
        while True:
            async with session.post(sim.url + "/v1/completions", json=body) as resp:
                await resp.read()

    await asyncio.gather(*(worker() for _ in range(WORKERS)))


async def test_adaptive_limits_tighten_and_recover_on_one_endpoint(tmp_path: Path) -> None:
    require_envoy()
    manifest = tmp_path / "mesh.yaml"
    sim0 = await start_sim(_sim("gpu-0", GPU0))
    sim1 = await start_sim(_sim("gpu-1", GPU1))
    try:
        write_manifests(
            manifest,
            [
                inference_service(
                    "llama",
                    {
                        "inferlane.io/adaptive": "true",
                        "inferlane.io/rate-limit": "sheddable=20",
                        "inferlane.io/max-concurrency": "8",
                    },
                ),
                llama_pod("gpu-0", GPU0, sim0.port),
                llama_pod("gpu-1", GPU1, sim1.port),
                workload_pod("chat-0", ip=CHAT, service_account="chat"),
            ],
        )
        limits = RateLimitSettings(scrape_interval_s=0.1, scrape_timeout_s=0.5, adaptive=CONTROLLER)
        gpu0, gpu1, chat = Sidecar(GPU0, "gpu-0"), Sidecar(GPU1, "gpu-1"), Sidecar(CHAT, "chat-0")
        async with (
            control_plane(manifest, serve_settings(tmp_path / "ca", limits)) as plane,
            running(gpu0.options(plane.ports["xds"], service_account="llama")) as envoy0,
            running(gpu1.options(plane.ports["xds"], service_account="llama")) as envoy1,
            running(chat.options(plane.ports["xds"], service_account="chat")) as client,
            aiohttp.ClientSession() as session,
        ):
            key0 = f"default/gpu-0:{sim0.port}"
            assert set(plane.ratelimits.targets) == {key0, f"default/gpu-1:{sim1.port}"}

            async def settled() -> bool:
                url = f"http://{CHAT}:{chat.outbound_port}/v1/completions"
                headers = {"Host": LLAMA, PRIORITY_HEADER: "critical"}
                body = {"model": "llama", "prompt": "hi", "max_tokens": 1}
                async with session.post(url, json=body, headers=headers) as resp:
                    status = resp.status
                return (
                    status == 200
                    and await inbound_bucket_ms(envoy0, "sheddable") == FULL_MS
                    and await inbound_bucket_ms(envoy1, "sheddable") == FULL_MS
                    and await inbound_cap(envoy0, "sheddable") == FULL_CAP
                )

            await eventually(settled, timeout=15, what="both sidecars configured")
            before = {"gpu-1": await envoy_versions(envoy1), "chat": await envoy_versions(client)}
            updates_before = await rds_updates(envoy0)
            began = time.monotonic()

            flood = asyncio.create_task(_flood(session, sim0), name="flood-gpu-0")
            try:

                async def tightened() -> bool:
                    ms = await inbound_bucket_ms(envoy0, "sheddable")
                    cap = await inbound_cap(envoy0, "sheddable")
                    return ms is not None and ms > FULL_MS and cap is not None and cap < FULL_CAP

                await eventually(tightened, timeout=10, what="gpu-0's sheddable limits tighten")
            finally:
                flood.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flood
            assert plane.ratelimits.controller.multipliers(key0)[Priority.SHEDDABLE] < 1.0

            async def recovered() -> bool:
                mult = plane.ratelimits.controller.multipliers(key0)
                return (
                    all(m == 1.0 for m in mult.values())
                    and await inbound_bucket_ms(envoy0, "sheddable") == FULL_MS
                    and await inbound_cap(envoy0, "sheddable") == FULL_CAP
                )

            await eventually(recovered, timeout=20, interval=0.1, what="gpu-0 recovers")
            elapsed = time.monotonic() - began

            state = plane.ratelimits.controller.snapshot().endpoints[key0]
            assert state.changes >= 2  # at least one tightening and one loosening
            assert state.changes <= CHANGES_PER_MINUTE * (1 + elapsed / 60)
            # Each change is at most one route update (simultaneous ones are folded).
            assert 2 <= await rds_updates(envoy0) - updates_before <= state.changes
            after = {"gpu-1": await envoy_versions(envoy1), "chat": await envoy_versions(client)}
            assert after == before

            metrics = await admin_get(plane, "/metrics")
            assert (sample(metrics, "inferlane_adaptive_pushes_total") or 0) >= 2
            assert sample(metrics, "inferlane_adaptive_limit_changes_total", direction="tighten")
            debug = json.loads(await admin_get(plane, "/debug/ratelimits"))
            (entry,) = [e for e in debug["adaptive"]["endpoints"] if e["endpoint"] == key0]
            assert entry["last_change_reason"].startswith("loosen")
            assert entry["rates"] == {"sheddable": 20.0}
            assert entry["concurrency"] == {"standard": 6, "sheddable": FULL_CAP}
    finally:
        await sim0.stop()
        await sim1.stop()
