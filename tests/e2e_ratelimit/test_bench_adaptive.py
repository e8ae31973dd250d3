"""The pure parts of bench/adaptive.py: its own addresses, the limit it derives, the goal's
verdicts, the options' checks and the RLS table. (The benchmark itself runs for minutes;
its numbers are in docs/performance.md.)"""

from __future__ import annotations

import dataclasses
import time
from types import MappingProxyType

import pytest

from bench.adaptive import (
    ADAPTIVE,
    STATIC,
    AdaptiveBenchOptions,
    DriveResult,
    RlsOverhead,
    SweepResult,
    format_rls,
    goal_lines,
    main,
    relocated,
)
from bench.gpu_sim import Throughput
from bench.load import Caller, LoadResult, LoadSpec, RequestRecord
from bench.report import Capacity, Point
from bench.testbed import CRITICAL_ONLY, RunResult
from bench.topology import Knobs, Topology


def test_the_mesh_moves_to_addresses_of_its_own() -> None:
    main_mesh, moved = Topology(), relocated(Topology())
    old = {p.ip for p in main_mesh.pods} | {c.ip for c in main_mesh.callers}
    new = {p.ip for p in moved.pods} | {c.ip for c in moved.callers}
    assert len(new) == len(old) and not new & old
    assert all(ip.startswith("127.0.11.") for ip in new)
    assert [p.name for p in moved.pods] == [p.name for p in main_mesh.pods]


def test_the_limit_is_half_a_gpu_pod_unless_given() -> None:
    pods = {"a": Throughput(100.0, 10.0, 8.0), "b": Throughput(60.0, 6.0, 8.0)}
    capacity = Capacity(160.0, 16.0, MappingProxyType(pods))
    assert AdaptiveBenchOptions().limit(capacity) == 4.0  # half of 8 requests/s
    assert AdaptiveBenchOptions(sheddable_limit=2.5).limit(capacity) == 2.5
    knobs = AdaptiveBenchOptions().limited(capacity, adaptive=True)
    assert knobs.rate_limit == "sheddable=4" and knobs.adaptive
    assert knobs.max_concurrency == Knobs().max_concurrency


def test_bad_options_are_refused() -> None:
    for changes in ({"loads": (0.0,)}, {"scenarios": ("nope",)}, {"repeat": 0}):
        with pytest.raises(ValueError):
            AdaptiveBenchOptions(**changes)
    with pytest.raises(SystemExit):
        main(["--rls-concurrency", "0"])


def _point(name: str, load: float, ttft_ms: float) -> Point:
    spec = LoadSpec(callers=(Caller("c", 1.0, {"critical": 1}),), rate_rps=1, duration_s=10)
    records = tuple(
        RequestRecord(
            "c",
            "critical",
            200,
            ttft_ms,
            500.0,
            5,
            "llama-gpu-0",
            2 + i / 10,
            scheduled_s=2 + i / 10,
        )
        for i in range(60)
    )
    load_result = LoadResult(spec, records, 10.0, started_at=time.time())
    run = RunResult(name, Knobs(), load_result, MappingProxyType({}))
    return Point(name, load, (run,), 1.0, Capacity(1.0, 1.0, MappingProxyType({})), ())


def test_goal_lines_judge_each_scenario_against_its_own_lowest_load() -> None:
    points = {
        (ADAPTIVE, 0.5): _point(ADAPTIVE, 0.5, 100.0),
        (ADAPTIVE, 1.5): _point(ADAPTIVE, 1.5, 110.0),
        (STATIC, 0.5): _point(STATIC, 0.5, 100.0),
        (STATIC, 1.5): _point(STATIC, 1.5, 300.0),
        (CRITICAL_ONLY.name, 0.5): _point(CRITICAL_ONLY.name, 0.5, 90.0),
        (CRITICAL_ONLY.name, 1.5): _point(CRITICAL_ONLY.name, 1.5, 95.0),
    }
    opts = AdaptiveBenchOptions(loads=(0.5, 1.5))
    sweep = SweepResult(
        opts,
        Capacity(1.0, 1.0, MappingProxyType({})),
        4.0,
        MappingProxyType(points),
        MappingProxyType({}),
    )
    lines = goal_lines(sweep)
    assert f"goal {ADAPTIVE}: critical TTFT p99 at 1.5x <= 1.2x its 0.5x value: 1.10x, met" in lines
    assert (
        f"goal {STATIC}: critical TTFT p99 at 1.5x <= 1.2x its 0.5x value: 3.00x, MISSED" in lines
    )
    assert any(line.startswith("control critical-only") for line in lines)
    assert sweep.ratio_to_floor(ADAPTIVE, 1.5) == f"{110 / 95:.2f}x"
    assert (
        dataclasses.replace(sweep, points=MappingProxyType({})).ratio_to_lowest(ADAPTIVE, 1.5)
        == "not run"
    )


def test_rls_table_shows_the_added_latency() -> None:
    off = DriveResult(requests=100, failures=0, seconds=1.0, latencies_ms=(1.0,) * 100)
    on = dataclasses.replace(off, requests=50, latencies_ms=(3.0,) * 50)
    text = format_rls([RlsOverhead("memory", 1, off, on, 50.0)], 5.0)
    assert "p50 +2.00 ms, p99 +2.00 ms" in text
    assert "memory" in text and "50" in text
