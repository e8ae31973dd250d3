"""The xDS core against a real Envoy, over State-of-the-World and Delta ADS."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.backends import echo_server
from tests.support.config import LISTENER_NAME, StaticConfig, StaticGenerator, serving
from tests.support.envoy import running_envoy
from tests.support.http import get
from tests.support.wait import eventually
from xds_server.ads.cache import ConfigCache

pytestmark = pytest.mark.envoy

NODE = "sidecar~127.0.0.1~client-0.default~default.svc.cluster.local"
MODES = [pytest.param(False, id="sotw"), pytest.param(True, id="delta")]
#: How soon a change must be live. A cluster re-sent without its endpoints would stall
#: warming for Envoy's initial fetch timeout (15 s): a third of it tells a stall apart and
#: leaves a slow machine room. How fast changes land is measured by bench.convergence.
LIVE_WITHIN_S = 5.0


async def _body(port: int) -> str:
    status, body, _ = await get(port)
    return body if status == 200 else f"status {status}"


@pytest.mark.parametrize("delta", MODES)
async def test_envoy_syncs_routes_and_follows_changes(delta: bool) -> None:
    async with echo_server("a") as a, echo_server("b") as b, echo_server("c") as c:
        cfg = StaticConfig(
            clusters={"a": [("127.0.0.1", a.port)], "b": [("127.0.0.1", b.port)]},
            route_cluster="a",
        )
        cache = ConfigCache(StaticGenerator(cfg))
        async with (
            serving(cache) as (xds, xds_port),
            running_envoy(NODE, xds_port, delta=delta) as envoy,
        ):
            port = await envoy.listener_port(LISTENER_NAME)
            await eventually(lambda: _is(port, "a"), what="first routed 200")

            # A changed route goes live.
            cache.update(StaticGenerator(cfg := cfg.with_(route_cluster="b")))
            xds.push_all()
            await eventually(
                lambda: _is(port, "b"), timeout=LIVE_WITHIN_S, what="route change live"
            )

            # A changed cluster (same EDS name, new settings) re-warms without the stall.
            cache.update(StaticGenerator(cfg := cfg.with_(max_requests=77)))
            xds.push_all()

            async def cluster_live() -> bool:
                dump = await envoy.admin_json("/config_dump?resource=dynamic_active_clusters")
                live = [
                    c["cluster"]
                    for c in dump["configs"]
                    if c["cluster"]["name"] == "b"
                    and c["cluster"]["circuit_breakers"]["thresholds"][0]["max_requests"] == 77
                ]
                stats = await envoy.stats("cluster_manager.warming_clusters")
                return bool(live) and stats.get("cluster_manager.warming_clusters") == 0

            await eventually(
                cluster_live, timeout=LIVE_WITHIN_S, what="cluster change live, not warming"
            )
            assert await _body(port) == "b"

            # A new cluster and a route to it in one push: make-before-break, no failures.
            failures: list[str] = []
            stop = asyncio.Event()

            async def steady() -> None:
                while not stop.is_set():
                    body = await _body(port)
                    if body not in ("b", "c"):
                        failures.append(body)

            loop = asyncio.create_task(steady())
            clusters = {"c": [("127.0.0.1", c.port)]}
            cache.update(StaticGenerator(cfg.with_(clusters=clusters, route_cluster="c")))
            xds.push_all()
            await eventually(lambda: _is(port, "c"), timeout=LIVE_WITHIN_S, what="new cluster live")
            # ...and the old clusters are removed once the route has moved.
            await eventually(lambda: _clusters_gone(envoy, {"a", "b"}), what="old clusters gone")
            stop.set()
            await loop
            assert failures == []


async def _is(port: int, expected: str) -> bool:
    return await _body(port) == expected


async def _clusters_gone(envoy: object, names: set[str]) -> bool:
    from tests.support.envoy import Envoy

    assert isinstance(envoy, Envoy)
    dump = await envoy.admin_json("/config_dump?resource=dynamic_active_clusters")
    present = {c["cluster"]["name"] for c in dump.get("configs", [])}
    return not (present & names)
