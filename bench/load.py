"""An open-loop load generator for OpenAI-style completion endpoints.

Open loop: requests start on a precomputed Poisson schedule whether or not earlier
ones have finished, as independent users would send them. A slow server therefore
builds a queue instead of slowing the generator down, which is what makes tail
latency under overload visible. Each request carries a priority class in
``x-inference-priority`` (and, optionally, a ``Host`` for Envoy to route on).

The run is bounded three ways: the schedule ends at ``duration_s``, at most
``max_requests`` are sent, and every request has a ``timeout_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TextIO

import aiohttp

from bench.gpu_sim import SERVED_BY_HEADER
from mesh.model import PRIORITY_HEADER

#: Statuses counted as shed: the rate limiter's 429 and an overloaded backend's 503.
SHED_STATUSES = frozenset({429, 503})
#: The status recorded for a request that got no HTTP response (timeout, reset, refused).
NO_RESPONSE = 0

DEFAULT_MIX: Mapping[str, float] = MappingProxyType({"critical": 0.3, "sheddable": 0.7})


@dataclass(frozen=True)
class LoadSpec:
    """One load run. Rates in requests per second, times in seconds."""

    #: Base URL, e.g. an Envoy listener ``http://127.0.0.1:15001``.
    url: str
    #: Total arrival rate across all classes.
    rate_rps: float
    #: Length of the arrival schedule; in-flight requests are then awaited.
    duration_s: float
    #: Class name to weight (any scale; normalised). Sent as ``x-inference-priority``.
    mix: Mapping[str, float] = field(default_factory=lambda: DEFAULT_MIX)
    #: ``Host`` header, e.g. ``llama.default.svc.cluster.local``; None sends the URL's.
    host: str | None = None
    path: str = "/v1/completions"
    model: str = "llama"
    prompt: str = "Say hello to the fast lane."
    max_tokens: int = 16
    #: Per-request deadline, connection included.
    timeout_s: float = 30.0
    #: Hard cap on requests sent; None means the schedule decides.
    max_requests: int | None = None
    #: Requests outstanding at once; an arrival past it is recorded as a client error
    #: (not sent), so a dead server cannot exhaust file descriptors.
    max_in_flight: int = 2000
    #: Seeds the arrival times and the class draws; None for a fresh schedule each run.
    seed: int | None = None
    extra_headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not self.rate_rps > 0 or not self.duration_s > 0 or not self.timeout_s > 0:
            raise ValueError("rate_rps, duration_s and timeout_s must be positive")
        if not self.mix or any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix needs non-negative weights with a positive sum: {self.mix}")
        if self.max_requests is not None and self.max_requests < 0:
            raise ValueError("max_requests must not be negative")
        object.__setattr__(self, "mix", MappingProxyType(dict(self.mix)))
        object.__setattr__(self, "extra_headers", MappingProxyType(dict(self.extra_headers)))


@dataclass(frozen=True)
class Arrival:
    """One scheduled request: when (seconds after the start) and which class."""

    at_s: float
    cls: str


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request."""

    cls: str
    #: HTTP status, or NO_RESPONSE (0) when none came back.
    status: int
    #: From send to the last byte of the body (or to the failure), in milliseconds.
    latency_ms: float
    #: The ``x-served-by`` response header, when present.
    served_by: str | None
    #: Start time, seconds after the run began.
    started_s: float
    #: Why there was no response (``timeout``, the exception name, ``client-overload``).
    error: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def shed(self) -> bool:
        return self.status in SHED_STATUSES


@dataclass(frozen=True)
class ClassSummary:
    """Per-class outcome. Percentiles are over successful requests only (None if none)."""

    cls: str
    requests: int
    successes: int
    sheds: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    #: Successful requests per ``x-served-by`` pod.
    served_by: Mapping[str, int]

    @property
    def success_rate(self) -> float:
        return self.successes / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class LoadResult:
    spec: LoadSpec
    records: tuple[RequestRecord, ...]
    elapsed_s: float

    def summary(self) -> dict[str, ClassSummary]:
        return summarize(self.records, classes=tuple(self.spec.mix))

    def latencies_by_class(self, successes_only: bool = True) -> dict[str, list[float]]:
        """Latencies in ms per class (the simple shape :mod:`bench.plot` takes)."""
        out: dict[str, list[float]] = {cls: [] for cls in self.spec.mix}
        for rec in self.records:
            if rec.ok or not successes_only:
                out.setdefault(rec.cls, []).append(rec.latency_ms)
        return out


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least pct% of values at or below."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(
    records: Sequence[RequestRecord], classes: Sequence[str] = ()
) -> dict[str, ClassSummary]:
    """Per-class counts and percentiles; ``classes`` are listed first, even when empty."""
    groups: dict[str, list[RequestRecord]] = {cls: [] for cls in classes}
    for rec in records:
        groups.setdefault(rec.cls, []).append(rec)
    return {cls: _summarize_class(cls, recs) for cls, recs in groups.items()}


def _summarize_class(cls: str, recs: Sequence[RequestRecord]) -> ClassSummary:
    ok = [r for r in recs if r.ok]
    latencies = [r.latency_ms for r in ok]
    served = Counter(r.served_by for r in ok if r.served_by)
    sheds = sum(1 for r in recs if r.shed)
    return ClassSummary(
        cls=cls,
        requests=len(recs),
        successes=len(ok),
        sheds=sheds,
        errors=len(recs) - len(ok) - sheds,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        served_by=MappingProxyType(dict(sorted(served.items()))),
    )


def format_table(summary: Mapping[str, ClassSummary]) -> str:
    """A compact fixed-width table, one line per class."""
    header = f"{'class':<11}{'reqs':>6}{'ok':>6}{'shed':>6}{'err':>5}{'p50 ms':>9}{'p99 ms':>9}"
    lines = [header + "  served by"]
    for s in summary.values():
        pods = ", ".join(f"{pod}={n}" for pod, n in s.served_by.items()) or "-"
        lines.append(
            f"{s.cls:<11}{s.requests:>6}{s.successes:>6}{s.sheds:>6}{s.errors:>5}"
            f"{_ms(s.p50_ms):>9}{_ms(s.p99_ms):>9}  {pods}"
        )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def build_schedule(spec: LoadSpec, rng: random.Random | None = None) -> list[Arrival]:
    """Poisson arrivals at ``rate_rps`` over ``duration_s``, capped at ``max_requests``."""
    rng = rng or random.Random(spec.seed)
    classes = list(spec.mix)
    weights = [spec.mix[c] for c in classes]
    cap = spec.max_requests if spec.max_requests is not None else math.inf
    arrivals: list[Arrival] = []
    at = rng.expovariate(spec.rate_rps)
    while at < spec.duration_s and len(arrivals) < cap:
        arrivals.append(Arrival(at, rng.choices(classes, weights)[0]))
        at += rng.expovariate(spec.rate_rps)
    return arrivals


def parse_mix(text: str) -> dict[str, float] | str:
    """Parse ``critical=30,sheddable=70``; never raises: bad input gives an error message."""
    mix: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, weight = part.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            return f"expected CLASS=WEIGHT, got {part!r}"
        try:
            value = float(weight)
        except ValueError:
            return f"weight of {name!r} is not a number: {weight.strip()!r}"
        if not math.isfinite(value) or value < 0:
            return f"weight of {name!r} must be a finite number >= 0, got {weight.strip()!r}"
        if name in mix:
            return f"class {name!r} given twice"
        mix[name] = value
    if not mix or sum(mix.values()) <= 0:
        return "the mix needs at least one class with a positive weight"
    return mix


class _Progress:
    """A one-line progress bar, redrawn with ``\\r`` while the run goes on."""

    WIDTH = 24

    def __init__(self, out: TextIO, total: int) -> None:
        self._out = out
        self._total = max(total, 1)
        self.sent = 0
        self.ok = 0
        self.shed = 0
        self.errors = 0

    def record(self, rec: RequestRecord) -> None:
        if rec.ok:
            self.ok += 1
        elif rec.shed:
            self.shed += 1
        else:
            self.errors += 1

    @property
    def in_flight(self) -> int:
        return self.sent - self.ok - self.shed - self.errors

    def draw(self) -> None:
        filled = self.WIDTH * self.sent // self._total
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self._out.write(
            f"\r[{bar}] {self.sent}/{self._total} sent, {self.in_flight} in flight,"
            f" ok {self.ok} shed {self.shed} err {self.errors} "
        )
        self._out.flush()

    def finish(self) -> None:
        self.draw()
        self._out.write("\n")
        self._out.flush()


async def run_load(
    spec: LoadSpec,
    *,
    session: aiohttp.ClientSession | None = None,
    progress: bool | None = None,
    progress_out: TextIO | None = None,
) -> LoadResult:
    """Send the spec's schedule and return every request's record.

    ``progress`` None shows the bar only when ``progress_out`` (default stderr) is a tty.
    A given ``session`` is used as is and left open; otherwise one is made and closed.
    """
    schedule = build_schedule(spec)
    out = progress_out or sys.stderr
    show = out.isatty() if progress is None else progress
    bar = _Progress(out, len(schedule)) if show else None
    if session is not None:
        return await _run(spec, schedule, session, bar)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as own:
        return await _run(spec, schedule, own, bar)


async def _run(
    spec: LoadSpec,
    schedule: Sequence[Arrival],
    session: aiohttp.ClientSession,
    bar: _Progress | None,
) -> LoadResult:
    records: list[RequestRecord] = []
    pending: set[asyncio.Task[None]] = set()
    start = time.perf_counter()

    async def one(arrival: Arrival) -> None:
        rec = await _send(spec, session, arrival.cls, start)
        records.append(rec)
        if bar:
            bar.record(rec)

    drawer = asyncio.create_task(_redraw(bar), name="load-progress") if bar else None
    try:
        for arrival in schedule:
            delay = start + arrival.at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if bar:
                bar.sent += 1
            if len(pending) >= spec.max_in_flight:
                rec = _overload_record(arrival, start)
                records.append(rec)
                if bar:
                    bar.record(rec)
            else:
                task = asyncio.create_task(one(arrival), name="load-request")
                pending.add(task)
                task.add_done_callback(pending.discard)
        while pending:
            await asyncio.wait(set(pending))
    finally:
        for task in pending:
            task.cancel()
        if drawer:
            drawer.cancel()
        if bar:
            bar.finish()
    records.sort(key=lambda r: r.started_s)
    return LoadResult(spec=spec, records=tuple(records), elapsed_s=time.perf_counter() - start)


async def _redraw(bar: _Progress, every_s: float = 0.2) -> None:
    while True:
        bar.draw()
        await asyncio.sleep(every_s)


def _overload_record(arrival: Arrival, start: float) -> RequestRecord:
    return RequestRecord(
        cls=arrival.cls,
        status=NO_RESPONSE,
        latency_ms=0.0,
        served_by=None,
        started_s=time.perf_counter() - start,
        error="client-overload",
    )


async def _send(
    spec: LoadSpec, session: aiohttp.ClientSession, cls: str, start: float
) -> RequestRecord:
    headers = {**spec.extra_headers, PRIORITY_HEADER: cls}
    if spec.host:
        headers["Host"] = spec.host
    body = {"model": spec.model, "prompt": spec.prompt, "max_tokens": spec.max_tokens}
    sent = time.perf_counter()
    status, served_by, error = NO_RESPONSE, None, None
    try:
        async with session.post(
            spec.url.rstrip("/") + spec.path,
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=spec.timeout_s),
        ) as resp:
            await resp.read()
            status, served_by = resp.status, resp.headers.get(SERVED_BY_HEADER)
    except TimeoutError:
        error = "timeout"
    except aiohttp.ClientError as exc:
        error = type(exc).__name__
    done = time.perf_counter()
    return RequestRecord(
        cls=cls,
        status=status,
        latency_ms=(done - sent) * 1000.0,
        served_by=served_by,
        started_s=sent - start,
        error=error,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.load --url URL --rate 50 --duration 10 --mix critical=3,sheddable=7``"""
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--mix", default="critical=30,sheddable=70")
    parser.add_argument("--host", help="Host header, e.g. llama.default.svc.cluster.local")
    parser.add_argument("--model", default="llama")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument("--max-requests", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    mix = parse_mix(args.mix)
    if isinstance(mix, str):
        parser.error(f"--mix: {mix}")
    try:
        spec = LoadSpec(
            url=args.url,
            rate_rps=args.rate,
            duration_s=args.duration,
            mix=mix,
            host=args.host,
            model=args.model,
            max_tokens=args.max_tokens,
            timeout_s=args.timeout,
            max_requests=args.max_requests,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    result = asyncio.run(run_load(spec, progress=False if args.no_progress else None))
    print(format_table(result.summary()))
    print(f"{len(result.records)} requests in {result.elapsed_s:.1f} s")


if __name__ == "__main__":
    main()
