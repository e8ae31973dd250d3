"""End to end with a real Envoy: local buckets and the global service refuse with 429.

A static bootstrap built from ``ratelimit.local`` puts both filters on a listener in
front of a tiny aiohttp backend; the global filter calls our rate-limit service over
gRPC. The counters' clock is fixed, so the global window cannot roll over mid-test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from mesh.model import PRIORITY_HEADER, InferenceService, Priority, ServiceConfig, World
from ratelimit.counters import InMemoryCounters
from ratelimit.local import (
    LOCAL_RATELIMIT_FILTER,
    global_ratelimit_http_filter,
    local_ratelimit_http_filter,
    per_route_bucket,
    rls_cluster,
    route_rate_limits,
)
from ratelimit.rules import rules_from_world
from xds_server.rls.service import RateLimitService, start_rls_server

pytestmark = pytest.mark.envoy

LOCAL = MappingProxyType({Priority.STANDARD: 0.5})  # one token per 2 s; burst below
GLOBAL = MappingProxyType({Priority.SHEDDABLE: 0.05})  # 3 per minute
BURST = 2


def _address(port: int) -> Any:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )


def _bootstrap(backend_port: int, rls_port: int) -> Any:
    routes = []
    for priority in (Priority.STANDARD, Priority.SHEDDABLE):
        route = route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(cluster="backend"),
        )
        route.match.headers.add(name=PRIORITY_HEADER).string_match.exact = str(priority)
        if priority in LOCAL:
            route.typed_per_filter_config[LOCAL_RATELIMIT_FILTER].CopyFrom(
                per_route_bucket(LOCAL[priority], burst=BURST)
            )
        route.route.rate_limits.extend(
            route_rate_limits("default/llama", "team-a/client", priority, GLOBAL)
        )
        routes.append(route)
    router = hcm_pb2.HttpFilter(name="envoy.filters.http.router")
    router.typed_config.Pack(router_pb2.Router())
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="e2e",
        route_config=route_pb2.RouteConfiguration(
            name="local",
            virtual_hosts=[
                route_components_pb2.VirtualHost(name="llama", domains=["*"], routes=routes)
            ],
        ),
        http_filters=[
            local_ratelimit_http_filter(),
            global_ratelimit_http_filter("inferlane-rls", timeout_s=2.0),
            router,
        ],
    )
    network_filter = listener_components_pb2.Filter(
        name="envoy.filters.network.http_connection_manager"
    )
    network_filter.typed_config.Pack(hcm)
    backend = cluster_pb2.Cluster(
        name="backend",
        type=cluster_pb2.Cluster.STATIC,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name="backend",
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(
                                address=_address(backend_port)
                            )
                        )
                    ]
                )
            ],
        ),
    )
    boot = bootstrap_pb2.Bootstrap()
    boot.admin.address.CopyFrom(_address(0))
    boot.static_resources.listeners.append(
        listener_pb2.Listener(
            name="e2e",
            address=_address(0),
            filter_chains=[listener_components_pb2.FilterChain(filters=[network_filter])],
        )
    )
    boot.static_resources.clusters.extend(
        [backend, rls_cluster("inferlane-rls", "127.0.0.1", rls_port)]
    )
    return boot


async def _eventually(check: Callable[[], Awaitable[Any]], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _envoy(boot: Any) -> AsyncIterator[str]:
    """Run Envoy on ``boot``; yield the listener's base URL."""
    envoy = Path(sys.executable).parent / "envoy"
    binary = str(envoy) if envoy.exists() else shutil.which("envoy")
    if binary is None:
        pytest.skip("no envoy binary")
    work = Path(tempfile.mkdtemp(prefix="rl-envoy-"))
    config, admin_path, log = work / "bootstrap.json", work / "admin", work / "envoy.log"
    config.write_text(json.dumps(json_format.MessageToDict(boot)))
    proc = await asyncio.create_subprocess_exec(
        binary, "-c", str(config), "--concurrency", "1", "--use-dynamic-base-id",
        "--admin-address-path", str(admin_path), "-l", "warning", "--log-path", str(log),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:

            async def listener_port() -> int | None:
                if proc.returncode is not None:
                    raise AssertionError(f"envoy exited: {log.read_text()[-2000:]}")
                if not admin_path.exists() or not admin_path.read_text().strip():
                    return None
                admin = "http://" + admin_path.read_text().strip()
                async with session.get(f"{admin}/listeners?format=json") as r:
                    doc = await r.json(content_type=None)
                for status in doc.get("listener_statuses", []):
                    port = status["local_address"]["socket_address"].get("port_value")
                    if port:
                        return int(port)
                return None

            port = await _eventually(listener_port, 20, "envoy's listener")
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
async def backend_port() -> AsyncIterator[int]:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def _send(session: aiohttp.ClientSession, url: str, priority: str) -> tuple[int, Any]:
    async with session.get(f"{url}/v1/completions", headers={PRIORITY_HEADER: priority}) as r:
        await r.read()
        return r.status, r.headers


async def test_envoy_enforces_local_and_global_limits(backend_port: int) -> None:
    world = World(
        services=(
            InferenceService(
                namespace="default",
                name="llama",
                ports=(),
                config=ServiceConfig(enabled=True, global_rate_limit=GLOBAL),
            ),
        )
    )
    counters = InMemoryCounters(clock=lambda: 1_800_000_000.0)  # frozen mid-window
    service = RateLimitService(counters, rules_from_world(world))
    server, rls_port = await start_rls_server(service, port=0)
    try:
        async with (
            _envoy(_bootstrap(backend_port, rls_port)) as url,
            aiohttp.ClientSession() as session,
        ):
            # Global: 3 per minute per caller and class, counted by our service.
            shed = [await _send(session, url, "sheddable") for _ in range(5)]
            assert [s for s, _ in shed] == [200, 200, 200, 429, 429]
            headers = shed[-1][1]
            assert headers.get("x-envoy-ratelimited") == "true"
            assert headers.get("x-ratelimit-limit", "").startswith("3")
            # Local: a bucket of 2 on the standard route; the third is refused.
            std = [await _send(session, url, "standard") for _ in range(3)]
            assert [s for s, _ in std] == [200, 200, 429]
            assert std[-1][1].get("x-envoy-ratelimited") == "true"
    finally:
        await server.stop(None)
        await counters.close()
