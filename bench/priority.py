"""Priority under overload on a realistic mesh: ``python -m bench.priority``.

The topology is :mod:`bench.topology`'s: four simulated vLLM GPU pods (one slower) and a
CPU fallback pod behind the ``llama`` Service; four calling sidecars and a gateway, each
with its own class mix, all streaming. At each load (a multiple of the GPU pool's
capacity, computed from the model: :func:`bench.report.pool_capacity`) the very same
seeded arrivals go through each scenario in turn (:data:`bench.testbed.SCENARIOS`):

- ``inferlane``: the control plane's config, through real Envoys;
- ``k8s-service``: round robin over the GPU pods, no classes (a Kubernetes Service);
- ``least-request``: each caller's Envoy, LEAST_REQUEST over the GPU pods, no classes;
- ``critical-only``: the critical arrivals alone, through inferlane: the physical limit.

It reports, per load and scenario, each class's TTFT p50/p99, end-to-end p99, success and
sheds (every failure ranked at the deadline), the GPU pool's goodput and each pod's peak
sheddable occupancy, then judges the goals:

- at 2x and 3x, inferlane's critical TTFT p99 within 1.1x of critical-only's;
- at 2x and 3x, goodput at least 95 % of the pool's capacity;
- no pod's sheddable occupancy above its cap (max-concurrency x the sheddable share).

With ``--tradeoff`` it then sweeps the knobs (max-concurrency, vLLM's priority policy,
the batch size) at 2x and 3x, inferlane against critical-only for each, and prints
goodput against the critical TTFT ratio: the two goals pull against each other, since a
full batch decodes more slowly than a half-empty one.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

from bench.envoy import EnvoyMissing
from bench.gpu_sim import Policy
from bench.load import LoadSpec
from bench.plot import plot_panels
from bench.report import (
    CRITICAL,
    Capacity,
    Point,
    Ratio,
    format_point,
    pool_capacity,
    ratio,
    sheddable_cap,
    workload_capacity,
)
from bench.testbed import (
    CRITICAL_ONLY,
    INFERLANE,
    SCENARIOS,
    RunResult,
    Scenario,
    Testbed,
    TestbedError,
    TestbedOptions,
    running_testbed,
    scenario_named,
)
from bench.topology import Knobs, Topology
from xds_server.rls.runtime import RateLimitSettings

log = logging.getLogger(__name__)

DEFAULT_LOADS: Final = (0.5, 1.0, 2.0, 3.0)
#: The loads the goals are judged at, and the goals.
GOAL_LOADS: Final = (2.0, 3.0)
GOAL_TTFT_RATIO: Final = 1.1
GOAL_GOODPUT: Final = 0.95
SEED: Final = 20240601


def default_tradeoff(base: Knobs) -> tuple[Knobs, ...]:
    """The knob settings ``--tradeoff`` sweeps, each a change from ``base``."""
    # The Service's scheduling-policy annotation: each pod's sidecar writes the class.
    priority: dict[str, object] = {"scheduling_policy": Policy.PRIORITY}
    seqs = base.max_num_seqs
    half, quarter = max(1, seqs // 2), max(1, seqs // 4)
    changes: list[dict[str, object]] = [
        {},
        {"max_concurrency": half},
        {"max_concurrency": quarter},
        priority,
        {**priority, "max_concurrency": half},
        {"max_num_seqs": half, "max_concurrency": half},
    ]
    out: list[Knobs] = []
    for change in changes:
        knobs = dataclasses.replace(base, **change)  # type: ignore[arg-type]
        if knobs not in out:
            out.append(knobs)
    return tuple(out)


@dataclass(frozen=True)
class BenchOptions:
    loads: tuple[float, ...] = DEFAULT_LOADS
    scenarios: tuple[Scenario, ...] = SCENARIOS
    #: Seconds of arrivals per run, the first ``warmup_s`` of them not counted.
    duration_s: float = 60.0
    warmup_s: float = 10.0
    #: Rounds over every load and scenario, each with its own seed; a point pools them.
    repeat: int = 1
    knobs: Knobs = field(default_factory=Knobs)
    #: Knob settings for the trade-off table (empty: no trade-off), at ``tradeoff_loads``.
    tradeoff: tuple[Knobs, ...] = ()
    tradeoff_loads: tuple[float, ...] = GOAL_LOADS
    #: A request's whole deadline, and its first token's.
    deadline_s: float = 60.0
    ttft_deadline_s: float = 10.0
    seed: int = SEED
    topology: Topology = field(default_factory=Topology)
    out_dir: Path = Path(".")
    progress: bool | None = None

    def __post_init__(self) -> None:
        if not self.loads or any(not (math.isfinite(x) and x > 0) for x in self.loads):
            raise ValueError("loads must be positive multiples of capacity")
        if not 0 <= self.warmup_s < self.duration_s:
            raise ValueError("the warm-up must be shorter than the run")
        if self.repeat < 1:
            raise ValueError("repeat must be at least 1")
        if not 0 < self.ttft_deadline_s <= self.deadline_s:
            raise ValueError("the TTFT deadline must be positive and within the deadline")
        object.__setattr__(self, "loads", tuple(sorted(set(self.loads))))

    def spec(self, capacity: Capacity, load: float, round_: int = 0) -> LoadSpec:
        """The arrivals at ``load`` x capacity; every scenario of a round gets the same."""
        return LoadSpec(
            callers=tuple(c.caller for c in self.topology.callers),
            rate_rps=load * capacity.requests_per_s,
            duration_s=self.duration_s,
            prompt_lengths=self.topology.prompt_lengths,
            output_lengths=self.topology.output_lengths,
            timeout_s=self.deadline_s,
            ttft_timeout_s=self.ttft_deadline_s,
            seed=self.seed + round_,
            body_priority=self.knobs.body_priority,
        )


@dataclass(frozen=True)
class TradeoffRow:
    knobs: Knobs
    load: float
    inferlane: Point
    critical_only: Point


@dataclass(frozen=True)
class SweepResult:
    options: BenchOptions
    capacity: Capacity
    #: (scenario name, load) -> point.
    points: Mapping[tuple[str, float], Point]
    tradeoff: tuple[TradeoffRow, ...] = ()
    plot: Path | None = None

    def point(self, scenario: str, load: float) -> Point | None:
        return self.points.get((scenario, load))

    def critical_ratio(self, scenario: str, load: float) -> Ratio | None:
        """Critical TTFT p99 of ``scenario`` over critical-only's, at ``load``."""
        point, floor = self.point(scenario, load), self.point(CRITICAL_ONLY.name, load)
        if point is None or floor is None:
            return None
        mine, limit = point.ttft_p99(CRITICAL), floor.ttft_p99(CRITICAL)
        return ratio(mine, limit, self.options.ttft_deadline_s)


def make_point(
    opts: BenchOptions,
    capacity: Capacity,
    scenario: str,
    load: float,
    runs: Sequence[RunResult],
    *,
    reference: Knobs | None = None,
) -> Point:
    """A point of ``runs``; its goodput judged against the pool with ``reference`` knobs
    (``opts.knobs`` by default) saturated with each run's own requests."""
    gpu = tuple(p.name for p in opts.topology.gpu_pods)
    knobs = reference or opts.knobs
    refs = tuple(workload_capacity(opts.topology, knobs, run.load.spec) for run in runs)
    return Point(scenario, load, tuple(runs), opts.warmup_s, capacity, gpu, refs)


#: Called before each run (e.g. to reset a controller) and after it (to read one).
Hook = Callable[[Testbed, Scenario, float], Awaitable[None]]


async def measure(
    opts: BenchOptions,
    capacity: Capacity,
    scenarios: Sequence[Scenario],
    loads: Sequence[float],
    *,
    ratelimit: RateLimitSettings | None = None,
    before: Hook | None = None,
    after: Hook | None = None,
) -> dict[tuple[str, float], list[RunResult]]:
    """Each load through each scenario, ``opts.repeat`` rounds, on one testbed with
    ``opts.knobs``; every scenario of a round gets the same arrivals. Load factors are of
    ``capacity``, whatever the knobs, so that a setting that gives capacity up shows it."""
    runs: dict[tuple[str, float], list[RunResult]] = {
        (s.name, load): [] for s in scenarios for load in loads
    }
    options = TestbedOptions(topology=opts.topology, knobs=opts.knobs, ratelimit=ratelimit)
    async with running_testbed(options) as bed:
        entries = list(dict.fromkeys(s.entry for s in scenarios))
        await bed.warm_up(opts.spec(capacity, 1.0), entries=entries)
        for round_ in range(opts.repeat):
            for load in loads:
                spec = opts.spec(capacity, load, round_)
                for scenario in scenarios:
                    _say(
                        opts,
                        f"{opts.knobs.label()}: round {round_ + 1}/{opts.repeat}:"
                        f" {scenario.name} at {load:g}x ({spec.rate_rps:.1f} requests/s)",
                    )
                    if before is not None:
                        await before(bed, scenario, load)
                    run = await bed.run(scenario, spec, progress=opts.progress)
                    runs[(scenario.name, load)].append(run)
                    if after is not None:
                        await after(bed, scenario, load)
    return runs


async def run_sweep(opts: BenchOptions) -> SweepResult:
    """Every load through every scenario on one testbed, then each trade-off setting on a
    testbed of its own."""
    capacity = pool_capacity(opts.topology, opts.knobs, opts.seed)
    runs = await measure(opts, capacity, opts.scenarios, opts.loads)
    points = {key: make_point(opts, capacity, *key, rs) for key, rs in runs.items()}
    rows: list[TradeoffRow] = []
    pair = (INFERLANE, CRITICAL_ONLY)
    for knobs in opts.tradeoff:
        sub = dataclasses.replace(opts, knobs=knobs, repeat=1)
        got = await measure(sub, capacity, pair, opts.tradeoff_loads)
        for load in opts.tradeoff_loads:
            mine, floor = (
                make_point(sub, capacity, s.name, load, got[(s.name, load)], reference=opts.knobs)
                for s in pair
            )
            rows.append(TradeoffRow(knobs, load, mine, floor))
    result = SweepResult(opts, capacity, MappingProxyType(points), tuple(rows))
    return dataclasses.replace(result, plot=_plot(result))


def _say(opts: BenchOptions, text: str) -> None:
    if opts.progress is not False:
        print(text, file=sys.stderr)


def _plot(result: SweepResult) -> Path:
    """Critical TTFT p99 and goodput per scenario across the loads."""
    ttft_deadline_ms = result.options.ttft_deadline_s * 1000.0
    ttft: dict[str, dict[float, float | None]] = {}
    goodput: dict[str, dict[float, float | None]] = {}
    for (name, load), point in result.points.items():
        value = point.ttft_p99(CRITICAL)
        if point.summary()[CRITICAL].requests:
            ttft.setdefault(name, {})[load] = ttft_deadline_ms if value is None else value
        goodput.setdefault(name, {})[load] = point.goodput_share * 100
    failure = f"{result.options.ttft_deadline_s:g} s"
    return plot_panels(
        {
            f"critical TTFT p99 (ms; a failure counts as {failure})": ttft,
            "goodput (% of what the GPU pool sustains with these requests)": goodput,
        },
        result.options.out_dir / "priority-sweep.png",
        title=f"Priority under load (1x = {result.capacity.requests_per_s:.1f} requests/s)",
        log_panels=(0,),
    )


# --- the report ----------------------------------------------------------------------


def format_setup(opts: BenchOptions, capacity: Capacity) -> list[str]:
    knobs, topo = opts.knobs, opts.topology
    slow = [p.name for p in topo.gpu_pods if p.slowdown != 1.0]
    callers = "; ".join(
        f"{c.name} {c.caller.share:.0%} ("
        + ", ".join(f"{k} {v:.0%}" for k, v in c.caller.mix.items())
        + f"{', chat' if c.caller.api.value == 'chat' else ''})"
        for c in topo.callers
    )
    pods = ", ".join(
        f"{name.removeprefix('llama-')} {t.tokens_per_s:.0f}"
        for name, t in capacity.per_pod.items()
    )
    return [
        f"GPU pool: {len(topo.gpu_pods)} simulated vLLM pods (Llama-3.1-8B on an A100-40GB, run"
        f" {knobs.slowdown:g}x slower; {', '.join(slow) or 'none'} another 1.5x slower),"
        f" max-num-seqs {knobs.max_num_seqs}, {knobs.scheduling_policy.value} scheduling;"
        f" a CPU fallback pod.",
        f"capacity (1x), computed in virtual time: {capacity.tokens_per_s:.0f} tokens/s ="
        f" {capacity.requests_per_s:.2f} requests/s (per pod tokens/s: {pods}).",
        f"callers: {callers}.",
        f"lengths: prompt median {topo.prompt_lengths.median:g} tokens, output median"
        f" {topo.output_lengths.median:g} (log-normal, clipped at"
        f" {topo.output_lengths.high}); all streaming.",
        f"runs: {opts.duration_s:g} s of arrivals, the first {opts.warmup_s:g} s not counted,"
        f" {opts.repeat} round(s) pooled; deadline {opts.deadline_s:g} s, first token"
        f" {opts.ttft_deadline_s:g} s; every failure ranks at the deadline.",
        f"inferlane: {knobs.label()}.",
    ]


def format_loads(result: SweepResult) -> list[str]:
    opts = result.options
    cap = sheddable_cap(opts.knobs)
    lines = []
    for load in opts.loads:
        rate = load * result.capacity.requests_per_s
        lines += ["", f"== {load:g}x ({rate:.1f} requests/s) =="]
        for scenario in opts.scenarios:
            point = result.point(scenario.name, load)
            if point is None:
                continue
            lines += format_point(point, cap if scenario.entry is INFERLANE.entry else None)
            r = result.critical_ratio(scenario.name, load)
            if r is not None and scenario.name != CRITICAL_ONLY.name:
                lines.append(f"    critical TTFT p99 / critical-only: {r}")
    return lines


def goal_lines(result: SweepResult) -> list[str]:
    opts = result.options
    out = []
    for load in GOAL_LOADS:
        point = result.point(INFERLANE.name, load)
        r = result.critical_ratio(INFERLANE.name, load)
        if point is None:
            out.append(
                f"goals at {load:g}x: not checked (the sweep has no {load:g}x inferlane run)"
            )
            continue
        noisy = " (from a disturbed run: measure again)" if point.disturbed else ""
        if r is None:
            out.append(
                f"goal at {load:g}x, critical TTFT p99 <= {GOAL_TTFT_RATIO:g}x"
                " critical-only: not checked (no critical-only run)"
            )
        else:
            verdict = "met" if r.value is not None and r.value <= GOAL_TTFT_RATIO else "MISSED"
            out.append(
                f"goal at {load:g}x, critical TTFT p99 <= {GOAL_TTFT_RATIO:g}x"
                f" critical-only: {r}, {verdict}{noisy}"
            )
        share = point.goodput_share
        verdict = "met" if share >= GOAL_GOODPUT else "MISSED"
        out.append(
            f"goal at {load:g}x, goodput >= {GOAL_GOODPUT:.0%} of capacity: {share:.0%},"
            f" {verdict}{noisy}"
        )
    cap = sheddable_cap(opts.knobs)
    if cap is None:
        out.append(
            "goal, sheddable occupancy never above its cap: not checked (no"
            " max-concurrency, so no cap)"
        )
    else:
        worst = max(
            (
                n
                for (name, _), p in result.points.items()
                if name == INFERLANE.name
                for n in p.peak("sheddable").values()
            ),
            default=0,
        )
        verdict = "met" if worst <= cap else "MISSED"
        out.append(
            f"goal, sheddable occupancy never above its cap ({cap} a pod): highest"
            f" {worst}, {verdict}"
        )
    return out


def format_tradeoff(result: SweepResult) -> list[str]:
    if not result.tradeoff:
        return []
    deadline = result.options.ttft_deadline_s
    width = max(len(row.knobs.label()) for row in result.tradeoff)
    lines = [
        "",
        "trade-off: inferlane against critical-only, per knob setting (goodput against the"
        " pool's capacity at the benchmark's own max-num-seqs):",
        f"{'setting':<{width}}  load  goodput  crit TTFT p99  crit-only p99  ratio",
    ]
    for row in result.tradeoff:
        mine, floor = row.inferlane.ttft_p99(CRITICAL), row.critical_only.ttft_p99(CRITICAL)
        r = ratio(mine, floor, deadline)
        shown = "" if mine is None else f"{mine:.0f} ms"
        floor_shown = "" if floor is None else f"{floor:.0f} ms"
        mark = " *" if row.inferlane.disturbed or row.critical_only.disturbed else ""
        lines.append(
            f"{row.knobs.label():<{width}}  {row.load:>3g}x  {row.inferlane.goodput_share:>6.0%}"
            f"  {shown or f'>={deadline:g} s':>13}  {floor_shown or f'>={deadline:g} s':>13}"
            f"  {r!s:>5}{mark}"
        )
    if any(line.endswith(" *") for line in lines):
        lines.append("* from a disturbed run: measure again")
    return lines


def format_report(result: SweepResult) -> str:
    lines = format_setup(result.options, result.capacity)
    lines += format_loads(result)
    lines += ["", *goal_lines(result)]
    lines += format_tradeoff(result)
    if any(p.disturbed for p in result.points.values()):
        lines += [
            "",
            "[disturbed]: this machine's cores were contended during every round of"
            " that point (event-loop lag, or pods' steps starting late)",
        ]
    lines += ["", f"plot: {result.plot}"]
    return "\n".join(lines)


# --- the command line ----------------------------------------------------------------


def parse_loads(text: str) -> tuple[float, ...] | str:
    """``0.5,1,2,3`` as load factors; never raises: bad input gives an error message."""
    loads: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            return f"{part!r} is not a number"
        if not math.isfinite(value) or value <= 0:
            return f"load factors must be positive and finite, got {part!r}"
        loads.append(value)
    if not loads:
        return "give at least one load factor, e.g. 0.5,1,2,3"
    return tuple(sorted(set(loads)))


def loads_arg(text: str) -> tuple[float, ...]:
    parsed = parse_loads(text)
    if isinstance(parsed, str):
        raise argparse.ArgumentTypeError(parsed)
    return parsed


def add_knob_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that set :class:`~bench.topology.Knobs` (shared with the demo)."""
    base = Knobs()
    parser.add_argument(
        "--max-concurrency",
        type=int,
        help="inferlane.io/max-concurrency (default: --max-num-seqs, as SPEC suggests)",
    )
    parser.add_argument(
        "--no-max-concurrency", action="store_true", help="leave max-concurrency unset"
    )
    parser.add_argument("--adaptive", action="store_true", help='inferlane.io/adaptive: "true"')
    parser.add_argument("--rate-limit", help="inferlane.io/rate-limit, e.g. sheddable=5")
    parser.add_argument(
        "--scheduling-policy", choices=[p.value for p in Policy], default=base.scheduling_policy
    )
    parser.add_argument(
        "--body-priority",
        action="store_true",
        help="callers write the class as vLLM's priority (needs --scheduling-policy priority)",
    )
    parser.add_argument("--max-num-seqs", type=int, default=base.max_num_seqs)
    parser.add_argument(
        "--slowdown", type=float, default=base.slowdown, help="the GPU model run N times slower"
    )
    parser.add_argument(
        "--orca-on-streams",
        action="store_true",
        help="pods send ORCA load reports on streamed responses too (vLLM does not)",
    )


def knobs_from(args: argparse.Namespace) -> Knobs:
    concurrency = args.max_concurrency if args.max_concurrency else args.max_num_seqs
    return Knobs(
        max_concurrency=None if args.no_max_concurrency else concurrency,
        adaptive=args.adaptive,
        rate_limit=args.rate_limit,
        scheduling_policy=Policy(args.scheduling_policy),
        body_priority=args.body_priority,
        max_num_seqs=args.max_num_seqs,
        slowdown=args.slowdown,
        orca_on_streams=args.orca_on_streams,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.priority",
        description="Critical TTFT and GPU goodput under rising load: inferlane against a"
        " Kubernetes Service, LEAST_REQUEST and the critical-only limit.",
    )
    parser.add_argument("--loads", type=loads_arg, default=DEFAULT_LOADS, help="e.g. 0.5,1,2,3")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals a run")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds not counted a run")
    parser.add_argument("--repeat", type=int, default=1, help="rounds, pooled")
    parser.add_argument(
        "--scenarios",
        default=",".join(s.name for s in SCENARIOS),
        help=f"comma-separated, from {', '.join(s.name for s in SCENARIOS)}",
    )
    add_knob_flags(parser)
    parser.add_argument("--tradeoff", action="store_true", help="also sweep the knobs")
    parser.add_argument("--tradeoff-loads", type=loads_arg, default=GOAL_LOADS)
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds a request")
    parser.add_argument("--ttft-deadline", type=float, default=10.0, help="seconds, first token")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the PNG")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
        scenarios = tuple(scenario_named(n) for n in dict.fromkeys(names))
        if not scenarios:
            raise ValueError("--scenarios: name at least one")
        knobs = knobs_from(args)
        opts = BenchOptions(
            loads=args.loads,
            scenarios=scenarios,
            duration_s=args.duration,
            warmup_s=args.warmup,
            repeat=args.repeat,
            knobs=knobs,
            tradeoff=default_tradeoff(knobs) if args.tradeoff else (),
            tradeoff_loads=args.tradeoff_loads,
            deadline_s=args.deadline,
            ttft_deadline_s=args.ttft_deadline,
            seed=args.seed,
            out_dir=args.out,
            progress=False if args.no_progress else None,
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        result = asyncio.run(run_sweep(opts))
    except (TestbedError, EnvoyMissing) as exc:
        print(f"bench.priority: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
