"""Fixed-window counters, in memory and in a real Redis; failure modes with Redis gone."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as redis_asyncio
from prometheus_client import CollectorRegistry

from ratelimit.counters import (
    UNLIMITED_REMAINING,
    Check,
    Counters,
    FailureMode,
    InMemoryCounters,
    RateLimitMetrics,
    RedisCounters,
    Result,
    cache_key,
    window,
)
from ratelimit.rules import RateLimit, Rule, Unit

from .conftest import RedisServer

ENTRIES = (("service", "default/llama"), ("caller", "a/x"), ("priority", "sheddable"))
RULE = Rule(name="inferlane.svc", limit=RateLimit(3, Unit.SECOND))


class FakeClock:
    def __init__(self, now: float = 1_000_000.25) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


CounterFactory = Callable[[FakeClock, RateLimitMetrics], Counters]


@pytest.fixture(params=["memory", "redis"])
async def make_counters(
    request: pytest.FixtureRequest,
) -> AsyncIterator[CounterFactory]:
    made: list[Counters] = []
    if request.param == "memory":

        def factory(clock: FakeClock, metrics: RateLimitMetrics) -> Counters:
            c = InMemoryCounters(clock=clock, metrics=metrics)
            made.append(c)
            return c

    else:
        server: RedisServer = request.getfixturevalue("redis_server")

        def factory(clock: FakeClock, metrics: RateLimitMetrics) -> Counters:
            c = RedisCounters(server.url, clock=clock, metrics=metrics, timeout_s=2.0)
            made.append(c)
            return c

    try:
        yield factory
    finally:
        for c in made:
            await c.close()


def test_windows_align_to_the_unit() -> None:
    assert window(125.5, 60) == (120, 54.5)
    assert window(120.0, 60) == (120, 60.0)
    assert window(7.25, 1) == (7, 0.75)


def test_keys_hold_domain_entries_and_window_unambiguously() -> None:
    assert cache_key("p:", "d", [("k", "v")], 60) == "p:d_k_v_60"
    assert cache_key("", "d", [("a_b", "c")], 0) != cache_key("", "d", [("a", "b_c")], 0)


async def test_fixed_window_limits_then_resets(make_counters: CounterFactory) -> None:
    clock, metrics = FakeClock(), RateLimitMetrics()
    counters = make_counters(clock, metrics)
    results = []
    for _ in range(5):
        [d] = await counters.check("inferlane", [Check(ENTRIES, RULE)])
        results.append((d.result, d.count, d.remaining))
    assert results == [
        (Result.OK, 1, 2),
        (Result.OK, 2, 1),
        (Result.OK, 3, 0),
        (Result.OVER_LIMIT, 4, 0),
        (Result.OVER_LIMIT, 5, 0),
    ]
    [d] = await counters.check("inferlane", [Check(ENTRIES, RULE)])
    assert d.reset_after_s == pytest.approx(0.75)
    clock.now += 1.0  # the next window
    [d] = await counters.check("inferlane", [Check(ENTRIES, RULE)])
    assert (d.result, d.count) == (Result.OK, 1)
    r = metrics.registry
    labels = {"domain": "inferlane", "descriptor": "inferlane.svc"}
    assert _value(r, "inferlane_ratelimit_decisions_total", **labels, result="ok") == 4
    assert _value(r, "inferlane_ratelimit_decisions_total", **labels, result="over_limit") == 3
    assert _value(r, "inferlane_ratelimit_hits_total", **labels) == 7


async def test_descriptors_are_counted_apart_and_weighted(make_counters: CounterFactory) -> None:
    counters = make_counters(FakeClock(), RateLimitMetrics())
    other = (("service", "default/llama"), ("caller", "b/y"), ("priority", "sheddable"))
    decisions = await counters.check(
        "inferlane", [Check(ENTRIES, RULE, hits=3), Check(other, RULE, hits=4)]
    )
    assert [(d.result, d.count) for d in decisions] == [(Result.OK, 3), (Result.OVER_LIMIT, 4)]


async def test_shadow_unlimited_and_unmatched(make_counters: CounterFactory) -> None:
    metrics = RateLimitMetrics()
    counters = make_counters(FakeClock(), metrics)
    shadow = Rule(name="s", limit=RateLimit(1, Unit.MINUTE), shadow_mode=True)
    unlimited = Rule(name="u", limit=RateLimit(0, unlimited=True))
    for _ in range(2):
        decisions = await counters.check(
            "d", [Check(ENTRIES, shadow), Check(ENTRIES, unlimited), Check(ENTRIES, None)]
        )
    s, u, n = decisions
    assert (s.result, s.count, s.allowed) == (Result.SHADOW_OVER_LIMIT, 2, True)
    assert (u.result, u.remaining, u.count) == (Result.OK, UNLIMITED_REMAINING, None)
    assert (n.result, n.rule) == (Result.OK, None)
    r = metrics.registry
    assert _value(r, "inferlane_ratelimit_decisions_total", domain="d", descriptor="s",
                  result="shadow_over_limit") == 1  # fmt: skip


async def test_redis_keys_expire_with_their_window(redis_server: RedisServer) -> None:
    clock = FakeClock(600.0)
    counters = RedisCounters(redis_server.url, clock=clock, key_prefix="t:", timeout_s=2.0)
    client = redis_asyncio.from_url(redis_server.url)
    try:
        rule = Rule(name="m", limit=RateLimit(10, Unit.MINUTE))
        await counters.check("d", [Check(ENTRIES, rule, hits=2)])
        key = cache_key("t:", "d", ENTRIES, 600)
        assert await client.get(key) == b"2"
        assert 0 < await client.ttl(key) <= 60
    finally:
        await client.aclose()
        await counters.close()


@pytest.mark.parametrize(
    ("mode", "allowed"), [(FailureMode.OPEN, True), (FailureMode.CLOSED, False)]
)
async def test_redis_down_decides_by_failure_mode(
    redis_server: RedisServer,
    mode: FailureMode,
    allowed: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = RateLimitMetrics()
    counters = RedisCounters(redis_server.url, failure_mode=mode, metrics=metrics, timeout_s=0.5)
    r = metrics.registry
    try:
        assert await counters.ping()
        [d] = await counters.check("d", [Check(ENTRIES, RULE)])
        assert d.result is Result.OK and not d.backend_error
        assert _value(r, "inferlane_ratelimit_backend_up", backend="redis") == 1
        redis_server.stop()
        for expected_errors in (1, 2):
            [d] = await counters.check("d", [Check(ENTRIES, RULE)])
            assert d.backend_error
            assert d.allowed is allowed
            assert d.result is (Result.OK if allowed else Result.OVER_LIMIT)
            assert _value(r, "inferlane_ratelimit_redis_errors_total") == expected_errors
            decided = _value(r, "inferlane_ratelimit_failure_mode_decisions_total", mode=str(mode))
            assert decided == expected_errors
        assert _value(r, "inferlane_ratelimit_backend_up", backend="redis") == 0
        assert not await counters.ping()
        # One warning when Redis went away, not one per request.
        assert len([m for m in caplog.messages if "unavailable" in m]) == 1
        # Descriptors that match no rule never touch Redis, so they stay plainly OK.
        [n] = await counters.check("d", [Check(ENTRIES, None)])
        assert n.result is Result.OK and not n.backend_error
    finally:
        await counters.close()


async def test_unreachable_redis_at_start_never_raises() -> None:
    metrics = RateLimitMetrics()
    counters = RedisCounters(
        "redis://127.0.0.1:1/0", failure_mode=FailureMode.CLOSED, metrics=metrics, timeout_s=0.2
    )
    try:
        [d] = await counters.check("d", [Check(ENTRIES, RULE)])
        assert d.result is Result.OVER_LIMIT and d.backend_error
        assert _value(metrics.registry, "inferlane_ratelimit_redis_errors_total") == 1
    finally:
        await counters.close()


async def test_in_memory_sweeps_expired_windows() -> None:
    clock = FakeClock(10.0)
    counters = InMemoryCounters(clock=clock)
    for i in range(5):
        entries = (("caller", f"c{i}"),)
        await counters.check("d", [Check(entries, RULE)])
    assert len(counters) == 5
    clock.now += 5
    await counters.check("d", [Check(ENTRIES, RULE)])
    assert len(counters) == 1
