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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as redis_asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ratelimit.rules import Entry, Rule

log = logging.getLogger(__name__)

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

    @property
    def allowed(self) -> bool:
        return self.result is not Result.OVER_LIMIT


class CounterBackendError(Exception):
    """The counter store could not be reached or answered wrongly."""


@dataclass(frozen=True)
class Increment:
    """One pipelined ``INCRBY key hits`` + ``EXPIRE key expire_s``."""

    key: str
    hits: int
    expire_s: int


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
    async def _increment(self, increments: Sequence[Increment]) -> list[int]:
        """Apply the increments in one round trip; the counts after. Raise CounterBackendError."""

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
        counted: list[tuple[int, Rule, float]] = []
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
                increments.append(Increment(key, max(1, c.hits), unit_s))
                counted.append((i, rule, reset))
        if increments:
            counts = await self._guarded_increment(increments)
            for (i, rule, reset), count in zip(counted, counts, strict=True):
                decisions[i] = self._decide(rule, count, reset)
        out = [d if d is not None else Decision(Result.OK) for d in decisions]
        for d in out:
            if d.rule is not None:
                self.metrics.decisions.labels(domain, d.rule.name, d.result).inc()
        for (_, rule, _), inc in zip(counted, increments, strict=True):
            self.metrics.hits.labels(domain, rule.name).inc(inc.hits)
        failed = sum(1 for d in out if d.backend_error)
        if failed:
            self.metrics.failure_mode_decisions.labels(str(self.failure_mode)).inc(failed)
        return out

    async def _guarded_increment(self, increments: Sequence[Increment]) -> list[int | None]:
        try:
            counts = await self._increment(increments)
            if len(counts) != len(increments):
                raise CounterBackendError(f"{len(counts)} counts for {len(increments)} keys")
        except CounterBackendError as exc:
            self._set_up(False, exc)
        except Exception as exc:
            log.exception("%s counters failed, failing %s", self.backend, self.failure_mode)
            self._set_up(False, exc)
        else:
            self._set_up(True)
            return list(counts)
        self.metrics.redis_errors.inc()
        return [None] * len(increments)

    def _decide(self, rule: Rule, count: int | None, reset: float) -> Decision:
        limit = rule.limit.requests_per_unit
        if count is None:  # the store failed: the failure mode decides
            allow = self.failure_mode is FailureMode.OPEN
            return Decision(
                result=Result.OK if allow else Result.OVER_LIMIT,
                rule=rule,
                remaining=limit if allow else 0,
                reset_after_s=reset,
                backend_error=True,
            )
        if count > limit:
            result = Result.SHADOW_OVER_LIMIT if rule.shadow_mode else Result.OVER_LIMIT
            return Decision(result=result, rule=rule, count=count, reset_after_s=reset)
        return Decision(
            result=Result.OK, rule=rule, count=count, remaining=limit - count, reset_after_s=reset
        )


class InMemoryCounters(Counters):
    """Counters in this process: exact for one replica, not shared between replicas."""

    backend = "memory"

    #: How often expired windows are swept out, in seconds.
    SWEEP_INTERVAL_S = 1.0

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
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._counts)

    async def _increment(self, increments: Sequence[Increment]) -> list[int]:
        # No await in here: on one event loop the whole batch is atomic.
        now = self._clock()
        if now >= self._next_sweep:
            self._counts = {k: v for k, v in self._counts.items() if v[1] > now}
            self._next_sweep = now + self.SWEEP_INTERVAL_S
        out: list[int] = []
        for inc in increments:
            count, expires = self._counts.get(inc.key, (0, 0.0))
            if expires <= now:
                count = 0
            count += inc.hits
            self._counts[inc.key] = (count, now + inc.expire_s)
            out.append(count)
        return out


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

    async def _increment(self, increments: Sequence[Increment]) -> list[int]:
        try:
            async with asyncio.timeout(self._timeout_s * 2):
                pipe = self._client.pipeline(transaction=False)
                for inc in increments:
                    pipe.incrby(inc.key, inc.hits)
                    pipe.expire(inc.key, inc.expire_s)
                replies = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise CounterBackendError(f"{type(exc).__name__}: {exc}") from exc
        try:
            return [int(r) for r in replies[0::2]]
        except (TypeError, ValueError) as exc:
            raise CounterBackendError(f"unexpected INCRBY reply: {exc}") from exc

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
