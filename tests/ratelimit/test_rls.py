"""The rate-limit service over real gRPC: answers, rule swaps, and one limit across replicas."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Sequence
from types import MappingProxyType
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from mesh.model import InferenceService, Priority, ServiceConfig, World
from ratelimit.counters import Counters, InMemoryCounters, RateLimitMetrics, RedisCounters
from ratelimit.rules import RuleSet, rules_from_world
from xds_server.rls.service import RateLimitService, start_rls_server

from .conftest import RedisServer

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
SHED = (("service", "default/llama"), ("caller", "team-a/client"), ("priority", "sheddable"))


def _world(**limits: float) -> World:
    svc = InferenceService(
        namespace="default",
        name="llama",
        ports=(),
        config=ServiceConfig(
            enabled=True,
            global_rate_limit=MappingProxyType({Priority(k): v for k, v in limits.items()}),
        ),
    )
    return World(services=(svc,))


def _request(*descriptors: Sequence[tuple[str, str]], domain: str = "inferlane") -> Any:
    return rls_pb2.RateLimitRequest(
        domain=domain,
        descriptors=[
            common_pb2.RateLimitDescriptor(
                entries=[common_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in d]
            )
            for d in descriptors
        ],
    )


class Running:
    """A service on a real grpc.aio server, and a client stub to it."""

    def __init__(self, service: RateLimitService, server: Any, channel: Any) -> None:
        self.service = service
        self.server = server
        self.channel = channel
        self.stub = rls_pb2_grpc.RateLimitServiceStub(channel)


async def _start(service: RateLimitService) -> Running:
    server, port = await start_rls_server(service, port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return Running(service, server, channel)


async def _stop(running: Running) -> None:
    await running.channel.close()
    await running.server.stop(None)
    await running.service.counters.close()


@pytest.fixture
async def rls() -> AsyncIterator[Running]:
    service = RateLimitService(
        InMemoryCounters(), rules_from_world(_world(sheddable=3)), limit_headers=True
    )
    running = await _start(service)
    try:
        yield running
    finally:
        await _stop(running)


async def test_should_rate_limit_counts_and_answers_like_envoyproxy(rls: Running) -> None:
    codes = []
    for _ in range(4):
        response = await rls.stub.ShouldRateLimit(_request(SHED))
        codes.append(response.overall_code)
    assert codes == [OK, OK, OK, OVER]
    [status] = response.statuses
    assert status.code == OVER
    assert status.current_limit.requests_per_unit == 3
    assert status.current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.SECOND
    assert status.limit_remaining == 0
    assert 0 < status.duration_until_reset.ToNanoseconds() <= 1_000_000_000
    headers = {h.key: h.value for h in response.response_headers_to_add}
    assert headers == {"RateLimit-Limit": "3", "RateLimit-Remaining": "0", "RateLimit-Reset": "1"}


async def test_each_descriptor_gets_a_status(rls: Running) -> None:
    other_caller = tuple((k, "team-b/other" if k == "caller" else v) for k, v in SHED)
    critical = tuple((k, "critical" if k == "priority" else v) for k, v in SHED)
    response = await rls.stub.ShouldRateLimit(_request(SHED, other_caller, critical))
    assert response.overall_code == OK
    first, second, third = response.statuses
    assert (first.code, first.limit_remaining) == (OK, 2)
    assert (second.code, second.limit_remaining) == (OK, 2)  # its own counter
    assert third.code == OK and not third.HasField("current_limit")  # critical: no rule
    headers = {h.key: h.value for h in response.response_headers_to_add}
    assert headers["RateLimit-Remaining"] == "2"


async def test_hits_addend_and_limit_override(rls: Running) -> None:
    request = _request(SHED)
    request.hits_addend = 3
    response = await rls.stub.ShouldRateLimit(request)
    assert (response.overall_code, response.statuses[0].limit_remaining) == (OK, 0)
    override = _request((("anything", "x"),))
    override.descriptors[0].limit.requests_per_unit = 1
    override.descriptors[0].limit.unit = rls_pb2.RateLimitResponse.RateLimit.MINUTE
    codes = [(await rls.stub.ShouldRateLimit(override)).overall_code for _ in range(2)]
    assert codes == [OK, OVER]


@pytest.mark.parametrize("request_", [_request(SHED, domain=""), _request()])
async def test_bad_requests_are_invalid_argument(rls: Running, request_: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rls.stub.ShouldRateLimit(request_)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_rules_swap_atomically(rls: Running) -> None:
    for _ in range(3):
        await rls.stub.ShouldRateLimit(_request(SHED))
    rls.service.set_rules(rules_from_world(_world(sheddable=10)))
    response = await rls.stub.ShouldRateLimit(_request(SHED))
    # Same descriptor, same window: the count carries over, the new limit applies.
    assert (response.overall_code, response.statuses[0].limit_remaining) == (OK, 6)
    rls.service.set_rules(RuleSet())
    response = await rls.stub.ShouldRateLimit(_request(SHED))
    assert response.overall_code == OK and not response.statuses[0].HasField("current_limit")


async def test_debug_view_shows_rules_and_backend(rls: Running) -> None:
    await rls.stub.ShouldRateLimit(_request(SHED))
    view = rls.service.debug()
    assert view["backend"] == "memory" and view["backend_up"] is True
    [domain] = view["domains"]
    assert domain["domain"] == "inferlane"
    assert domain["descriptors"][0]["value"] == "default/llama"


async def test_global_shadow_mode_never_refuses() -> None:
    metrics = RateLimitMetrics()
    service = RateLimitService(
        InMemoryCounters(metrics=metrics), rules_from_world(_world(sheddable=1)), shadow_mode=True
    )
    running = await _start(service)
    try:
        codes = [
            (await running.stub.ShouldRateLimit(_request(SHED))).overall_code for _ in range(3)
        ]
        assert codes == [OK, OK, OK]
        assert metrics.registry.get_sample_value("inferlane_rls_shadow_mode_total") == 2
    finally:
        await _stop(running)


async def _hammer(stubs: Sequence[Any], until: float, workers: int) -> list[tuple[int, float, int]]:
    """Send requests from ``workers`` tasks round-robin over ``stubs`` until ``until``.

    Returns (server index, the window the answer came from, code) per answer.

    The window is exact whatever the latency (below a second): it ends on a whole second,
    at the decision time plus ``duration_until_reset``, and the decision happened between
    sending and receiving, so the window's end is the one whole second in that interval.
    """
    out: list[tuple[int, float, int]] = []

    async def worker(n: int) -> None:
        i = n
        while time.time() < until:
            stub_index = i % len(stubs)
            sent = time.time()
            response = await stubs[stub_index].ShouldRateLimit(_request(SHED))
            received = time.time()
            status = response.statuses[0]
            reset = status.duration_until_reset.ToNanoseconds() / 1e9
            window_end = math.ceil(sent + reset - 1e-3)
            assert window_end <= received + reset + 1e-3, "a decision took over a second"
            out.append((stub_index, window_end - 1, response.overall_code))
            i += 1

    await asyncio.gather(*(worker(n) for n in range(workers)))
    return out


async def test_two_replicas_sharing_redis_enforce_one_limit(redis_server: RedisServer) -> None:
    limit = 100
    rules = rules_from_world(_world(sheddable=limit))
    replicas: list[Running] = []
    counters: list[Counters] = [
        RedisCounters(redis_server.url, timeout_s=2.0, metrics=RateLimitMetrics()) for _ in range(2)
    ]
    try:
        for c in counters:
            replicas.append(await _start(RateLimitService(c, rules)))
        start = time.time()
        end = math.ceil(start) + 2  # at least two whole one-second windows
        answers = await _hammer([r.stub for r in replicas], until=end, workers=16)
    finally:
        for r in replicas:
            await _stop(r)
    allowed = Tally(w for _, w, code in answers if code == OK)
    seen = Tally(w for _, w, _ in answers)
    whole = [w for w in seen if w >= start and w + 1 <= end]
    assert len(whole) >= 2, (start, end, sorted(seen))
    for w in whole:
        assert seen[w] > 1.25 * limit, f"window {w}: only {seen[w]} requests, not a real test"
        assert abs(allowed[w] - limit) <= 0.05 * limit, f"window {w}: {allowed[w]} allowed"
    per_replica = Tally(i for i, _, code in answers if code == OK)
    assert per_replica[0] > 0 and per_replica[1] > 0
