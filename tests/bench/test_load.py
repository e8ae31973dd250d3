"""The open-loop load generator: schedule, summary maths, and runs against the simulator."""

from __future__ import annotations

import io
import itertools
import math
import random
import socket
from collections import Counter

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from bench.gpu_sim import SimConfig, start_sim
from bench.load import (
    LoadSpec,
    RequestRecord,
    build_schedule,
    format_table,
    parse_mix,
    percentile,
    run_load,
    summarize,
)


def record(cls: str, status: int, latency_ms: float, pod: str | None = None) -> RequestRecord:
    return RequestRecord(cls=cls, status=status, latency_ms=latency_ms, served_by=pod, started_s=0)


# --- pure parts ---------------------------------------------------------------------


def test_schedule_is_poisson_seeded_and_bounded() -> None:
    spec = LoadSpec(url="http://x", rate_rps=1000.0, duration_s=10.0, seed=7)
    schedule = build_schedule(spec)
    assert schedule == build_schedule(spec)
    assert abs(len(schedule) - 10_000) < 500  # Poisson: sd = 100
    times = [a.at_s for a in schedule]
    assert times == sorted(times) and times[0] > 0 and times[-1] < 10.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.001, rel=0.05)
    share = Counter(a.cls for a in schedule)["critical"] / len(schedule)
    assert share == pytest.approx(0.3, abs=0.03)
    capped = LoadSpec(url="http://x", rate_rps=1000.0, duration_s=10.0, max_requests=25, seed=1)
    assert len(build_schedule(capped)) == 25


def test_summary_counts_and_nearest_rank_percentiles() -> None:
    records = [record("critical", 200, float(ms), f"pod-{ms % 2}") for ms in range(1, 101)]
    records += [record("critical", 503, 1.0), record("sheddable", 429, 0.5)]
    records += [record("sheddable", 0, 30_000.0), record("sheddable", 403, 2.0)]
    summary = summarize(records, classes=("critical", "standard", "sheddable"))
    assert list(summary) == ["critical", "standard", "sheddable"]
    crit = summary["critical"]
    assert (crit.requests, crit.successes, crit.sheds, crit.errors) == (101, 100, 1, 0)
    assert (crit.p50_ms, crit.p99_ms) == (50.0, 99.0)
    assert dict(crit.served_by) == {"pod-0": 50, "pod-1": 50}
    assert summary["standard"].requests == 0 and summary["standard"].p99_ms is None
    shed = summary["sheddable"]
    assert (shed.requests, shed.successes, shed.sheds, shed.errors) == (3, 0, 1, 2)
    table = format_table(summary)
    assert "critical" in table and "pod-0=50" in table and "99.0" in table


@given(st.lists(st.floats(0, 1e6), min_size=1), st.floats(0.1, 100))
def test_percentile_is_a_sample_with_pct_at_or_below(values: list[float], pct: float) -> None:
    p = percentile(values, pct)
    assert p in values
    at_or_below = sum(1 for v in values if v <= p)
    assert at_or_below >= math.ceil(pct / 100 * len(values))
    assert sum(1 for v in values if v < p) < max(1, math.ceil(pct / 100 * len(values)))


@given(st.text())
def test_parse_mix_never_raises(text: str) -> None:
    result = parse_mix(text)
    assert isinstance(result, str | dict)
    if isinstance(result, dict):
        assert result and sum(result.values()) > 0


@given(st.dictionaries(st.sampled_from(["critical", "standard", "sheddable"]), st.integers(1, 99)))
def test_parse_mix_round_trips(mix: dict[str, int]) -> None:
    text = ",".join(f"{k.upper()}={v}" for k, v in mix.items())
    parsed = parse_mix(text)
    if mix:
        assert parsed == {k: float(v) for k, v in mix.items()}
    else:
        assert isinstance(parsed, str)


@pytest.mark.parametrize("bad", ["critical", "critical=x", "=3", "a=1,a=2", "a=-1", "a=0", "a=inf"])
def test_parse_mix_errors(bad: str) -> None:
    assert isinstance(parse_mix(bad), str)


def test_spec_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        LoadSpec(url="http://x", rate_rps=0, duration_s=1)
    with pytest.raises(ValueError):
        LoadSpec(url="http://x", rate_rps=1, duration_s=1, mix={"critical": -1})


# --- against the simulator ----------------------------------------------------------


async def test_counts_classes_percentiles_and_pods_against_a_sim() -> None:
    cfg = SimConfig(name="gpu-0", slots=100, prefill_ms=50.0, ms_per_token=0.0)
    async with await start_sim(cfg) as sim:
        spec = LoadSpec(
            url=sim.url,
            rate_rps=200.0,
            duration_s=5.0,
            max_requests=40,
            mix={"critical": 1, "sheddable": 1},
            seed=3,
        )
        result = await run_load(spec, progress=False)
        expected = Counter(a.cls for a in build_schedule(spec))
        assert len(result.records) == 40
        summary = result.summary()
        for cls in ("critical", "sheddable"):
            s = summary[cls]
            assert s.requests == s.successes == expected[cls]
            assert dict(s.served_by) == {"gpu-0": expected[cls]}
            assert s.p50_ms is not None and s.p99_ms is not None
            assert 50.0 <= s.p50_ms <= s.p99_ms < 1000.0
        assert dict(sim.stats().by_priority) == dict(expected)
        assert result.elapsed_s < 5.0  # the cap ended the schedule early
        assert sorted(result.latencies_by_class()["critical"]) == sorted(
            r.latency_ms for r in result.records if r.cls == "critical"
        )


async def test_sheds_are_counted_when_the_sim_is_full() -> None:
    cfg = SimConfig(name="gpu-1", slots=1, max_queue=0, prefill_ms=500.0, ms_per_token=0.0)
    async with await start_sim(cfg) as sim:
        spec = LoadSpec(
            url=sim.url, rate_rps=1000.0, duration_s=1.0, max_requests=5, mix={"sheddable": 1}
        )
        summary = (await run_load(spec, progress=False)).summary()
        shed = summary["sheddable"]
        assert (shed.requests, shed.successes, shed.sheds, shed.errors) == (5, 1, 4, 0)
        assert sim.stats().rejected == 4


async def test_timeouts_and_refused_connections_are_errors() -> None:
    cfg = SimConfig(name="slow", slots=1, prefill_ms=3000.0, ms_per_token=0.0)
    async with await start_sim(cfg) as sim:
        spec = LoadSpec(
            url=sim.url, rate_rps=100.0, duration_s=1.0, max_requests=2, timeout_s=0.2, seed=1
        )
        result = await run_load(spec, progress=False)
    assert [(r.status, r.error) for r in result.records] == [(0, "timeout")] * 2
    assert all(150.0 <= r.latency_ms < 2000.0 for r in result.records)

    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    spec = LoadSpec(url=f"http://127.0.0.1:{closed}", rate_rps=100.0, duration_s=1.0,
                    max_requests=3, seed=1)  # fmt: skip
    result = await run_load(spec, progress=False)
    assert sum(s.errors for s in result.summary().values()) == 3
    assert all(r.status == 0 and r.error for r in result.records)


async def test_host_priority_and_extra_headers_are_sent() -> None:
    seen: list[tuple[str, str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(
            (
                request.host,
                request.headers["x-inference-priority"],
                request.headers.get("x-caller", ""),
            )
        )
        return web.json_response({}, headers={"x-served-by": "echo"})

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        spec = LoadSpec(
            url=f"http://127.0.0.1:{port}",
            rate_rps=500.0,
            duration_s=1.0,
            max_requests=6,
            mix={"critical": 1, "standard": 1},
            host="llama.default.svc.cluster.local",
            extra_headers={"x-caller": "ns/sa"},
            seed=5,
        )
        result = await run_load(spec, progress=False)
    finally:
        await runner.cleanup()
    assert {host for host, _, _ in seen} == {"llama.default.svc.cluster.local"}
    assert sorted(p for _, p, _ in seen) == sorted(r.cls for r in result.records)
    assert {caller for *_, caller in seen} == {"ns/sa"}


async def test_progress_bar_only_when_asked_or_on_a_tty() -> None:
    async with await start_sim(SimConfig(prefill_ms=0.0, ms_per_token=0.0)) as sim:
        spec = LoadSpec(url=sim.url, rate_rps=200.0, duration_s=1.0, max_requests=4, seed=2)
        quiet = io.StringIO()
        await run_load(spec, progress_out=quiet)  # StringIO is not a tty
        assert quiet.getvalue() == ""
        shown = io.StringIO()
        await run_load(spec, progress=True, progress_out=shown)
        text = shown.getvalue()
        assert text.startswith("\r[") and text.endswith("\n")
        assert "4/4 sent" in text.splitlines()[-1].split("\r")[-1]


def test_random_source_can_be_injected() -> None:
    spec = LoadSpec(url="http://x", rate_rps=10.0, duration_s=2.0)
    assert build_schedule(spec, random.Random(9)) == build_schedule(spec, random.Random(9))


async def test_arrivals_past_max_in_flight_are_not_sent() -> None:
    cfg = SimConfig(name="busy", slots=4, prefill_ms=300.0, ms_per_token=0.0)
    async with await start_sim(cfg) as sim:
        spec = LoadSpec(
            url=sim.url, rate_rps=1000.0, duration_s=1.0, max_requests=3, max_in_flight=1
        )
        result = await run_load(spec, progress=False)
    assert sorted((r.status, r.error) for r in result.records) == [
        (0, "client-overload"),
        (0, "client-overload"),
        (200, None),
    ]
    assert sim.stats().served == 1
