"""Fixed-window counters for the global rate-limit service, as envoyproxy/ratelimit keeps them.

Every matched descriptor has one counter per window. Its key is the domain, the
descriptor's entries and the window's start (unix seconds, a multiple of the unit's
length), so every replica that shares a store counts into the same key and windows line
up across replicas without coordination (their clocks must agree to well under a
window). One request's descriptors are counted together: one ``INCRBY`` plus
``EXPIRE``-to-the-window's-length per descriptor, all in one pipeline (one round trip).

A hit is over the limit when the count *after* adding it exceeds ``requests_per_unit``;
over-limit hits are counted too, as envoyproxy/ratelimit does, so the count is the
demand. A rule in shadow mode counts and reports as usual but never refuses
(:attr:`Result.SHADOW_OVER_LIMIT`).

Token reservations (:mod:`ratelimit.tokens`) differ: a reservation is added only if the
window's count stays within the limit, and a refused one is not counted at all, so it
never eats into the budget. An added reservation is recorded under the key
:func:`record_key` gives it, with the window's remaining life as its own, and its id
(``WINDOWSTART.NONCE``) goes back to the caller. :meth:`Counters.settle` later replaces
it by the usage: it takes the record (once: a second settlement finds nothing) and adds
``used - reserved`` to that window's count. Checking and adding, and taking a record and
adjusting its window, are each one atomic step of the store (a Redis script; no await in
memory), so replicas that share a Redis never see half of one.

When the store cannot be reached, :class:`FailureMode` decides: ``open`` lets the
request through, ``closed`` refuses it. Either way the error is counted
(``inferlane_ratelimit_redis_errors_total``), the backend gauge drops to 0, and nothing
is raised to the caller.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as redis_asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ratelimit.rules import Entry, Rule

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: ``limit_remaining`` reported for an unlimited rule (uint32 max, as envoyproxy does).
UNLIMITED_REMAINING = 2**32 - 1


class FailureMode(enum.StrEnum):
    """What to decide when the counter store is unreachable."""

    OPEN = "open"  # allow: availability over enforcement
    CLOSED = "closed"  # refuse: enforcement over availability


class Result(enum.StrEnum):
    OK = "ok"
    OVER_LIMIT = "over_limit"
    #: Over the limit, but the rule is in shadow mode: allowed, and counted as over.
    SHADOW_OVER_LIMIT = "shadow_over_limit"


@dataclass(frozen=True)
class Check:
    """One descriptor to count: its entries, the rule it matched (if any), and its weight."""

    entries: tuple[Entry, ...]
    rule: Rule | None
    hits: int = 1
    #: A token reservation: added only if it fits, and recorded for settlement.
    reserve: bool = False


@dataclass(frozen=True)
class Settlement:
    """The end of a request that drew on a token budget: replace ``reservation`` (an id
    from :attr:`Decision.reservation`; None when there was none) by ``used`` tokens."""

    entries: tuple[Entry, ...]
    rule: Rule | None
    reservation: str | None
    used: int


class Settled(enum.StrEnum):
    #: The reservation was replaced by the usage.
    REPLACED = "replaced"
    #: There was no reservation: the usage was added to the current window.
    CHARGED = "charged"
    #: No such reservation for this counter: forged, settled already, or its window has
    #: ended. Nothing changed.
    UNKNOWN = "unknown"
    #: The settlement matched no budget, or the store failed: nothing changed.
    SKIPPED = "skipped"


@dataclass(frozen=True)
class SettleResult:
    outcome: Settled
    #: The tokens the reservation held (0 unless REPLACED).
    reserved: int = 0


UNKNOWN = SettleResult(Settled.UNKNOWN)


@dataclass(frozen=True)
class Decision:
    """The outcome for one descriptor."""

    result: Result
    rule: Rule | None = None
    #: The window's count after this request's hits; None when nothing was counted.
    count: int | None = None
    #: Requests left in the window (0 when over; uint32 max when unlimited).
    remaining: int = 0
    #: Seconds until the window resets; 0 when no limit applies.
    reset_after_s: float = 0.0
    #: The store failed and the failure mode decided.
    backend_error: bool = False
    #: The id of the token reservation this decision added (None for anything else).
    reservation: str | None = None

    @property
    def allowed(self) -> bool:
        return self.result is not Result.OVER_LIMIT


class CounterBackendError(Exception):
    """The counter store could not be reached or answered wrongly."""


@dataclass(frozen=True)
class Increment:
    """``INCRBY key hits`` + ``EXPIRE key expire_s``; with ``fit_within``, only if the
    count stays within it, and then ``SET record hits EX record_ttl_s`` too."""

    key: str
    hits: int
    expire_s: int
    fit_within: int | None = None
    record: str = ""
    record_ttl_s: int = 0


@dataclass(frozen=True)
class Counted:
    """The window's count after an increment, or as it stands when one did not fit."""

    count: int
    added: bool = True


@dataclass(frozen=True)
class Replace:
    """Take ``record`` (a reservation) and add ``used`` minus what it held to ``key``."""

    record: str
    key: str
    used: int


class RateLimitMetrics:
    """The counters' Prometheus metrics, on a registry of their own unless one is given."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "inferlane_ratelimit_decisions_total",
            "Rate-limit decisions per matched rule (the rule's dotted name) and result.",
            ["domain", "descriptor", "result"],
            registry=r,
        )
        self.hits = Counter(
            "inferlane_ratelimit_hits_total",
            "Hits counted per matched rule (a request may weigh more than one).",
            ["domain", "descriptor"],
            registry=r,
        )
        self.redis_errors = Counter(
            "inferlane_ratelimit_redis_errors_total",
            "Counter-store round trips that failed; the failure mode decided instead.",
            registry=r,
        )
        self.backend_up = Gauge(
            "inferlane_ratelimit_backend_up",
            "1 when the last round trip to the counter store succeeded, else 0.",
            ["backend"],
            registry=r,
        )
        self.failure_mode_decisions = Counter(
            "inferlane_ratelimit_failure_mode_decisions_total",
            "Descriptors decided by the failure mode because the counter store failed.",
            ["mode"],
            registry=r,
        )


def escape(part: str) -> str:
    """Make ``_`` unambiguous in a key: ``a_b``+``c`` and ``a``+``b_c`` must differ."""
    return part.replace("\\", "\\\\").replace("_", "\\_")


def window(now: float, unit_s: int) -> tuple[int, float]:
    """The start of the fixed window holding ``now``, and the seconds until it ends."""
    start = int(now // unit_s) * unit_s
    return start, start + unit_s - now


def cache_key(prefix: str, domain: str, entries: Sequence[Entry], window_start: int) -> str:
    """envoyproxy/ratelimit's key: ``prefix domain_key_value_..._windowstart``."""
    parts = [escape(domain)]
    for key, value in entries:
        parts += [escape(key), escape(value)]
    return prefix + "_".join(parts) + f"_{window_start}"


def record_key(prefix: str, counter_key: str, nonce: str) -> str:
    """Where a reservation of ``counter_key``'s window is kept: apart from every counter
    (counter keys never start with ``reservation:``), and bound to that counter, so an id
    settles only against the budget, caller and window it was made in."""
    return f"{prefix}reservation:{counter_key[len(prefix) :]}:{nonce}"


#: A reservation id: the window's start (unix seconds) and a random nonce.
_RESERVATION_ID = re.compile(r"([0-9]{1,12})\.([0-9a-f]{16})")


def parse_reservation(reservation: str) -> tuple[int, str] | None:
    """``(window start, nonce)`` of a reservation id; None for anything else."""
    match = _RESERVATION_ID.fullmatch(reservation)
    return (int(match[1]), match[2]) if match else None


class Counters(abc.ABC):
    """Counts descriptors' hits in fixed windows and decides. Never raises to the caller."""

    #: The ``backend`` label of the up gauge.
    backend = "abstract"

    def __init__(
        self,
        *,
        failure_mode: FailureMode = FailureMode.OPEN,
        clock: Callable[[], float] = time.time,
        metrics: RateLimitMetrics | None = None,
        key_prefix: str = "",
    ) -> None:
        self.failure_mode = failure_mode
        self._clock = clock
        self.metrics = metrics or RateLimitMetrics()
        self._key_prefix = key_prefix
        self._up: bool | None = None

    @abc.abstractmethod
    async def _increment(self, increments: Sequence[Increment]) -> list[Counted]:
        """Apply the increments in one round trip; raise CounterBackendError."""

    @abc.abstractmethod
    async def _replace(self, replacements: Sequence[Replace]) -> list[int | None]:
        """Apply the replacements in one round trip: what each record held (None when
        there was none, and nothing changed). Raise CounterBackendError."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the in-memory store has none."""

    @property
    def up(self) -> bool | None:
        """Whether the last round trip to the store worked; None before the first."""
        return self._up

    async def ping(self) -> bool:
        """Whether the store answers now (for readiness checks); updates the up gauge."""
        self._set_up(True)
        return True

    def _set_up(self, up: bool, reason: object = "") -> None:
        """Record the store's state; log only when it changes, not once per request."""
        self.metrics.backend_up.labels(self.backend).set(1 if up else 0)
        if up and self._up is False:
            log.info("%s counters are reachable again", self.backend)
        elif not up and self._up is not False:
            log.warning(
                "%s counters unavailable, failing %s: %s", self.backend, self.failure_mode, reason
            )
        self._up = up

    async def check(self, domain: str, checks: Sequence[Check]) -> list[Decision]:
        """Count and decide each descriptor of one request, in order."""
        now = self._clock()
        decisions: list[Decision | None] = [None] * len(checks)
        increments: list[Increment] = []
        counted: list[tuple[int, Rule, float, str | None]] = []
        for i, c in enumerate(checks):
            rule = c.rule
            if rule is None:
                decisions[i] = Decision(Result.OK)
            elif rule.limit.unlimited:
                decisions[i] = Decision(Result.OK, rule, remaining=UNLIMITED_REMAINING)
            else:
                unit_s = rule.limit.unit.seconds
                start, reset = window(now, unit_s)
                key = cache_key(self._key_prefix, domain, c.entries, start)
                reservation = None
                if c.reserve:
                    nonce = secrets.token_hex(8)
                    reservation = f"{start}.{nonce}"
                    increment = Increment(
                        key,
                        c.hits,
                        unit_s,
                        fit_within=rule.limit.requests_per_unit,
                        record=record_key(self._key_prefix, key, nonce),
                        record_ttl_s=max(1, math.ceil(reset)),
                    )
                else:
                    increment = Increment(key, max(1, c.hits), unit_s)
                increments.append(increment)
                counted.append((i, rule, reset, reservation))
        results: Sequence[Counted | None] = []
        if increments:
            counts = await self._guarded(lambda: self._increment(increments), len(increments))
            results = counts if counts is not None else [None] * len(increments)
            for (i, rule, reset, reservation), result in zip(counted, results, strict=True):
                decisions[i] = self._decide(rule, result, reset, reservation)
        out = [d if d is not None else Decision(Result.OK) for d in decisions]
        for d in out:
            if d.rule is not None:
                self.metrics.decisions.labels(domain, d.rule.name, d.result).inc()
        for (_, rule, _, _), inc, result in zip(counted, increments, results, strict=True):
            if result is not None and result.added:
                self.metrics.hits.labels(domain, rule.name).inc(inc.hits)
        failed = sum(1 for d in out if d.backend_error)
        if failed:
            self.metrics.failure_mode_decisions.labels(str(self.failure_mode)).inc(failed)
        return out

    async def settle(self, domain: str, settlements: Sequence[Settlement]) -> list[SettleResult]:
        """Replace each settlement's reservation by its usage (see the module docstring);
        one without a reservation adds its usage to the current window. Never raises."""
        now = self._clock()
        out = [SettleResult(Settled.SKIPPED)] * len(settlements)
        replacements: list[tuple[int, Replace]] = []
        charges: list[tuple[int, Increment]] = []
        for i, s in enumerate(settlements):
            rule = s.rule
            if rule is None or rule.limit.unlimited:
                continue
            if s.reservation is None:
                start, _ = window(now, rule.limit.unit.seconds)
                key = cache_key(self._key_prefix, domain, s.entries, start)
                charges.append((i, Increment(key, s.used, rule.limit.unit.seconds)))
                continue
            parsed = parse_reservation(s.reservation)
            if parsed is None:
                out[i] = UNKNOWN
                continue
            key = cache_key(self._key_prefix, domain, s.entries, parsed[0])
            record = record_key(self._key_prefix, key, parsed[1])
            replacements.append((i, Replace(record, key, s.used)))
        if replacements:
            ops = [r for _, r in replacements]
            found = await self._guarded(lambda: self._replace(ops), len(ops))
            for (i, _), held in zip(replacements, found or [], strict=False):
                out[i] = SettleResult(Settled.REPLACED, held) if held is not None else UNKNOWN
        if charges:
            increments = [c for _, c in charges]
            if await self._guarded(lambda: self._increment(increments), len(increments)):
                for i, _ in charges:
                    out[i] = SettleResult(Settled.CHARGED)
        return out

    async def _guarded(self, apply: Callable[[], Awaitable[list[_T]]], n: int) -> list[_T] | None:
        """``apply()``'s ``n`` results, or None when the store failed (logged and counted)."""
        try:
            results = await apply()
            if len(results) != n:
                raise CounterBackendError(f"{len(results)} results for {n} operations")
        except CounterBackendError as exc:
            self._set_up(False, exc)
        except Exception as exc:
            log.exception("%s counters failed, failing %s", self.backend, self.failure_mode)
            self._set_up(False, exc)
        else:
            self._set_up(True)
            return results
        self.metrics.redis_errors.inc()
        return None

    def _decide(
        self, rule: Rule, counted: Counted | None, reset: float, reservation: str | None
    ) -> Decision:
        limit = rule.limit.requests_per_unit
        if counted is None:  # the store failed: the failure mode decides
            allow = self.failure_mode is FailureMode.OPEN
            return Decision(
                result=Result.OK if allow else Result.OVER_LIMIT,
                rule=rule,
                remaining=limit if allow else 0,
                reset_after_s=reset,
                backend_error=True,
            )
        count = counted.count
        if not counted.added:  # a reservation that did not fit: refused, and not counted
            return Decision(
                Result.OVER_LIMIT, rule, count, remaining=max(0, limit - count), reset_after_s=reset
            )
        if count > limit:
            result = Result.SHADOW_OVER_LIMIT if rule.shadow_mode else Result.OVER_LIMIT
            return Decision(result=result, rule=rule, count=count, reset_after_s=reset)
        return Decision(
            result=Result.OK,
            rule=rule,
            count=count,
            remaining=limit - count,
            reset_after_s=reset,
            reservation=reservation,
        )


class InMemoryCounters(Counters):
    """Counters in this process: exact for one replica, not shared between replicas."""

    backend = "memory"

    #: How often expired windows are swept out, in seconds.
    SWEEP_INTERVAL_S = 1.0
    #: Open reservations kept at most. Beyond it a reservation still counts, but is not
    #: recorded: it cannot be settled, so it is charged in full (never undercharged).
    MAX_RECORDS = 1_000_000

    def __init__(
        self,
        *,
        failure_mode: FailureMode = FailureMode.OPEN,
        clock: Callable[[], float] = time.time,
        metrics: RateLimitMetrics | None = None,
        key_prefix: str = "",
    ) -> None:
        super().__init__(
            failure_mode=failure_mode, clock=clock, metrics=metrics, key_prefix=key_prefix
        )
        self._counts: dict[str, tuple[int, float]] = {}
        #: Reservation record -> (tokens held, expiry).
        self._records: dict[str, tuple[int, float]] = {}
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._counts)

    @property
    def open_reservations(self) -> int:
        return len(self._records)

    def _now(self) -> float:
        now = self._clock()
        if now >= self._next_sweep:
            self._counts = {k: v for k, v in self._counts.items() if v[1] > now}
            self._records = {k: v for k, v in self._records.items() if v[1] > now}
            self._next_sweep = now + self.SWEEP_INTERVAL_S
        return now

    def _count(self, key: str, now: float) -> int:
        count, expires = self._counts.get(key, (0, 0.0))
        return count if expires > now else 0

    async def _increment(self, increments: Sequence[Increment]) -> list[Counted]:
        # No await in here: on one event loop the whole batch is atomic.
        now = self._now()
        out: list[Counted] = []
        for inc in increments:
            count = self._count(inc.key, now)
            if inc.fit_within is not None and count + inc.hits > inc.fit_within:
                out.append(Counted(count, added=False))
                continue
            count += inc.hits
            self._counts[inc.key] = (count, now + inc.expire_s)
            if inc.record and len(self._records) < self.MAX_RECORDS:
                self._records[inc.record] = (inc.hits, now + inc.record_ttl_s)
            out.append(Counted(count))
        return out

    async def _replace(self, replacements: Sequence[Replace]) -> list[int | None]:
        now = self._now()
        out: list[int | None] = []
        for r in replacements:
            held, expires = self._records.pop(r.record, (0, 0.0))
            if expires <= now:
                out.append(None)
                continue
            count, key_expires = self._counts.get(r.key, (0, 0.0))
            if key_expires > now:
                self._counts[r.key] = (count + r.used - held, key_expires)
            out.append(held)
        return out


#: KEYS: the window's counter, a reservation record to create ('' for none). ARGV: hits,
#: the counter's expiry (s), the limit the count must stay within (-1: none), the
#: record's expiry (s). Returns {count, added}: the count as it stands when not added.
_INCREMENT = """
local hits = tonumber(ARGV[1])
local within = tonumber(ARGV[3])
if within >= 0 then
  local count = tonumber(redis.call('GET', KEYS[1]) or '0')
  if count + hits > within then return {count, 0} end
end
local count = redis.call('INCRBY', KEYS[1], hits)
redis.call('EXPIRE', KEYS[1], ARGV[2])
if KEYS[2] ~= '' then redis.call('SET', KEYS[2], hits, 'EX', ARGV[4]) end
return {count, 1}
"""

#: KEYS: a reservation record, its window's counter. ARGV: the tokens used. Takes the
#: record and adds used minus what it held to the counter (while the counter lives).
#: Returns what the record held, or nil when there was none.
_REPLACE = """
local held = redis.call('GET', KEYS[1])
if not held then return nil end
redis.call('DEL', KEYS[1])
local delta = tonumber(ARGV[1]) - tonumber(held)
if delta ~= 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('INCRBY', KEYS[2], delta)
end
return tonumber(held)
"""


def _increment_args(inc: Increment) -> tuple[int, ...]:
    within = -1 if inc.fit_within is None else inc.fit_within
    return (inc.hits, inc.expire_s, within, inc.record_ttl_s)


class RedisCounters(Counters):
    """Counters in Redis, shared by every replica that uses the same server.

    ``url`` is what ``redis.asyncio.from_url`` takes (``redis://host:port/0``,
    ``unix:///path/redis.sock``). Keys start with ``key_prefix``, so the counters can
    share a Redis with other users. ``timeout_s`` bounds one round trip, connecting
    included; past it the failure mode decides. One immediate retry covers a pooled
    connection that went stale (a Redis restart); nothing waits or backs off beyond it.
    """

    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        failure_mode: FailureMode = FailureMode.OPEN,
        clock: Callable[[], float] = time.time,
        metrics: RateLimitMetrics | None = None,
        key_prefix: str = "inferlane:",
        timeout_s: float = 0.1,
    ) -> None:
        super().__init__(
            failure_mode=failure_mode, clock=clock, metrics=metrics, key_prefix=key_prefix
        )
        self.url = url
        self._timeout_s = timeout_s
        self._client = redis_asyncio.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
        )

    async def _increment(self, increments: Sequence[Increment]) -> list[Counted]:
        replies = await self._run(
            (_INCREMENT, (inc.key, inc.record), _increment_args(inc)) for inc in increments
        )
        try:
            return [Counted(int(count), bool(added)) for count, added in replies]
        except (TypeError, ValueError) as exc:
            raise CounterBackendError(f"unexpected reply to an increment: {exc}") from exc

    async def _replace(self, replacements: Sequence[Replace]) -> list[int | None]:
        replies = await self._run((_REPLACE, (r.record, r.key), (r.used,)) for r in replacements)
        try:
            return [None if held is None else int(held) for held in replies]
        except (TypeError, ValueError) as exc:
            raise CounterBackendError(f"unexpected reply to a settlement: {exc}") from exc

    async def _run(
        self, calls: Iterable[tuple[str, tuple[str, str], tuple[int, ...]]]
    ) -> list[Any]:
        """Run each (script, keys, args) in one pipelined round trip. EVAL rather than
        EVALSHA: Redis caches the compiled script either way, and nothing has to be
        loaded first or again after a Redis restart."""
        try:
            async with asyncio.timeout(self._timeout_s * 2):
                pipe = self._client.pipeline(transaction=False)
                for script, keys, args in calls:
                    pipe.eval(script, len(keys), *keys, *args)
                return list(await pipe.execute())
        except (RedisError, OSError, TimeoutError) as exc:
            raise CounterBackendError(f"{type(exc).__name__}: {exc}") from exc

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s * 2):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            self._set_up(False, exc)
            return False
        self._set_up(True)
        return True

    async def close(self) -> None:
        await self._client.aclose()
