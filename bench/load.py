"""An open-loop, seeded, streaming load generator for OpenAI-style model servers.

Open loop: every caller's requests start on a precomputed Poisson schedule whether or not
earlier ones have finished, as independent users send them. A slow server therefore
builds a queue instead of slowing the generator down, which is what makes tail latency
under overload visible.

Several callers share one run, each with its own rate share, class mix and API
(completions or chat). Each request carries its class in ``x-inference-priority``, a
prompt and an output length drawn from long-tailed (log-normal, clipped) distributions,
and ``stream: true``. The schedule depends only on the seed, so every scenario of a
benchmark gets the very same arrivals.

Per request it records the time to the first token (TTFT), the time to the end, the
tokens received and how it ended. A request counts as a success only if its stream ended
with ``data: [DONE]`` before its deadline. Percentiles in :func:`summarize` rank every
failure at the deadline, so a server cannot look fast by failing its slow requests.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, TextIO

import aiohttp

from bench.gpu_sim import SERVED_BY_HEADER
from mesh.model import PRIORITY_HEADER, REFUSED_HEADER

#: Statuses counted as shed: a rate limit's 429 and an overloaded backend's 503.
SHED_STATUSES: Final = frozenset({429, 503})
#: The status recorded for a request that got no HTTP response (timeout, reset, refused).
NO_RESPONSE: Final = 0
#: vLLM's ``priority`` for each class, when the callers write it into the body.
VLLM_PRIORITY: Final = MappingProxyType({"critical": 0, "standard": 1, "sheddable": 2})

DEFAULT_MIX: Final[Mapping[str, float]] = MappingProxyType({"critical": 0.3, "sheddable": 0.7})


class ApiKind(enum.StrEnum):
    COMPLETIONS = "completions"
    CHAT = "chat"

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self is ApiKind.CHAT else "/v1/completions"


@dataclass(frozen=True)
class LengthDist:
    """Token counts drawn from a log-normal distribution, clipped to ``[low, high]``.

    LLM prompt and output lengths are long-tailed (ShareGPT's, for example, span three
    orders of magnitude with a median far below the mean); a log-normal is the usual fit.
    """

    median: float
    sigma: float
    low: int
    high: int

    def __post_init__(self) -> None:
        if not (self.median > 0 and self.sigma >= 0 and 1 <= self.low <= self.high):
            raise ValueError(f"bad length distribution: {self}")

    def draw(self, rng: random.Random) -> int:
        value = rng.lognormvariate(math.log(self.median), self.sigma)
        return int(min(self.high, max(self.low, round(value))))

    def mean(self, samples: int = 20_000, seed: int = 0) -> float:
        rng = random.Random(seed)
        return sum(self.draw(rng) for _ in range(samples)) / samples


#: Prompts: median 256 tokens, one in twenty over about 1,000, at most 2,048.
PROMPT_LENGTHS: Final = LengthDist(median=256, sigma=0.8, low=16, high=2048)
#: Outputs: median 32 tokens (mean about 44), one in a hundred over about 200, at most 256.
OUTPUT_LENGTHS: Final = LengthDist(median=32, sigma=0.8, low=4, high=256)


@dataclass(frozen=True)
class Caller:
    """One client of the Service: its share of the total rate and its class mix."""

    name: str
    share: float
    mix: Mapping[str, float]
    api: ApiKind = ApiKind.COMPLETIONS

    def __post_init__(self) -> None:
        if not self.share > 0:
            raise ValueError(f"{self.name}: share must be positive")
        if not self.mix or any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError(f"{self.name}: mix needs non-negative weights with a positive sum")
        object.__setattr__(self, "mix", MappingProxyType(dict(self.mix)))
        object.__setattr__(self, "api", ApiKind(self.api))


@dataclass(frozen=True)
class LoadSpec:
    """One load run. Rates in requests per second, times in seconds."""

    callers: tuple[Caller, ...]
    #: Total arrival rate of all callers together.
    rate_rps: float
    #: Length of the arrival schedule; in-flight requests are then awaited.
    duration_s: float
    #: ``Host`` header, e.g. ``llama.default.svc.cluster.local``; None sends the URL's.
    host: str | None = None
    model: str = "llama"
    prompt_lengths: LengthDist = PROMPT_LENGTHS
    output_lengths: LengthDist = OUTPUT_LENGTHS
    #: Per-request deadline, connection and whole stream included.
    timeout_s: float = 60.0
    #: The first token must come within this (a user gives up on a blank screen); once it
    #: has, the stream may go on until ``timeout_s``.
    ttft_timeout_s: float = 10.0
    #: Seeds arrivals, classes and lengths; None for a fresh schedule each run.
    seed: int | None = None
    stream: bool = True
    #: Send only these classes of the schedule (the rest is dropped, arrivals unchanged).
    only: frozenset[str] | None = None
    #: Write vLLM's ``priority`` (:data:`VLLM_PRIORITY`) into each body, from its class.
    body_priority: bool = False
    #: Requests outstanding at once; an arrival past it is recorded as a client error
    #: (not sent), so a dead server cannot exhaust file descriptors.
    max_in_flight: int = 4000
    extra_headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not self.callers:
            raise ValueError("a load needs at least one caller")
        if len({c.name for c in self.callers}) != len(self.callers):
            raise ValueError("caller names must be unique")
        if not self.rate_rps > 0 or not self.duration_s > 0 or not self.timeout_s > 0:
            raise ValueError("rate_rps, duration_s and timeout_s must be positive")
        if not 0 < self.ttft_timeout_s <= self.timeout_s:
            raise ValueError("ttft_timeout_s must be positive and at most timeout_s")
        object.__setattr__(self, "callers", tuple(self.callers))
        object.__setattr__(self, "extra_headers", MappingProxyType(dict(self.extra_headers)))

    @property
    def classes(self) -> tuple[str, ...]:
        """Every class some caller sends, highest priority first where known."""
        names = {cls for c in self.callers for cls, w in c.mix.items() if w > 0}
        known = [c for c in VLLM_PRIORITY if c in names]
        return tuple(known + sorted(names - set(known)))

    def class_share(self, cls: str) -> float:
        """The fraction of all arrivals that are of ``cls``."""
        total = sum(c.share for c in self.callers)
        return (
            sum(c.share * c.mix.get(cls, 0.0) / sum(c.mix.values()) for c in self.callers) / total
        )


@dataclass(frozen=True)
class Arrival:
    """One scheduled request."""

    at_s: float
    caller: str
    cls: str
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request."""

    caller: str
    cls: str
    #: HTTP status, or NO_RESPONSE (0) when none came back.
    status: int
    #: From send to the first token, in milliseconds; None if no token came.
    ttft_ms: float | None
    #: From send to the end of the stream (or to the failure), in milliseconds.
    latency_ms: float
    #: Completion tokens received (the server's ``usage`` when it sent one).
    tokens: int
    #: The ``x-served-by`` response header, when present.
    served_by: str | None
    #: Start time, seconds after the run began.
    started_s: float
    #: Why it failed: ``ttft-timeout`` (no first token in time), ``timeout``, ``cut`` (no
    #: ``[DONE]``), an exception's name, ``client-overload``; None for a success or an
    #: HTTP error status.
    error: str | None = None
    #: The ``x-inferlane-refused`` header of a refusal.
    refused: str | None = None
    max_tokens: int = 0
    #: When the schedule meant it to start (seconds after the run began): the same for
    #: every scenario of a benchmark, so windows cut by it count the very same arrivals.
    scheduled_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def shed(self) -> bool:
        return self.status in SHED_STATUSES


@dataclass(frozen=True)
class ClassSummary:
    """Per-class outcome. Percentiles rank every failure at the deadline; None means the
    percentile is a failure (at or beyond the deadline)."""

    cls: str
    requests: int
    successes: int
    sheds: int
    errors: int
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    e2e_p99_ms: float | None
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
    #: Unix time at which the schedule started (its ``at_s`` = 0).
    started_at: float = 0.0

    def summary(self, since_s: float = 0.0) -> dict[str, ClassSummary]:
        kept = [r for r in self.records if r.scheduled_s >= since_s]
        return summarize(kept, classes=self.spec.classes)

    def latencies_by_class(self, deadline_ms: float | None = None) -> dict[str, list[float]]:
        """Time to first token in ms per class, a failure at ``deadline_ms`` (or left out
        when None): the shape :mod:`bench.plot` takes."""
        out: dict[str, list[float]] = {cls: [] for cls in self.spec.classes}
        for rec in self.records:
            if rec.ok and rec.ttft_ms is not None:
                out.setdefault(rec.cls, []).append(rec.ttft_ms)
            elif deadline_ms is not None:
                out.setdefault(rec.cls, []).append(deadline_ms)
        return out


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least pct% of values at or below."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def failure_ranked(successes: Iterable[float], failures: int, pct: float) -> float | None:
    """The ``pct`` percentile with each failure ranked above every success; None when that
    percentile falls on a failure (or there are no requests)."""
    ranked = sorted(successes) + [math.inf] * failures
    value = percentile(ranked, pct)
    return None if value is None or math.isinf(value) else value


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
    failed = len(recs) - len(ok)
    ttfts = [r.ttft_ms if r.ttft_ms is not None else r.latency_ms for r in ok]
    sheds = sum(1 for r in recs if r.shed)
    return ClassSummary(
        cls=cls,
        requests=len(recs),
        successes=len(ok),
        sheds=sheds,
        errors=failed - sheds,
        ttft_p50_ms=failure_ranked(ttfts, failed, 50),
        ttft_p99_ms=failure_ranked(ttfts, failed, 99),
        e2e_p99_ms=failure_ranked([r.latency_ms for r in ok], failed, 99),
        served_by=MappingProxyType(
            dict(sorted(Counter(r.served_by for r in ok if r.served_by).items()))
        ),
    )


def delivered_tokens(
    records: Iterable[RequestRecord],
    start_s: float,
    end_s: float,
    pods: Iterable[str] | None = None,
) -> float:
    """Tokens that successful requests received between two run times (seconds after the
    start), each request's tokens spread evenly from its first token to its last; only
    requests served by ``pods`` when given. Divided by ``end_s - start_s``: goodput."""
    wanted = None if pods is None else set(pods)
    total = 0.0
    for r in records:
        if not r.ok or r.tokens <= 0 or (wanted is not None and r.served_by not in wanted):
            continue
        first = r.started_s + (r.ttft_ms if r.ttft_ms is not None else r.latency_ms) / 1000.0
        last = r.started_s + r.latency_ms / 1000.0
        if last <= first:
            total += r.tokens if start_s <= last < end_s else 0
            continue
        overlap = min(last, end_s) - max(first, start_s)
        if overlap > 0:
            total += r.tokens * overlap / (last - first)
    return total


def format_table(
    summary: Mapping[str, ClassSummary], deadline_s: float, ttft_deadline_s: float | None = None
) -> str:
    """A compact fixed-width table, one line per class that sent requests. A failure shows
    as ``>=`` its deadline: the first token's for TTFT, the whole request's otherwise."""
    first = deadline_s if ttft_deadline_s is None else ttft_deadline_s
    header = (
        f"{'class':<10}{'reqs':>6}{'ok':>8}{'sheds':>6}{'err':>5}"
        f"{'TTFT p50':>10}{'TTFT p99':>10}{'e2e p99':>10}"
    )
    lines = [header + "  served by"]
    for s in summary.values():
        if not s.requests:
            continue
        pods = ", ".join(f"{pod}={n}" for pod, n in s.served_by.items()) or "-"
        lines.append(
            f"{s.cls:<10}{s.requests:>6}{s.success_rate * 100:>7.1f}%{s.sheds:>6}{s.errors:>5}"
            f"{ms(s.ttft_p50_ms, first):>10}{ms(s.ttft_p99_ms, first):>10}"
            f"{ms(s.e2e_p99_ms, deadline_s):>10}  {pods}"
        )
    return "\n".join(lines)


def ms(value: float | None, deadline_s: float) -> str:
    """A latency for a table: ``123 ms``, ``1.23 s``, or ``>=30 s`` for a failure."""
    if value is None:
        return f">={deadline_s:g} s"
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def build_schedule(spec: LoadSpec, max_requests: int | None = None) -> list[Arrival]:
    """Each caller's Poisson arrivals at its share of ``rate_rps``, merged in time order.

    Each caller has its own random stream (seeded by the seed and its name), so adding a
    caller or a class filter never moves another caller's arrivals.
    """
    total_share = sum(c.share for c in spec.callers)
    arrivals: list[Arrival] = []
    for caller in spec.callers:
        rng = random.Random(None if spec.seed is None else f"{spec.seed}/{caller.name}")
        rate = spec.rate_rps * caller.share / total_share
        classes = list(caller.mix)
        weights = [caller.mix[c] for c in classes]
        at = rng.expovariate(rate)
        while at < spec.duration_s:
            cls = rng.choices(classes, weights)[0]
            prompt = spec.prompt_lengths.draw(rng)
            output = spec.output_lengths.draw(rng)
            if spec.only is None or cls in spec.only:
                arrivals.append(Arrival(at, caller.name, cls, prompt, output))
            at += rng.expovariate(rate)
    arrivals.sort(key=lambda a: a.at_s)
    return arrivals[:max_requests] if max_requests is not None else arrivals


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
    urls: Mapping[str, str],
    *,
    session: aiohttp.ClientSession | None = None,
    progress: bool | None = None,
    progress_out: TextIO | None = None,
) -> LoadResult:
    """Send the spec's schedule, each caller's requests to ``urls[caller]``, and return
    every request's record.

    ``progress`` None shows the bar only when ``progress_out`` (default stderr) is a tty.
    A given ``session`` is used as is and left open; otherwise one is made and closed.
    """
    missing = [c.name for c in spec.callers if c.name not in urls]
    if missing:
        raise ValueError(f"no URL for caller(s) {', '.join(missing)}")
    schedule = build_schedule(spec)
    out = progress_out or sys.stderr
    show = out.isatty() if progress is None else progress
    bar = _Progress(out, len(schedule)) if show else None
    if session is not None:
        return await _run(spec, urls, schedule, session, bar)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as own:
        return await _run(spec, urls, schedule, own, bar)


async def _run(
    spec: LoadSpec,
    urls: Mapping[str, str],
    schedule: Sequence[Arrival],
    session: aiohttp.ClientSession,
    bar: _Progress | None,
) -> LoadResult:
    records: list[RequestRecord] = []
    pending: set[asyncio.Task[None]] = set()
    apis = {c.name: c.api for c in spec.callers}
    started_at = time.time()
    start = time.perf_counter()

    async def one(arrival: Arrival) -> None:
        url = urls[arrival.caller].rstrip("/") + apis[arrival.caller].path
        rec = await _send(
            spec, session, url=url, api=apis[arrival.caller], arrival=arrival, start=start
        )
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
    records.sort(key=lambda r: r.scheduled_s)
    elapsed = time.perf_counter() - start
    return LoadResult(spec=spec, records=tuple(records), elapsed_s=elapsed, started_at=started_at)


async def _redraw(bar: _Progress, every_s: float = 0.2) -> None:
    while True:
        bar.draw()
        await asyncio.sleep(every_s)


def _overload_record(arrival: Arrival, start: float) -> RequestRecord:
    return RequestRecord(
        caller=arrival.caller,
        cls=arrival.cls,
        status=NO_RESPONSE,
        ttft_ms=None,
        latency_ms=0.0,
        tokens=0,
        served_by=None,
        started_s=time.perf_counter() - start,
        error="client-overload",
        max_tokens=arrival.max_tokens,
        scheduled_s=arrival.at_s,
    )


def request_body(spec: LoadSpec, api: ApiKind, arrival: Arrival) -> dict[str, Any]:
    """An OpenAI body with ``prompt_tokens`` words of prompt and ``max_tokens`` to make."""
    words = " ".join(["token"] * arrival.prompt_tokens)
    body: dict[str, Any] = {"model": spec.model, "max_tokens": arrival.max_tokens}
    if api is ApiKind.CHAT:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    if spec.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if spec.body_priority:
        body["priority"] = VLLM_PRIORITY.get(arrival.cls, max(VLLM_PRIORITY.values()))
    return body


class _StreamReader:
    """Reads server-sent events as they come: when the first token arrived, how many
    tokens came, the server's usage, and whether ``[DONE]`` closed the stream."""

    def __init__(self) -> None:
        self.first_token: float | None = None
        self.tokens = 0
        self.usage_tokens: int | None = None
        self.done = False
        self._buffer = b""

    def feed(self, data: bytes, now: float) -> None:
        self._buffer += data
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            self._event(event.strip(), now)

    def _event(self, event: bytes, now: float) -> None:
        if not event.startswith(b"data:"):
            return  # a comment or another field: not a chunk
        payload = event[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            return
        if not isinstance(chunk, dict):
            return
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = choice.get("text") if delta is None else delta.get("content")
            if text:
                self.tokens += 1
                if self.first_token is None:
                    self.first_token = now


async def _send(
    spec: LoadSpec,
    session: aiohttp.ClientSession,
    *,
    url: str,
    api: ApiKind,
    arrival: Arrival,
    start: float,
) -> RequestRecord:
    headers = {**spec.extra_headers, PRIORITY_HEADER: arrival.cls}
    if spec.host:
        headers["Host"] = spec.host
    body = request_body(spec, api, arrival)
    sent = time.perf_counter()
    status, served_by, refused, error = NO_RESPONSE, None, None, None
    reader = _StreamReader()
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(spec.ttft_timeout_s) as deadline:
            async with session.post(url, json=body, headers=headers) as resp:
                status = resp.status
                served_by = resp.headers.get(SERVED_BY_HEADER)
                refused = resp.headers.get(REFUSED_HEADER)
                if status != 200 or not spec.stream:
                    whole = await resp.read()
                    if status == 200:
                        reader.first_token = time.perf_counter()
                        reader.usage_tokens = _usage_of(whole)
                        reader.done = True
                else:
                    async for data in resp.content.iter_any():
                        had_token = reader.first_token is not None
                        reader.feed(data, time.perf_counter())
                        if not had_token and reader.first_token is not None:
                            left = spec.timeout_s - (reader.first_token - sent)
                            deadline.reschedule(loop.time() + left)
                    if not reader.done:
                        error = "cut"
    except TimeoutError:
        error = "timeout" if reader.first_token is not None else "ttft-timeout"
    except aiohttp.ClientError as exc:
        error = type(exc).__name__
    done = time.perf_counter()
    ttft = None if reader.first_token is None else (reader.first_token - sent) * 1000.0
    return RequestRecord(
        caller=arrival.caller,
        cls=arrival.cls,
        status=status,
        ttft_ms=ttft,
        latency_ms=(done - sent) * 1000.0,
        tokens=reader.usage_tokens if reader.usage_tokens is not None else reader.tokens,
        served_by=served_by,
        started_s=sent - start,
        error=error,
        refused=refused,
        max_tokens=arrival.max_tokens,
        scheduled_s=arrival.at_s,
    )


def _usage_of(body: bytes) -> int | None:
    try:
        usage = json.loads(body).get("usage") or {}
    except (ValueError, AttributeError):
        return None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) else None


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.load --url URL --rate 5 --duration 10 --mix critical=3,sheddable=7``"""
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--mix", default="critical=30,sheddable=70")
    parser.add_argument("--api", choices=[a.value for a in ApiKind], default="completions")
    parser.add_argument("--host", help="Host header, e.g. llama.default.svc.cluster.local")
    parser.add_argument("--model", default="llama")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument("--ttft-timeout", type=float, default=10.0, help="first token, seconds")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-stream", action="store_true", help="whole responses")
    parser.add_argument("--body-priority", action="store_true", help="write vLLM's priority")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    mix = parse_mix(args.mix)
    if isinstance(mix, str):
        parser.error(f"--mix: {mix}")
    try:
        spec = LoadSpec(
            callers=(Caller("client", 1.0, mix, ApiKind(args.api)),),
            rate_rps=args.rate,
            duration_s=args.duration,
            host=args.host,
            model=args.model,
            timeout_s=args.timeout,
            ttft_timeout_s=args.ttft_timeout,
            seed=args.seed,
            stream=not args.no_stream,
            body_priority=args.body_priority,
        )
    except ValueError as exc:
        parser.error(str(exc))
    result = asyncio.run(
        run_load(spec, {"client": args.url}, progress=False if args.no_progress else None)
    )
    print(format_table(result.summary(), spec.timeout_s, spec.ttft_timeout_s))
    print(f"{len(result.records)} requests in {result.elapsed_s:.1f} s")


def only_classes(spec: LoadSpec, classes: Iterable[str]) -> LoadSpec:
    """The same schedule with every other class dropped (the critical-only control)."""
    return replace(spec, only=frozenset(classes))


if __name__ == "__main__":
    main()
