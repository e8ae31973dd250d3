"""The benchmark's pure parts: the topology and its manifests, the baseline Envoy's
bootstrap, the pool's capacity, the report's arithmetic and the goals' verdicts."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.demo import outcome
from bench.gpu_sim import Policy, SimStats
from bench.load import Caller, LengthDist, LoadResult, LoadSpec, RequestRecord
from bench.priority import (
    BenchOptions,
    SweepResult,
    TradeoffRow,
    default_tradeoff,
    format_report,
    goal_lines,
    main,
    parse_loads,
)
from bench.report import (
    Capacity,
    Point,
    pool_capacity,
    ratio,
    sheddable_cap,
    workload_capacity,
)
from bench.testbed import (
    CRITICAL_ONLY,
    INFERLANE,
    LEAST_REQUEST,
    SCENARIOS,
    SERVICE_RR,
    Entry,
    RunResult,
    baseline_bootstrap,
    baseline_name,
    scenario_named,
)
from bench.topology import PODS, Knobs, Topology
from mesh.manifests import load_world
from mesh.model import Priority

GPU = ("llama-gpu-0", "llama-gpu-1")


# --- the topology ---------------------------------------------------------------------


def test_manifests_describe_the_mesh_the_control_plane_reads(tmp_path: Path) -> None:
    topo = Topology()
    knobs = Knobs(max_concurrency=16, adaptive=True, rate_limit="sheddable=5")
    world = load_world(topo.write_manifests(tmp_path / "mesh.yaml", knobs))
    assert not world.source_errors
    llama = world.service("default", "llama")
    assert llama is not None and not llama.errors
    assert llama.config.max_concurrency == 16 and llama.config.adaptive
    assert llama.config.rate_limit == {Priority.SHEDDABLE: 5.0}
    assert sorted(llama.config.critical_callers) == sorted(
        ["default/chat-frontend", "default/search-api", "default/ingress-gateway"]
    )
    gpu = {e.pod_name for e in llama.endpoints if e.gpu}
    assert gpu == {p.name for p in PODS if p.gpu} and len(gpu) >= 4
    assert {e.pod_name for e in llama.endpoints} - gpu == {"llama-cpu-0"}
    callers = {w.name: w.service_account for w in world.workloads.values()}
    assert callers["batch-worker-0"] == "batch-worker"
    assert callers["ingress-gateway-0"] == "ingress-gateway"
    # Knobs left at their defaults leave their annotations out.
    bare = topo.service_annotations(Knobs(max_concurrency=None))
    assert not {
        "inferlane.io/max-concurrency",
        "inferlane.io/adaptive",
        "inferlane.io/scheduling-policy",
    } & set(bare)
    # vLLM's priority policy: the sidecars write each request's class as its priority.
    priority = topo.service_annotations(Knobs(scheduling_policy=Policy.PRIORITY))
    assert priority["inferlane.io/scheduling-policy"] == "priority"


def test_callers_differ_and_every_class_is_sent() -> None:
    topo = Topology()
    assert len([c for c in topo.callers if not c.gateway]) >= 4
    assert len([c for c in topo.callers if c.gateway]) == 1
    assert len({tuple(sorted(c.caller.mix.items())) for c in topo.callers}) == len(topo.callers)
    spec = BenchOptions().spec(Capacity(100.0, 10.0, MappingProxyType({})), 1.0)
    shares = {cls: spec.class_share(cls) for cls in spec.classes}
    assert spec.classes == ("critical", "standard", "sheddable")
    assert sum(shares.values()) == pytest.approx(1.0)
    assert 0.15 < shares["critical"] < 0.3


def test_sim_configs_follow_the_knobs() -> None:
    knobs = Knobs(
        scheduling_policy=Policy.PRIORITY, max_num_seqs=16, slowdown=3.0, orca_on_streams=True
    )
    configs = {c.name: c for c in Topology().sim_configs(knobs)}
    assert all(c.orca_on_streams for c in configs.values())
    assert "ORCA on streams" in knobs.label()
    assert configs["llama-gpu-0"].max_num_seqs == 16
    assert configs["llama-gpu-0"].slowdown == 3.0
    assert configs["llama-gpu-3"].slowdown == 4.5  # the slower GPU
    assert configs["llama-cpu-0"].max_num_seqs == 4  # the CPU pod keeps its own
    assert {c.scheduling_policy for c in configs.values()} == {Policy.PRIORITY}
    assert all(c.port == 8000 for c in configs.values())


def test_knobs_refuse_what_vllm_would() -> None:
    with pytest.raises(ValueError, match="priority scheduling"):
        Knobs(body_priority=True)
    with pytest.raises(ValueError):
        Knobs(max_concurrency=0)
    assert (
        "callers write the class"
        in Knobs(scheduling_policy=Policy.PRIORITY, body_priority=True).label()
    )


def test_tradeoff_settings_are_distinct_changes_of_the_base() -> None:
    base = Knobs()
    settings = default_tradeoff(base)
    assert settings[0] == base and len(set(settings)) == len(settings) >= 5
    assert any(k.scheduling_policy is Policy.PRIORITY and not k.body_priority for k in settings)
    assert {k.max_concurrency for k in settings} >= {32, 16, 8}
    assert any(k.max_num_seqs < base.max_num_seqs for k in settings)


# --- the baselines --------------------------------------------------------------------


def test_baseline_has_a_listener_and_cluster_per_caller_and_policy() -> None:
    configs = Topology().sim_configs(Knobs())[:4]
    boot = baseline_bootstrap(["a", "b"], configs)
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    listeners = [lst["name"] for lst in boot["static_resources"]["listeners"]]
    assert sorted(listeners) == sorted(clusters)
    assert clusters[baseline_name(Entry.ROUND_ROBIN, "a")]["lb_policy"] == "ROUND_ROBIN"
    assert clusters[baseline_name(Entry.LEAST_REQUEST, "b")]["lb_policy"] == "LEAST_REQUEST"
    lr = clusters[baseline_name(Entry.LEAST_REQUEST, "a")]
    addresses = [
        e["endpoint"]["address"]["socket_address"]["address"]
        for e in lr["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert addresses == [c.host for c in configs]  # the GPU pods, nothing else
    assert lr["circuit_breakers"]["thresholds"][0]["max_requests"] >= 100_000
    route = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = route["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["route"]["timeout"] == "0s"  # no cut: the client has a deadline


def test_scenarios_are_named_and_the_control_sends_only_critical() -> None:
    assert [s.name for s in SCENARIOS] == [
        "inferlane",
        "k8s-service",
        "least-request",
        "critical-only",
    ]
    assert scenario_named("least-request") is LEAST_REQUEST
    assert CRITICAL_ONLY.entry is INFERLANE.entry
    assert CRITICAL_ONLY.only == frozenset({"critical"})
    with pytest.raises(ValueError, match="choose from"):
        scenario_named("nope")


# --- capacity and the report ----------------------------------------------------------


def test_capacity_is_computed_from_the_model_and_deterministic() -> None:
    topo = Topology()
    knobs = Knobs()
    cap = pool_capacity(topo, knobs, seed=1)
    assert cap == pool_capacity(topo, knobs, seed=1)
    assert set(cap.per_pod) == {p.name for p in topo.gpu_pods}
    assert cap.tokens_per_s == pytest.approx(sum(t.tokens_per_s for t in cap.per_pod.values()))
    # The slower pod does two thirds of a normal one's work.
    ratio_ = cap.per_pod["llama-gpu-3"].tokens_per_s / cap.per_pod["llama-gpu-0"].tokens_per_s
    assert ratio_ == pytest.approx(1 / 1.5, rel=0.05)
    half = pool_capacity(topo, dataclasses.replace(knobs, slowdown=knobs.slowdown * 2), seed=1)
    assert half.tokens_per_s == pytest.approx(cap.tokens_per_s / 2, rel=0.05)
    # A request's worth of tokens: requests/s x mean output length = tokens/s.
    mean_out = topo.output_lengths.mean()
    assert cap.requests_per_s * mean_out == pytest.approx(cap.tokens_per_s, rel=0.1)
    # A run's own requests: what the pool sustains with exactly them, a little off 1x.
    spec = BenchOptions().spec(cap, 2.0)
    own = workload_capacity(topo, knobs, spec)
    assert own == workload_capacity(topo, knobs, dataclasses.replace(spec, only=frozenset()))
    assert own == pytest.approx(cap.tokens_per_s, rel=0.1) and own != cap.tokens_per_s
    point = dataclasses.replace(_point(_run("x", [_rec("critical", 3.0)])), references=(50.0,))
    assert point.reference_tokens_per_s == 50.0
    assert sheddable_cap(Knobs(max_concurrency=32)) == 16
    assert sheddable_cap(Knobs(max_concurrency=None)) is None


def _rec(
    cls: str,
    start: float,
    *,
    ttft: float = 100.0,
    ok: bool = True,
    tokens: int = 10,
    pod: str = "llama-gpu-0",
    latency: float = 1000.0,
) -> RequestRecord:
    return RequestRecord(
        caller="c",
        cls=cls,
        status=200 if ok else 503,
        ttft_ms=ttft if ok else None,
        latency_ms=latency,
        tokens=tokens if ok else 0,
        served_by=pod if ok else None,
        started_s=start,
        scheduled_s=start,
    )


def _run(
    name: str,
    records: list[RequestRecord],
    *,
    peaks: dict[str, dict[str, int]] | None = None,
    generated: int = 0,
    lag_ms: float = 0.0,
) -> RunResult:
    spec = LoadSpec(
        callers=(Caller("c", 1.0, {"critical": 1, "sheddable": 1}),),
        rate_rps=1.0,
        duration_s=10.0,
        timeout_s=30.0,
        ttft_timeout_s=5.0,
    )
    started = time.time() - 100
    buckets = tuple([generated // 100] * 100)  # spread over the 10 s run
    pods = {
        pod: SimStats(
            pod,
            started,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0.0,
            generated,
            0,
            0.0,
            0.0,
            {},
            {},
            (peaks or {}).get(pod, {}),
            {},
            buckets,
        )
        for pod in GPU
    }
    load = LoadResult(spec, tuple(records), 10.0, started_at=started)
    return RunResult(name, Knobs(), load, MappingProxyType(pods), loop_lag_max_ms=lag_ms)


def _point(run: RunResult, load: float = 2.0, tokens_per_s: float = 100.0) -> Point:
    cap = Capacity(tokens_per_s, 10.0, MappingProxyType({}))
    return Point(run.scenario, load, (run,), 2.0, cap, GPU)


def test_points_count_after_the_warmup_and_measure_goodput_and_occupancy() -> None:
    records = [_rec("critical", 1.0)]  # in the warm-up: not counted
    # 2 requests a second from 2 s to 10 s, 10 tokens each over 0.9 s: 20 tokens a second.
    records += [_rec("critical", 2 + i / 2, tokens=10) for i in range(16)]
    records += [_rec("sheddable", 3.0, ok=False)] * 4
    records += [_rec("sheddable", 4.0, pod="llama-cpu-0", tokens=500)]  # not the GPU pool
    run = _run("inferlane", records, peaks={"llama-gpu-1": {"sheddable": 7}}, generated=2000)
    point = _point(run)
    summary = point.summary()
    assert summary["critical"].requests == 16 and summary["sheddable"].requests == 5
    assert summary["sheddable"].sheds == 4 and summary["sheddable"].ttft_p50_ms is None
    # 16 x 10 tokens in the 8 s window, minus the part of the last one past 10 s.
    assert point.goodput_tokens_per_s == pytest.approx((150 + 10 * 0.5 / 0.9) / 8, rel=0.02)
    assert point.goodput_share == pytest.approx(point.goodput_tokens_per_s / 100)
    # The pods generated 2,000 tokens each over the 10 s run: 200 + 200 a second.
    assert point.busy_tokens_per_s == pytest.approx(400, rel=0.05)
    assert point.peak("sheddable") == {"llama-gpu-0": 0, "llama-gpu-1": 7}
    assert not point.disturbed
    assert _point(_run("x", records, lag_ms=500)).disturbed


def test_ratios_say_when_failures_make_them_lower_bounds() -> None:
    assert ratio(220.0, 200.0, 10).value == pytest.approx(1.1)
    bound = ratio(None, 200.0, 10)
    assert bound.value is None and str(bound) == ">=50.0x (failures)"
    assert "reference" in str(ratio(100.0, None, 10))


def _sweep(inferlane_ttft: float, floor_ttft: float, goodput_tokens: int, peak: int) -> SweepResult:
    opts = BenchOptions(loads=(2.0, 3.0), duration_s=10, warmup_s=2, knobs=Knobs())
    points = {}
    for load in (2.0, 3.0):
        mine = [
            _rec("critical", 2 + i / 10, ttft=inferlane_ttft, tokens=goodput_tokens, latency=200)
            for i in range(80)
        ]
        floor = [_rec("critical", 2 + i / 10, ttft=floor_ttft, latency=200) for i in range(80)]
        peaks = {"llama-gpu-0": {"sheddable": peak}}
        points[("inferlane", load)] = _point(_run("inferlane", mine, peaks=peaks), load)
        points[("critical-only", load)] = _point(_run("critical-only", floor), load)
    return SweepResult(opts, Capacity(100.0, 10.0, MappingProxyType({})), MappingProxyType(points))


def test_goals_are_judged_on_the_numbers_the_report_shows() -> None:
    # 80 requests of 10 tokens over 8 s (the last one's after the window): 99 tokens/s.
    good = goal_lines(_sweep(105.0, 100.0, goodput_tokens=10, peak=16))
    assert "goal at 2x, critical TTFT p99 <= 1.1x critical-only: 1.05x, met" in good
    assert "goal at 3x, goodput >= 95% of capacity: 99%, met" in good
    assert "goal, sheddable occupancy never above its cap (16 a pod): highest 16, met" in good
    bad = goal_lines(_sweep(150.0, 100.0, goodput_tokens=5, peak=17))
    assert "goal at 2x, critical TTFT p99 <= 1.1x critical-only: 1.50x, MISSED" in bad
    assert "goal at 2x, goodput >= 95% of capacity: 49%, MISSED" in bad
    assert "highest 17, MISSED" in bad[-1]
    unset = dataclasses.replace(
        _sweep(100.0, 100.0, 10, 3),
        options=BenchOptions(loads=(2.0,), knobs=Knobs(max_concurrency=None)),
    )
    assert "not checked (no max-concurrency" in goal_lines(unset)[-1]


def test_the_report_prints_every_load_scenario_class_and_the_tradeoff() -> None:
    sweep = _sweep(105.0, 100.0, goodput_tokens=10, peak=3)
    row = TradeoffRow(
        Knobs(max_concurrency=8),
        2.0,
        sweep.points[("inferlane", 2.0)],
        sweep.points[("critical-only", 2.0)],
    )
    text = format_report(dataclasses.replace(sweep, tradeoff=(row,)))
    assert "== 2x (20.0 requests/s) ==" in text and "== 3x (30.0 requests/s) ==" in text
    assert "critical TTFT p99 / critical-only: 1.05x" in text
    assert "peak sheddable per pod: gpu-0=3, gpu-1=0 (cap 16)" in text
    row_line = next(line for line in text.splitlines() if line.startswith("max-concurrency 8,"))
    assert row_line.split()[-7:] == ["2x", "99%", "105", "ms", "100", "ms", "1.05x"]
    assert "goodput 99 tok/s (99% of the 100 the pool sustains with these requests)" in text


def test_demo_outcome_keeps_failures_per_class() -> None:
    run = _run("k8s-service", [_rec("critical", 3.0), _rec("sheddable", 3.0, ok=False)])
    drawn = outcome(_point(run))
    assert list(drawn.ttft_ms) == ["critical", "sheddable"]
    assert drawn.ttft_ms["critical"] == [100.0] and drawn.failures == {
        "critical": 0,
        "sheddable": 1,
    }


# --- the command line -----------------------------------------------------------------


@given(st.text(max_size=40))
def test_parse_loads_never_raises(text: str) -> None:
    parsed = parse_loads(text)
    if isinstance(parsed, tuple):
        assert parsed and all(math.isfinite(x) and x > 0 for x in parsed)
        assert list(parsed) == sorted(set(parsed))
    else:
        assert parsed


def test_parse_loads_examples() -> None:
    assert parse_loads("3, 0.5,1,2,1") == (0.5, 1.0, 2.0, 3.0)
    assert parse_loads("0.5,x") == "'x' is not a number"
    assert "positive" in str(parse_loads("0,1"))
    assert "at least one" in str(parse_loads(" , "))


@pytest.mark.parametrize(
    "argv",
    [
        ["--scenarios", "nope"],
        ["--body-priority"],  # without the priority policy
        ["--warmup", "30", "--duration", "20"],
        ["--loads", "0"],
    ],
)
def test_bad_flags_are_refused_before_anything_starts(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_lengths_are_the_topologys() -> None:
    opts = BenchOptions(topology=Topology(output_lengths=LengthDist(8, 0.1, 4, 16)))
    spec = opts.spec(Capacity(1.0, 2.0, MappingProxyType({})), 1.5)
    assert spec.output_lengths.median == 8 and spec.rate_rps == 3.0
    assert spec.timeout_s == opts.deadline_s and spec.ttft_timeout_s == opts.ttft_deadline_s
    assert SERVICE_RR.entry is Entry.ROUND_ROBIN
