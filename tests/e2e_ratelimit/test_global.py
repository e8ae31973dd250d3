"""Issue 5, #3, through Envoy: the global limit via the rate-limit service and Redis.

``llama`` allows each calling identity 9 sheddable requests per hour
(``global-rate-limit: sheddable=0.0025``; an hour-long window, so it cannot roll over
mid-test). The caller's sidecar asks the control plane's rate-limit service, which counts
in Redis: exactly 9 get through, the rest get 429, and critical is not limited. Then Redis
is stopped: the service fails open or closed, as configured, and its metrics say so.
(Two service replicas sharing Redis within +/-5 % is shown in tests/ratelimit.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.model import PRIORITY_HEADER
from ratelimit.counters import FailureMode
from tests.e2e_mtls.harness import (
    SERVICE_PORT,
    Http,
    Sidecar,
    inference_service,
    llama_pod,
    running,
    workload_pod,
    write_manifests,
)
from tests.e2e_ratelimit.conftest import RedisServer
from tests.e2e_ratelimit.harness import admin_get, control_plane, sample, serve_settings
from tests.support.backends import echo_server
from tests.support.envoy import require_envoy
from tests.support.wait import eventually
from xds_server.rls.runtime import RateLimitSettings

pytestmark = pytest.mark.envoy

GPU, CHAT = "127.0.72.1", "127.0.72.10"
LLAMA = f"llama:{SERVICE_PORT}"
PER_HOUR = 9


@pytest.mark.parametrize("mode", [FailureMode.OPEN, FailureMode.CLOSED])
async def test_global_limit_through_envoy_and_redis_then_redis_down(
    tmp_path: Path, redis_server: RedisServer, mode: FailureMode
) -> None:
    require_envoy()
    manifest = tmp_path / "mesh.yaml"
    http = Http()
    async with echo_server("gpu-0", host=GPU) as backend:
        write_manifests(
            manifest,
            [
                inference_service(
                    "llama", {"inferlane.io/global-rate-limit": f"sheddable={PER_HOUR / 3600}"}
                ),
                llama_pod("gpu-0", GPU, backend.port),
                workload_pod("chat-0", ip=CHAT, service_account="chat"),
            ],
        )
        limits = RateLimitSettings(
            rls_port=0,
            redis_url=redis_server.url,
            failure_mode=mode,
            rls_timeout_s=1.0,
            redis_timeout_s=0.5,
        )
        client = Sidecar(CHAT, "chat-0")
        async with (
            control_plane(manifest, serve_settings(tmp_path / "ca", limits)) as plane,
            running(client.options(plane.ports["xds"], service_account="chat")) as envoy,
        ):
            assert plane.ports["rls"] > 0

            async def send(priority: str) -> int:
                status, _ = await http.get(
                    CHAT, client.outbound_port, LLAMA, headers={PRIORITY_HEADER: priority}
                )
                return status

            async def routed() -> bool:
                return await send("critical") == 200

            await eventually(routed, timeout=15, what="routing through the sidecar")
            assert "inferlane-rls" in await envoy.admin_get("/clusters")

            shed = [await send("sheddable") for _ in range(PER_HOUR + 4)]
            assert shed == [200] * PER_HOUR + [429] * 4
            assert [await send("critical") for _ in range(5)] == [200] * 5
            metrics = await admin_get(plane, "/metrics")
            assert sample(metrics, "inferlane_ratelimit_backend_up", backend="redis") == 1
            rule = "inferlane.service_default/llama.caller.priority_sheddable"
            over = sample(
                metrics,
                "inferlane_ratelimit_decisions_total",
                descriptor=rule,
                result="over_limit",
            )
            assert over == 4

            redis_server.stop()
            expected = 200 if mode is FailureMode.OPEN else 429
            assert [await send("sheddable") for _ in range(3)] == [expected] * 3
            metrics = await admin_get(plane, "/metrics")
            assert sample(metrics, "inferlane_ratelimit_backend_up", backend="redis") == 0
            assert (sample(metrics, "inferlane_ratelimit_redis_errors_total") or 0) >= 3
            assert sample(metrics, "inferlane_ratelimit_failure_mode", mode=str(mode)) == 1
            decided = sample(
                metrics, "inferlane_ratelimit_failure_mode_decisions_total", mode=str(mode)
            )
            assert decided is not None and decided >= 3
            debug = await admin_get(plane, "/debug/ratelimits")
            assert '"backend_up": false' in debug
            assert f'"failure_mode": "{mode}"' in debug
