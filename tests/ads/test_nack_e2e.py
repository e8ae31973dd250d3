"""A resource Envoy rejects: visible everywhere, the last good version keeps serving."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.support.backends import echo_server
from tests.support.config import LISTENER_NAME, StaticConfig, StaticGenerator, serving
from tests.support.envoy import running_envoy
from tests.support.http import get
from tests.support.wait import eventually
from xds_server.admin import Admin, serving_admin
from xds_server.ads.cache import ConfigCache
from xds_server.cli.status import fetch_syncz, format_status

pytestmark = pytest.mark.envoy

NODE = "sidecar~127.0.0.1~client-0.default~default.svc.cluster.local"


async def _admin_json(port: int, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
        return await r.json()


async def _metrics(port: int) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        return await r.text()


@pytest.mark.parametrize("delta", [pytest.param(False, id="sotw"), pytest.param(True, id="delta")])
async def test_nack_is_reported_and_last_good_config_keeps_serving(delta: bool) -> None:
    async with echo_server("a") as a, echo_server("b") as b:
        cfg = StaticConfig(
            clusters={"a": [("127.0.0.1", a.port)], "b": [("127.0.0.1", b.port)]},
            route_cluster="a",
        )
        cache = ConfigCache(StaticGenerator(cfg))
        async with (
            serving(cache) as (xds, xds_port),
            serving_admin(Admin(xds), "127.0.0.1", 0) as admin_port,
            running_envoy(NODE, xds_port, delta=delta) as envoy,
        ):
            port = await envoy.listener_port(LISTENER_NAME)

            async def routed_to(name: str) -> bool:
                status, body, _ = await get(port)
                return status == 200 and body == name

            await eventually(lambda: routed_to("a"), what="first routed 200")

            # The listener update is rejected (its address is not an IP).
            cache.update(StaticGenerator(cfg.with_(broken_listener=True)))
            xds.push_all()

            async def lds_nacked() -> dict[str, Any] | None:
                entries = await _admin_json(admin_port, "/debug/syncz")
                lds = entries[0]["types"]["LDS"]
                return lds if lds["status"] == "NACKED" else None

            lds = await eventually(lds_nacked, what="LDS NACK in /debug/syncz")
            assert lds is not None
            assert "not-an-ip" in lds["last_nack"] or "malformed" in lds["last_nack"].lower()
            assert lds["version_acked"] == lds["version_sent"]  # rolled back to the last good
            assert 'inferlane_xds_nacks_total{type="LDS"} 1.0' in await _metrics(admin_port)
            # `inferlane status` reads the same page (from a thread: the admin is in this loop).
            entries = await asyncio.to_thread(fetch_syncz, f"http://127.0.0.1:{admin_port}")
            table = format_status(entries)
            assert "NACKED" in table and NODE in table and "NACKs:" in table

            # Traffic keeps flowing on the last good listener.
            assert await routed_to("a")
            # The rejected version is not re-sent on its own: no resend loop.
            pushes = await _metrics(admin_port)
            assert 'inferlane_xds_pushes_total{type="LDS"} 2.0' in pushes

            # A corrected resource (and a route change with it) is accepted.
            cache.update(StaticGenerator(cfg.with_(route_cluster="b")))
            xds.push_all()
            # Well before the 15 s a stalled warm-up would take.
            await eventually(lambda: routed_to("b"), timeout=5.0, what="corrected config live")

            async def synced() -> bool:
                entries = await _admin_json(admin_port, "/debug/syncz")
                return all(v["status"] == "SYNCED" for v in entries[0]["types"].values())

            await eventually(synced, what="all types SYNCED")
