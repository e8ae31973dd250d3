"""The control plane's rate-limit runtime without Envoy: scraping, stepping, options.

Fake model servers answer ``/metrics`` with chosen vLLM gauges (one never answers in
time); the controller's clock is the test's, so holds pass without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import MappingProxyType

import pytest
from aiohttp import web

from mesh.model import Endpoint, InferenceService, Priority, ServiceConfig, ServicePort, World
from ratelimit.adaptive import AdaptiveSettings
from ratelimit.rules import rules_from_world
from routing.endpoints import FULL_WEIGHT, queue_weight
from xds_server.rls.runtime import RateLimitRuntime, RateLimitSettings, adaptive_targets

HOSTS = ("127.0.74.1", "127.0.74.2", "127.0.74.3")
#: Scrapes being answered right now, across every fake server, and the most seen at once.
LOAD = {"now": 0, "peak": 0}


@dataclass
class FakeServer:
    """``/metrics`` with ``waiting`` queued requests; ``delay_s`` before answering."""

    waiting: float = 0.0
    delay_s: float = 0.0
    port: int = 0
    scrapes: int = field(default=0)

    async def metrics(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        LOAD["now"] += 1
        LOAD["peak"] = max(LOAD["peak"], LOAD["now"])
        try:
            await asyncio.sleep(self.delay_s)
            text = (
                f'vllm:num_requests_waiting{{model_name="llama"}} {self.waiting}\n'
                'vllm:num_requests_running{model_name="llama"} 1\n'
            )
            return web.Response(text=text)
        finally:
            LOAD["now"] -= 1


@contextlib.asynccontextmanager
async def fake_servers() -> AsyncIterator[list[FakeServer]]:
    servers, runners = [], []
    try:
        for host in HOSTS:
            server = FakeServer()
            app = web.Application()
            app.router.add_get("/metrics", server.metrics)
            runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, host, 0)
            await site.start()
            server.port = int(runner.addresses[0][1])
            servers.append(server)
        yield servers
    finally:
        for runner in runners:
            await runner.cleanup()


def _world(
    servers: list[FakeServer], *, adaptive: bool = True, keep: tuple[int, ...] = (0, 1, 2)
) -> World:
    endpoints = tuple(
        Endpoint(
            address=HOSTS[i],
            port=servers[i].port,
            service_port=8000,
            gpu=True,
            pod_namespace="default",
            pod_name=f"gpu-{i}",
        )
        for i in keep
    )
    cfg = ServiceConfig(
        enabled=True,
        adaptive=adaptive,
        rate_limit=MappingProxyType({Priority.SHEDDABLE: 10.0}),
        global_rate_limit=MappingProxyType({Priority.SHEDDABLE: 5.0}),
    )
    svc = InferenceService(
        namespace="default",
        name="llama",
        ports=(ServicePort(port=8000, name="http", target_port="http"),),
        config=cfg,
        endpoints=endpoints,
    )
    return World(services=(svc,))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_steps_scrape_each_endpoint_and_push_only_on_change() -> None:
    async with fake_servers() as servers:
        clock = Clock()
        changes: list[int] = []
        runtime = RateLimitRuntime(
            RateLimitSettings(
                scrape_timeout_s=0.3,
                scrape_concurrency=1,
                adaptive=AdaptiveSettings(tighten_hold_s=1.0),
            ),
            on_change=lambda: changes.append(1),
            clock=clock,
        )
        try:
            world = _world(servers)
            runtime.set_world(world)
            assert runtime.service.rules == rules_from_world(world)
            keys = [f"default/gpu-{i}:{s.port}" for i, s in enumerate(servers)]
            assert set(runtime.targets) == set(keys)
            servers[0].waiting = 50  # saturated
            servers[2].delay_s = 1.0  # never answers within the timeout

            LOAD["peak"] = 0
            assert await runtime.step() == []  # the overload has not held yet
            assert LOAD["peak"] == 1  # one scrape at a time, as configured
            clock.now += 1.5
            assert await runtime.step() == [keys[0]]
            assert changes == [1]
            mult = runtime.options().multipliers
            assert set(mult) == {keys[0]}
            assert mult[keys[0]][Priority.SHEDDABLE] == 0.5

            debug = runtime.describe()
            entries = {e["endpoint"]: e for e in debug["adaptive"]["endpoints"]}
            assert entries[keys[0]]["rates"] == {"sheddable": 5.0}
            assert entries[keys[0]]["last_change_reason"].startswith("tighten")
            assert "timed out" in entries[keys[2]]["last_error"]
            assert entries[keys[1]]["regime"] == "underloaded"
            errors = runtime.registry.get_sample_value(
                "inferlane_adaptive_scrapes_total", {"result": "error"}
            )
            assert errors == 2

            # An endpoint that leaves the world is forgotten; a Service that stops being
            # adaptive is no longer scraped.
            runtime.set_world(_world(servers, keep=(1, 2)))
            assert keys[0] not in runtime.controller.endpoints()
            assert runtime.options().multipliers == {}
            runtime.set_world(_world(servers, adaptive=False))
            assert runtime.targets == {}
            assert await runtime.step() == []
        finally:
            await runtime.stop()


async def test_queue_weights_follow_each_gpu_endpoints_queue_and_push_only_on_change() -> None:
    async with fake_servers() as servers:
        changes: list[int] = []
        runtime = RateLimitRuntime(
            RateLimitSettings(scrape_timeout_s=0.3, queue_weights=True),
            on_change=lambda: changes.append(1),
        )
        try:
            # Not adaptive: the queues are scraped for the weights alone.
            runtime.set_world(_world(servers, adaptive=False))
            assert runtime.targets == {}
            keys = [f"default/gpu-{i}:{s.port}" for i, s in enumerate(servers)]
            assert await runtime.step() == []  # nothing queued: every weight full
            assert runtime.options().weights == {}
            servers[0].waiting = 3
            assert await runtime.step() == [keys[0]]
            assert runtime.options().weights == {keys[0]: 32}
            servers[0].waiting = 2  # the same power-of-two step: no push
            assert await runtime.step() == []
            servers[0].waiting = 0
            servers[1].waiting = 40
            assert sorted(await runtime.step()) == sorted(keys[:2])
            assert runtime.options().weights == {keys[1]: 2}
            servers[1].delay_s = 1.0  # a failed scrape: back to full, no stale steering
            assert await runtime.step() == [keys[1]]
            assert runtime.options().weights == {}
            assert changes == [1, 1, 1]
            assert runtime.describe()["queue_weights"]["endpoints"][keys[2]] == FULL_WEIGHT
        finally:
            await runtime.stop()


async def test_an_endpoint_that_does_not_answer_is_scraped_less_often_until_it_does() -> None:
    async with fake_servers() as servers:
        runtime = RateLimitRuntime(
            RateLimitSettings(scrape_timeout_s=0.3, scrape_backoff_rounds=3),
            on_change=lambda: None,
        )
        try:
            runtime.set_world(_world(servers))
            servers[2].delay_s = 1.0  # never answers within the timeout
            for _ in range(10):
                await runtime.step()
            # Rounds 0, 1, 3, 7: the gap doubles up to scrape_backoff_rounds + 1.
            assert [s.scrapes for s in servers] == [10, 10, 4]
            backing_off = "inferlane_adaptive_endpoints_backing_off"
            assert runtime.registry.get_sample_value(backing_off) == 1
            servers[2].delay_s = 0.0
            await runtime.step()  # round 10: still skipped...
            assert servers[2].scrapes == 4
            await runtime.step()  # ...round 11 is 7 + scrape_backoff_rounds + 1
            assert servers[2].scrapes == 5
            for _ in range(3):  # and every round once it answers
                await runtime.step()
            assert [s.scrapes for s in servers] == [15, 15, 8]
            assert runtime.registry.get_sample_value(backing_off) == 0
        finally:
            await runtime.stop()


@pytest.mark.parametrize(
    ("waiting", "weight"),
    [(0, 128), (0.5, 128), (1, 64), (2, 32), (3, 32), (4, 16), (7, 16), (100, 1), (1e12, 1)],
)
def test_queue_weight_halves_with_each_doubling_of_the_queue(waiting: float, weight: int) -> None:
    assert queue_weight(waiting) == weight
    assert queue_weight(float("nan")) == FULL_WEIGHT


def test_targets_skip_unready_endpoints_and_services_without_a_rate_limit() -> None:
    servers = [FakeServer(port=9000 + i) for i in range(3)]
    world = _world(servers)
    svc = world.services[0]
    unready = (svc.endpoints[0].__class__(**{**svc.endpoints[0].__dict__, "ready": False}),)
    shrunk = World(services=(svc.__class__(**{**svc.__dict__, "endpoints": unready}),))
    assert adaptive_targets(shrunk) == {}
    assert adaptive_targets(world, "/stats") == {
        f"default/gpu-{i}:{9000 + i}": f"http://{HOSTS[i]}:{9000 + i}/stats" for i in range(3)
    }
    unlimited = ServiceConfig(enabled=True, adaptive=True)
    bare = World(services=(svc.__class__(**{**svc.__dict__, "config": unlimited}),))
    assert adaptive_targets(bare) == {}
    # A concurrency cap alone is something to steer: no rate limit needed.
    capped = ServiceConfig(enabled=True, adaptive=True, max_concurrency=8)
    only_caps = World(services=(svc.__class__(**{**svc.__dict__, "config": capped}),))
    assert set(adaptive_targets(only_caps)) == set(adaptive_targets(world))


def test_bad_settings_are_refused() -> None:
    try:
        RateLimitRuntime(RateLimitSettings(scrape_interval_s=0, metrics_path="metrics"))
    except ValueError as exc:
        assert "scrape interval" in str(exc) and "metrics_path" in str(exc)
    else:
        raise AssertionError("bad settings accepted")
