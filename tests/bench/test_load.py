"""The streaming load generator: schedule, lengths, summary maths, goodput, and runs
against the simulator and small stub servers."""

from __future__ import annotations

import io
import itertools
import math
import socket
import statistics
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from bench.gpu_sim import SimConfig, StepCost, start_sim
from bench.load import (
    ApiKind,
    Caller,
    LengthDist,
    LoadSpec,
    RequestRecord,
    _StreamReader,
    build_schedule,
    delivered_tokens,
    failure_ranked,
    format_table,
    only_classes,
    parse_mix,
    percentile,
    run_load,
    summarize,
)

CALLERS = (
    Caller("chat", 2.0, {"critical": 1}),
    Caller("batch", 1.0, {"sheddable": 3, "standard": 1}, ApiKind.CHAT),
)


def record(
    cls: str,
    *,
    status: int = 200,
    ttft: float | None = 10.0,
    latency: float = 100.0,
    pod: str | None = "gpu-0",
    error: str | None = None,
    started: float = 0.0,
    tokens: int = 10,
) -> RequestRecord:
    return RequestRecord(
        caller="c",
        cls=cls,
        status=status,
        ttft_ms=ttft,
        latency_ms=latency,
        tokens=tokens,
        served_by=pod,
        started_s=started,
        error=error,
    )


# --- pure parts ---------------------------------------------------------------------


def test_schedule_is_poisson_per_caller_seeded_and_filterable() -> None:
    spec = LoadSpec(callers=CALLERS, rate_rps=300.0, duration_s=20.0, seed=7)
    schedule = build_schedule(spec)
    assert schedule == build_schedule(spec)
    assert abs(len(schedule) - 6000) < 300  # Poisson: sd about 77
    times = [a.at_s for a in schedule]
    assert times == sorted(times) and times[0] > 0 and times[-1] < 20.0
    by_caller = Counter(a.caller for a in schedule)
    assert by_caller["chat"] / len(schedule) == pytest.approx(2 / 3, abs=0.02)
    batch = [a for a in schedule if a.caller == "batch"]
    gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(batch)]
    assert statistics.mean(gaps) == pytest.approx(0.01, rel=0.06)
    assert statistics.stdev(gaps) == pytest.approx(0.01, rel=0.1)  # exponential: sd = mean
    assert Counter(a.cls for a in batch)["sheddable"] / len(batch) == pytest.approx(0.75, abs=0.03)
    assert spec.class_share("critical") == pytest.approx(2 / 3)
    assert spec.classes == ("critical", "standard", "sheddable")
    # The control keeps the same critical arrivals and drops the rest.
    critical = build_schedule(only_classes(spec, ["critical"]))
    assert critical == [a for a in schedule if a.cls == "critical"]
    # Another seed, another schedule; a caller's arrivals do not depend on the others.
    assert (
        build_schedule(LoadSpec(callers=CALLERS, rate_rps=300.0, duration_s=20.0, seed=8))
        != schedule
    )
    alone = LoadSpec(callers=CALLERS[1:], rate_rps=100.0, duration_s=20.0, seed=7)
    assert build_schedule(alone) == batch


def test_lengths_are_long_tailed_and_clipped() -> None:
    import random

    dist = LengthDist(median=48, sigma=0.9, low=4, high=512)
    rng = random.Random(1)
    values = [dist.draw(rng) for _ in range(20_000)]
    assert min(values) >= 4 and max(values) <= 512
    assert statistics.median(values) == pytest.approx(48, rel=0.05)
    assert statistics.mean(values) > 1.3 * statistics.median(values)  # a long right tail
    assert percentile(values, 99) is not None and percentile(values, 99) > 5 * 48  # type: ignore[operator]
    with pytest.raises(ValueError):
        LengthDist(median=0, sigma=1, low=1, high=2)


def test_summary_ranks_failures_at_the_deadline() -> None:
    records = [record("critical", ttft=float(ms), latency=ms * 2.0) for ms in range(1, 100)]
    records += [record("critical", status=0, ttft=None, error="timeout", pod=None)]
    records += [record("sheddable", status=503), record("sheddable", status=429)]
    records += [record("sheddable", status=200, error="cut"), record("sheddable")]
    summary = summarize(records, classes=("critical", "standard", "sheddable"))
    assert list(summary) == ["critical", "standard", "sheddable"]
    crit = summary["critical"]
    assert (crit.requests, crit.successes, crit.sheds, crit.errors) == (100, 99, 0, 1)
    assert crit.ttft_p50_ms == 50.0 and crit.ttft_p99_ms == 99.0  # one failure in 100 fits
    assert crit.e2e_p99_ms == 198.0 and dict(crit.served_by) == {"gpu-0": 99}
    assert summary["standard"].requests == 0 and summary["standard"].ttft_p99_ms is None
    shed = summary["sheddable"]
    assert (shed.requests, shed.successes, shed.sheds, shed.errors) == (4, 1, 2, 1)
    assert shed.ttft_p50_ms is None  # three of four failed: the median is a failure
    table = format_table(summary, deadline_s=30)
    assert "critical" in table and "gpu-0=99" in table and ">=30 s" in table and "99 ms" in table


@given(st.lists(st.floats(0, 1e6), min_size=1), st.floats(0.1, 100))
def test_percentile_is_a_sample_with_pct_at_or_below(values: list[float], pct: float) -> None:
    p = percentile(values, pct)
    assert p in values
    assert sum(1 for v in values if v <= p) >= math.ceil(pct / 100 * len(values))
    assert sum(1 for v in values if v < p) < max(1, math.ceil(pct / 100 * len(values)))


@given(st.lists(st.floats(0, 1e3), max_size=50), st.integers(0, 50), st.floats(1, 100))
def test_failures_rank_above_every_success(ok: list[float], failed: int, pct: float) -> None:
    value = failure_ranked(ok, failed, pct)
    n = len(ok) + failed
    if n == 0 or math.ceil(pct / 100 * n) > len(ok):
        assert value is None
    else:
        assert value == percentile(ok + [math.inf] * failed, pct)


def test_goodput_spreads_each_requests_tokens_over_its_stream() -> None:
    records = [
        # 100 tokens from 1 s to 3 s: half of them between 2 and 4 s.
        record("critical", ttft=1000.0, latency=3000.0, tokens=100),
        # Not counted: failed, or served by a pod outside the pool.
        record("critical", ttft=1000.0, latency=3000.0, tokens=100, error="cut"),
        record("critical", ttft=1000.0, latency=3000.0, tokens=100, pod="cpu-0"),
        # 40 tokens at once (a whole response) at 2.5 s: inside.
        record("standard", ttft=None, latency=2500.0, tokens=40),
    ]
    assert delivered_tokens(records, 2.0, 4.0, pods=["gpu-0"]) == pytest.approx(90.0)
    assert delivered_tokens(records, 0.0, 10.0) == pytest.approx(240.0)


def test_stream_reader_handles_split_chunks_comments_and_chat_roles() -> None:
    reader = _StreamReader()
    stream = (
        b": keep-alive\n\n"
        b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":" a"}}]}\n\n'
        b'data: {"choices":[{"text":" b"}]}\n\n'
        b'data: {"choices":[],"usage":{"completion_tokens":7}}\n\ndata: [DONE]\n\n'
    )
    for i, byte in enumerate(stream):
        reader.feed(bytes([byte]), float(i))
    assert reader.tokens == 2 and reader.usage_tokens == 7 and reader.done
    end_of_chunk = stream.index(b"\n\n", stream.index(b" a")) + 1
    assert reader.first_token == float(end_of_chunk)  # when its chunk was complete


@given(st.text())
def test_parse_mix_never_raises(text: str) -> None:
    result = parse_mix(text)
    assert isinstance(result, str | dict)
    if isinstance(result, dict):
        assert result and sum(result.values()) > 0


@pytest.mark.parametrize("bad", ["critical", "critical=x", "=3", "a=1,a=2", "a=-1", "a=0", "a=inf"])
def test_parse_mix_errors(bad: str) -> None:
    assert isinstance(parse_mix(bad), str)


def test_spec_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        LoadSpec(callers=CALLERS, rate_rps=0, duration_s=1)
    with pytest.raises(ValueError):
        LoadSpec(callers=(), rate_rps=1, duration_s=1)
    with pytest.raises(ValueError):
        LoadSpec(callers=(CALLERS[0], CALLERS[0]), rate_rps=1, duration_s=1)
    with pytest.raises(ValueError):
        Caller("x", 1.0, {"critical": -1})


# --- against the simulator and stubs ------------------------------------------------


async def test_streams_are_timed_per_token_class_and_caller_against_a_sim() -> None:
    cfg = SimConfig(name="gpu-0", max_num_seqs=64, cost=StepCost.flat(20.0))
    async with await start_sim(cfg) as sim:
        spec = LoadSpec(
            callers=CALLERS,
            rate_rps=40.0,
            duration_s=1.5,
            seed=3,
            output_lengths=LengthDist(median=8, sigma=0.5, low=4, high=20),
        )
        result = await run_load(spec, {"chat": sim.url, "batch": sim.url}, progress=False)
        expected = build_schedule(spec)
        assert len(result.records) == len(expected) > 20
        assert all(r.ok for r in result.records), result.records[:3]
        by_class = Counter(a.cls for a in expected)
        for cls, s in result.summary().items():
            assert s.successes == by_class[cls]
            assert dict(s.served_by) == ({"gpu-0": by_class[cls]} if by_class[cls] else {})
        assert dict(sim.stats().by_priority) == dict(by_class)
        wanted = {(a.caller, a.cls, a.max_tokens) for a in expected}
        assert {(r.caller, r.cls, r.tokens) for r in result.records} == wanted
        for r in result.records:
            # The first token comes after a step or two, the last after one step a token.
            assert r.ttft_ms is not None and 15 < r.ttft_ms < r.latency_ms
            assert r.latency_ms - r.ttft_ms >= 0.8 * 20 * (r.tokens - 1)
        assert sim.stats().generated_tokens == sum(r.tokens for r in result.records)


async def test_body_priority_reaches_a_priority_scheduling_pod() -> None:
    from bench.gpu_sim import Policy

    cfg = SimConfig(name="p", scheduling_policy=Policy.PRIORITY, cost=StepCost.flat(1.0))
    async with await start_sim(cfg) as sim:
        spec = LoadSpec(
            callers=CALLERS,
            rate_rps=50.0,
            duration_s=0.5,
            seed=1,
            body_priority=True,
            output_lengths=LengthDist(4, 0, 4, 4),
        )
        result = await run_load(spec, {"chat": sim.url, "batch": sim.url}, progress=False)
        assert result.records and all(r.ok for r in result.records)
        without = LoadSpec(callers=CALLERS, rate_rps=50.0, duration_s=0.5, seed=1)
    async with await start_sim(SimConfig(cost=StepCost.flat(1.0))) as fcfs:
        result = await run_load(without, {"chat": fcfs.url, "batch": fcfs.url}, progress=False)
        assert all(r.ok for r in result.records)


@pytest.fixture
async def stub() -> AsyncIterator[tuple[str, list[tuple[web.Request, object]]]]:
    """A server that refuses sheddable (503 with the refusal header), cuts standard
    streams short, and answers critical with two tokens."""
    seen: list[tuple[web.Request, object]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append((request, await request.json()))
        cls = request.headers["x-inference-priority"]
        if cls == "sheddable":
            return web.Response(status=503, headers={"x-inferlane-refused": "concurrency"})
        resp = web.StreamResponse(headers={"x-served-by": "stub"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"text":" a"}]}\n\n')
        if cls == "critical":
            await resp.write(b'data: {"choices":[{"text":" b"}]}\n\ndata: [DONE]\n\n')
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        await runner.cleanup()


async def test_refusals_cuts_and_headers(
    stub: tuple[str, list[tuple[web.Request, object]]],
) -> None:
    url, seen = stub
    callers = (Caller("a", 1.0, {"critical": 1, "standard": 1, "sheddable": 1}),)
    spec = LoadSpec(
        callers=callers,
        rate_rps=100.0,
        duration_s=0.3,
        seed=4,
        host="llama.default.svc.cluster.local",
        extra_headers={"x-caller": "ns/sa"},
    )
    result = await run_load(spec, {"a": url}, progress=False)
    summary = result.summary()
    assert summary["sheddable"].sheds == summary["sheddable"].requests > 0
    assert {r.refused for r in result.records if r.cls == "sheddable"} == {"concurrency"}
    assert summary["standard"].errors == summary["standard"].requests > 0
    assert {r.error for r in result.records if r.cls == "standard"} == {"cut"}
    assert summary["critical"].successes == summary["critical"].requests > 0
    assert {r.tokens for r in result.records if r.cls == "critical"} == {2}
    assert {r.host for r, _ in seen} == {"llama.default.svc.cluster.local"}
    assert {r.headers["x-caller"] for r, _ in seen} == {"ns/sa"}
    for _, body in seen:
        assert isinstance(body, dict) and body["stream"] and "priority" not in body
        assert body["stream_options"] == {"include_usage": True}


async def test_timeouts_and_refused_connections_are_errors() -> None:
    cfg = SimConfig(name="slow", cost=StepCost.flat(3000.0))
    async with await start_sim(cfg) as sim:
        spec = LoadSpec(
            callers=CALLERS[:1],
            rate_rps=20.0,
            duration_s=0.2,
            timeout_s=5,
            ttft_timeout_s=0.3,
            seed=1,
        )
        result = await run_load(spec, {"chat": sim.url}, progress=False)
        assert result.records
        assert {(r.status, r.error) for r in result.records} == {(200, "ttft-timeout")}
        assert all(250.0 <= r.latency_ms < 2500.0 for r in result.records)
        assert all(r.ttft_ms is None for r in result.records)
    # Once the first token has come, the stream may take up to the whole deadline.
    async with await start_sim(SimConfig(name="steady", cost=StepCost.flat(100.0))) as sim:
        spec = LoadSpec(
            callers=CALLERS[:1],
            rate_rps=10.0,
            duration_s=0.15,
            timeout_s=0.8,
            ttft_timeout_s=0.3,
            seed=2,
            output_lengths=LengthDist(20, 0, 20, 20),
        )
        result = await run_load(spec, {"chat": sim.url}, progress=False)
        assert result.records
        for r in result.records:
            assert r.error == "timeout" and r.ttft_ms is not None and r.ttft_ms < 300
            assert 700 < r.latency_ms < 2000 and 0 < r.tokens < 20

    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    spec = LoadSpec(callers=CALLERS[:1], rate_rps=30.0, duration_s=0.2, seed=1)
    result = await run_load(spec, {"chat": f"http://127.0.0.1:{closed}"}, progress=False)
    assert result.records and all(r.status == 0 and r.error for r in result.records)
    with pytest.raises(ValueError, match="no URL for caller"):
        await run_load(spec, {}, progress=False)


async def test_progress_bar_only_when_asked_or_on_a_tty() -> None:
    async with await start_sim(SimConfig(cost=StepCost.flat(1.0))) as sim:
        spec = LoadSpec(callers=CALLERS[:1], rate_rps=40.0, duration_s=0.2, seed=2)
        n = len(build_schedule(spec))
        quiet = io.StringIO()
        await run_load(spec, {"chat": sim.url}, progress_out=quiet)  # StringIO is no tty
        assert quiet.getvalue() == ""
        shown = io.StringIO()
        await run_load(spec, {"chat": sim.url}, progress=True, progress_out=shown)
        text = shown.getvalue()
        assert text.startswith("\r[") and text.endswith("\n")
        assert f"{n}/{n} sent" in text.splitlines()[-1].split("\r")[-1]


async def test_arrivals_past_max_in_flight_are_not_sent() -> None:
    async with await start_sim(SimConfig(name="busy", cost=StepCost.flat(300.0))) as sim:
        spec = LoadSpec(
            callers=CALLERS[:1],
            rate_rps=200.0,
            duration_s=0.1,
            seed=5,
            max_in_flight=1,
            output_lengths=LengthDist(4, 0, 4, 4),
        )
        result = await run_load(spec, {"chat": sim.url}, progress=False)
    errors = Counter((r.status, r.error) for r in result.records)
    assert errors[(200, None)] == 1
    assert errors[(0, "client-overload")] == len(result.records) - 1 > 0
