"""Token reservations and their settlement, in memory and in a real Redis."""

from __future__ import annotations

import pytest

from ratelimit.counters import (
    Check,
    Counters,
    FailureMode,
    InMemoryCounters,
    RateLimitMetrics,
    RedisCounters,
    Result,
    Settled,
    Settlement,
    parse_reservation,
)
from ratelimit.rules import RateLimit, Rule, Unit

from .conftest import RedisServer
from .test_counters import CounterFactory, FakeClock, make_counters

__all__ = ["make_counters"]  # the fixture, used by name below

CHAT = (("service", "default/llama"), ("tokens", "standard"), ("caller", "default/chat"))
BATCH = (("service", "default/llama"), ("tokens", "standard"), ("caller", "default/batch"))
BUDGET = Rule(name="inferlane.budget", limit=RateLimit(1000, Unit.MINUTE, name="d/l:*"))


Entries = tuple[tuple[str, str], ...]


async def reserve(
    counters: Counters, tokens: int, entries: Entries = CHAT
) -> tuple[Result, int | None, int, str | None]:
    [decision] = await counters.check("d", [Check(entries, BUDGET, tokens, reserve=True)])
    return decision.result, decision.count, decision.remaining, decision.reservation


async def count(counters: Counters, entries: Entries = CHAT) -> int:
    """The window's count, as a reservation that never fits reads it (adding nothing)."""
    [decision] = await counters.check("d", [Check(entries, BUDGET, 2**40, reserve=True)])
    assert decision.result is Result.OVER_LIMIT and decision.count is not None
    return decision.count


async def settle(
    counters: Counters, reservation: str | None, used: int, entries: Entries = CHAT
) -> Settled:
    [result] = await counters.settle("d", [Settlement(entries, BUDGET, reservation, used)])
    return result.outcome


async def test_a_reservation_is_added_only_when_it_fits(make_counters: CounterFactory) -> None:
    counters = make_counters(FakeClock(), RateLimitMetrics())
    result, counted, remaining, first = await reserve(counters, 600)
    assert (result, counted, remaining) == (Result.OK, 600, 400)
    assert first is not None and parse_reservation(first) is not None
    result, counted, remaining, refused = await reserve(counters, 401)
    # Refused, and not counted: what is left stays usable by a smaller request.
    assert (result, counted, remaining, refused) == (Result.OVER_LIMIT, 600, 400, None)
    result, counted, remaining, second = await reserve(counters, 400)
    assert (result, counted, remaining) == (Result.OK, 1000, 0)
    assert second != first


async def test_settlement_replaces_the_reservation_by_the_usage_once(
    make_counters: CounterFactory,
) -> None:
    counters = make_counters(FakeClock(), RateLimitMetrics())
    *_, small = await reserve(counters, 500)
    *_, large = await reserve(counters, 300)
    assert await count(counters) == 800
    assert await settle(counters, small, 20) is Settled.REPLACED
    assert await count(counters) == 320  # 480 unused tokens came back at once
    [result] = await counters.settle("d", [Settlement(CHAT, BUDGET, large, 350)])
    assert (result.outcome, result.reserved) == (Settled.REPLACED, 300)
    assert await count(counters) == 370  # it used more than it reserved: charged
    # A second settlement of the same reservation finds nothing and changes nothing.
    assert await settle(counters, small, 0) is Settled.UNKNOWN
    assert await count(counters) == 370


async def test_settlements_that_name_no_reservation_of_theirs_change_nothing(
    make_counters: CounterFactory,
) -> None:
    counters = make_counters(FakeClock(), RateLimitMetrics())
    *_, chats = await reserve(counters, 500)
    assert chats is not None
    window_start = chats.split(".")[0]
    for forged in (f"{window_start}.{'0' * 16}", "12.zz", "../../etc", "", "1." + "a" * 400):
        assert await settle(counters, forged, 0) is Settled.UNKNOWN
    # Another caller cannot give itself (or anyone) chat's reservation back.
    assert await settle(counters, chats, 0, BATCH) is Settled.UNKNOWN
    assert await count(counters) == 500
    assert await count(counters, BATCH) == 0


async def test_without_a_reservation_the_usage_is_charged(make_counters: CounterFactory) -> None:
    counters = make_counters(FakeClock(), RateLimitMetrics())
    # Charge at the end: a check counts one token (as envoyproxy/ratelimit counts a
    # request without hits_addend), the usage comes at the end.
    [admitted] = await counters.check("d", [Check(CHAT, BUDGET, 1)])
    assert admitted.result is Result.OK and admitted.reservation is None
    assert await settle(counters, None, 250) is Settled.CHARGED
    assert await count(counters) == 251
    # No budget matched: nothing to do.
    [skipped] = await counters.settle("d", [Settlement(CHAT, None, None, 250)])
    assert skipped.outcome is Settled.SKIPPED


async def test_replicas_sharing_redis_settle_each_others_reservations(
    redis_server: RedisServer,
) -> None:
    clock = FakeClock()
    a = RedisCounters(redis_server.url, clock=clock, timeout_s=2.0)
    b = RedisCounters(redis_server.url, clock=clock, timeout_s=2.0)
    try:
        *_, made_on_a = await reserve(a, 900)
        assert (await reserve(b, 200))[0] is Result.OVER_LIMIT
        assert await settle(b, made_on_a, 100) is Settled.REPLACED
        assert (await reserve(b, 200))[0] is Result.OK
        assert await count(a) == 300
    finally:
        await a.close()
        await b.close()


async def test_a_reservation_ends_with_its_window() -> None:
    clock = FakeClock(60_000.0)
    counters = InMemoryCounters(clock=clock)
    *_, reservation = await reserve(counters, 900)
    clock.now += 61  # the next window: the old one's count is gone, and so is the record
    assert await settle(counters, reservation, 0) is Settled.UNKNOWN
    assert counters.open_reservations == 0
    assert await count(counters) == 0


async def test_memory_records_are_bounded_and_unrecorded_reservations_stay_charged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(InMemoryCounters, "MAX_RECORDS", 2)
    counters = InMemoryCounters(clock=FakeClock())
    made = [(await reserve(counters, 100))[3] for _ in range(3)]
    assert counters.open_reservations == 2
    assert await settle(counters, made[2], 0) is Settled.UNKNOWN
    assert await count(counters) == 300  # the unrecorded one is charged in full
    assert await settle(counters, made[0], 0) is Settled.REPLACED
    assert await count(counters) == 200


@pytest.mark.parametrize(
    ("mode", "allowed"), [(FailureMode.OPEN, True), (FailureMode.CLOSED, False)]
)
async def test_redis_down_the_failure_mode_decides_without_a_reservation(
    redis_server: RedisServer, mode: FailureMode, allowed: bool
) -> None:
    counters = RedisCounters(redis_server.url, failure_mode=mode, timeout_s=0.5)
    try:
        redis_server.stop()
        result, _, _, reservation = await reserve(counters, 10)
        assert (result is Result.OK) is allowed
        assert reservation is None  # nothing recorded: the end charges the usage instead
        assert await settle(counters, "60.0123456789abcdef", 5) is Settled.SKIPPED
    finally:
        await counters.close()
