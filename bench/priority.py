"""The priority effect: critical p99 under rising load, inferlane vs a plain Service.

``python -m bench.priority`` offers 0.5x, 1x, 1.5x and 2x the simulated GPU pool's
capacity, each load through inferlane (the chat-frontend sidecar) and through the
round-robin baseline of :mod:`bench.demo`, on its testbed and with its request mix. A
third scenario, round-robin over the GPU pods alone, is a control: it separates the
effect of class-blind queueing from that of the slow CPU pod. It prints critical p99 per
load and scenario, each also as a ratio to that scenario's own lowest-load value, checks
the goal below, and writes a PNG.

Goal: at 1.5x, inferlane's critical p99 is at most 1.2x its 0.5x value, while the
baseline's degrades at least 5x.

The p99 is over *every* critical request, and a request that failed (deadline, reset,
503) counts as one that took the whole client deadline: a p99 over the survivors alone
would reward failing the slow requests. When more than 1 % failed, the p99 is therefore
at least the deadline, shown as ``>=DEADLINE``, and a ratio built on it is a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

from bench.demo import (
    BASELINE,
    BASELINE_GPU,
    INFERLANE,
    NOISY_LAG_MS,
    NOISY_STALL_MS,
    DemoError,
    DemoOptions,
    ScenarioResult,
    TestbedOptions,
    gpu_capacity_rps,
    load_spec,
    testbed,
)
from bench.envoy import EnvoyMissing
from bench.load import parse_mix, percentile
from bench.plot import plot_sweep

log = logging.getLogger(__name__)

DEFAULT_LOADS: Final = (0.5, 1.0, 1.5, 2.0)
CRITICAL: Final = "critical"
#: The goal: inferlane's critical p99 at GOAL_LOAD within GOAL_INFERLANE x its value at
#: the lowest load; the baseline's at least GOAL_BASELINE x its own.
GOAL_LOAD: Final = 1.5
GOAL_INFERLANE: Final = 1.2
GOAL_BASELINE: Final = 5.0
ALL_SCENARIOS: Final = (INFERLANE, BASELINE, BASELINE_GPU)


@dataclass(frozen=True)
class SweepOptions:
    loads: tuple[float, ...] = DEFAULT_LOADS
    #: inferlane and the round-robin Service, plus the GPU-only round-robin control.
    scenarios: tuple[str, ...] = ALL_SCENARIOS
    #: Seconds of arrivals per load and scenario.
    duration_s: float = 15.0
    #: Rounds over every load and scenario. A point's p99 is the median over its
    #: undisturbed rounds (all rounds if every one was disturbed), so a run that lost
    #: the CPU (this host is shared) does not decide it.
    repeat: int = 1
    out_dir: Path = Path(".")
    progress: bool | None = None
    #: Mix, tokens, client deadline, seed and testbed, shared with the demo.
    demo: DemoOptions = field(default_factory=DemoOptions)

    def __post_init__(self) -> None:
        if not self.loads or any(not x > 0 for x in self.loads):
            raise ValueError("loads must be positive multiples of capacity")
        if not self.duration_s > 0:
            raise ValueError("duration must be positive")
        if self.repeat < 1:
            raise ValueError("repeat must be at least 1")
        object.__setattr__(self, "loads", tuple(sorted(set(self.loads))))


@dataclass(frozen=True)
class CriticalPoint:
    """Critical requests of one run."""

    requests: int
    successes: int
    #: p99 over every request, failures ranked last; None when over 1 % failed.
    p99_ms: float | None
    #: p99 over the successful requests alone (None if none succeeded).
    p99_ok_ms: float | None

    @property
    def success_rate(self) -> float:
        return self.successes / self.requests if self.requests else 0.0


def critical_point(run: ScenarioResult) -> CriticalPoint:
    records = [r for r in run.load.records if r.cls == CRITICAL]
    ok = [r.latency_ms for r in records if r.ok]
    ranked = sorted(ok) + [math.inf] * (len(records) - len(ok))
    p99 = percentile(ranked, 99)
    return CriticalPoint(
        requests=len(records),
        successes=len(ok),
        p99_ms=None if p99 is None or math.isinf(p99) else p99,
        p99_ok_ms=percentile(ok, 99),
    )


def median_point(points: Sequence[CriticalPoint]) -> CriticalPoint:
    """Rounds of one point: counts summed, each p99 the median of the rounds' (the
    upper median for an even count; an unbounded p99 ranks above any number)."""

    def upper_median(values: Sequence[float | None]) -> float | None:
        ranked = sorted(math.inf if v is None else v for v in values)
        if not ranked:
            return None
        middle = ranked[len(ranked) // 2]
        return None if math.isinf(middle) else middle

    return CriticalPoint(
        requests=sum(p.requests for p in points),
        successes=sum(p.successes for p in points),
        p99_ms=upper_median([p.p99_ms for p in points]),
        p99_ok_ms=upper_median([p.p99_ok_ms for p in points if p.p99_ok_ms is not None]),
    )


@dataclass(frozen=True)
class Ratio:
    value: float
    #: True when the p99 above the line was unbounded: the true ratio is larger still.
    at_least: bool = False

    def __str__(self) -> str:
        return f"{'>=' if self.at_least else ''}{self.value:.2f}x"


@dataclass(frozen=True)
class SweepResult:
    options: SweepOptions
    capacity_rps: float
    #: scenario -> load factor -> its runs, one per round.
    runs: Mapping[str, Mapping[float, tuple[ScenarioResult, ...]]]
    plot: Path | None = None

    def counted(self, scenario: str, load: float) -> tuple[ScenarioResult, ...]:
        """The runs a point is made of: its undisturbed runs, or all if none is."""
        runs = self.runs[scenario][load]
        return tuple(run for run in runs if not run.noisy) or runs

    def critical(self, scenario: str, load: float) -> CriticalPoint:
        return median_point([critical_point(run) for run in self.counted(scenario, load)])

    def disturbed(self, scenario: str, load: float) -> bool:
        """Whether every run of the point was disturbed (see ScenarioResult.noisy)."""
        return all(run.noisy for run in self.runs[scenario][load])

    def ratio(self, scenario: str, load: float) -> Ratio | None:
        """Critical p99 at ``load`` over the same scenario's at the lowest load.

        None when the lowest-load p99 is itself unbounded (nothing to compare with); a
        lower bound when only the one at ``load`` is.
        """
        base = self.critical(scenario, min(self.runs[scenario])).p99_ms
        if base is None or base <= 0:
            return None
        value = self.critical(scenario, load).p99_ms
        if value is None:
            return Ratio(self.options.demo.timeout_s * 1000.0 / base, at_least=True)
        return Ratio(value / base)

    def plotted(self) -> dict[str, dict[float, float | None]]:
        """Critical p99 per scenario and load, an unbounded one drawn at the deadline."""
        deadline_ms = self.options.demo.timeout_s * 1000.0
        out: dict[str, dict[float, float | None]] = {}
        for name, runs in self.runs.items():
            points = {load: self.critical(name, load).p99_ms for load in runs}
            out[name] = {load: deadline_ms if v is None else v for load, v in points.items()}
        return out


async def run_sweep(opts: SweepOptions) -> SweepResult:
    """Every load through every scenario on one testbed (the pods restart per run), in
    ``repeat`` rounds; each round has its own seed, shared by its scenarios."""
    capacity = gpu_capacity_rps(opts.demo.max_tokens)
    runs: dict[str, dict[float, list[ScenarioResult]]] = {
        name: {load: [] for load in opts.loads} for name in opts.scenarios
    }
    async with testbed(opts.demo.testbed) as bed:
        await bed.warm_up(opts.scenarios, load_spec(opts.demo, capacity, 1.0))
        for round_ in range(opts.repeat):
            seeded = dataclasses.replace(opts.demo, seed=opts.demo.seed + round_)
            for load in opts.loads:
                spec = load_spec(seeded, load * capacity, opts.duration_s)
                for scenario in opts.scenarios:
                    if opts.progress is not False:
                        print(
                            f"round {round_ + 1}/{opts.repeat}: {scenario} at {load:g}x"
                            f" ({spec.rate_rps:.0f} requests/s)",
                            file=sys.stderr,
                        )
                    run = await bed.run(scenario, spec, progress=opts.progress)
                    runs[scenario][load].append(run)
    frozen = {
        name: MappingProxyType({load: tuple(rs) for load, rs in points.items()})
        for name, points in runs.items()
    }
    result = SweepResult(opts, capacity, MappingProxyType(frozen))
    plot = plot_sweep(
        result.plotted(),
        opts.out_dir / "priority-sweep.png",
        title=f"Critical p99 under load (1x = {capacity:.0f} requests/s)",
        ylabel=f"critical p99 (ms; failures count as {opts.demo.timeout_s:g} s)",
    )
    return SweepResult(opts, capacity, result.runs, plot)


def format_sweep_table(result: SweepResult) -> str:
    """Per load: each scenario's critical p99, its ratio to the lowest load, success %."""
    deadline = f">={result.options.demo.timeout_s:g} s"
    cell = 25
    names = f"{'':>11}" + "".join(f" | {name:<{cell}}" for name in result.runs)
    head = f"{'load':>5} {'rps':>5}" + f" | {'p99':>10} {'ratio':>7} {'ok':>5}" * len(result.runs)
    lines = [names, head, "-" * len(head)]
    for load in result.options.loads:
        row = f"{load:>4g}x {load * result.capacity_rps:>5.0f}"
        for name in result.runs:
            crit = result.critical(name, load)
            p99 = deadline if crit.p99_ms is None else f"{crit.p99_ms:.0f} ms"
            ratio = result.ratio(name, load)
            shown = "-" if ratio is None else str(ratio)
            mark = "*" if result.disturbed(name, load) else " "
            row += f" | {p99:>10} {shown:>7} {crit.success_rate * 100:>4.0f}%{mark}"
        lines.append(row)
    if any(result.disturbed(name, load) for name in result.runs for load in result.runs[name]):
        lines.append(
            f"* disturbed in every run: the event loop of the pods and the load generator ran"
            f" over {NOISY_LAG_MS:g} ms late at the 99th percentile or stalled over"
            f" {NOISY_STALL_MS:g} ms (CPU contention, or its own backlog under overload)"
        )
    return "\n".join(lines)


def goal_lines(result: SweepResult) -> list[str]:
    """Whether the goal held, in words, with the numbers it was judged on."""
    loads = result.options.loads
    if GOAL_LOAD not in loads:
        return [f"goal not checked: the sweep has no {GOAL_LOAD:g}x point"]
    low = min(loads)
    out = []
    goals = ((INFERLANE, GOAL_INFERLANE), (BASELINE, GOAL_BASELINE), (BASELINE_GPU, GOAL_BASELINE))
    for name, bound in goals:
        if name not in result.runs:
            continue
        upper = name == INFERLANE
        claim = (
            f"goal {name}{' (control)' if name == BASELINE_GPU else ''}: critical p99 at"
            f" {GOAL_LOAD:g}x {'<=' if upper else '>='} {bound:g}x its {low:g}x value: "
        )
        ratio = result.ratio(name, GOAL_LOAD)
        if ratio is not None:
            noisy = result.disturbed(name, low) or result.disturbed(name, GOAL_LOAD)
            caveat = " (from a disturbed run: measure again)" if noisy else ""
            out.append(claim + f"{ratio}, {_verdict(ratio, bound, upper)}{caveat}")
            continue
        base, high = result.critical(name, low), result.critical(name, GOAL_LOAD)
        out.append(
            claim + f"not a number: {100 - base.success_rate * 100:.0f} % of critical requests"
            f" failed at {low:g}x and {100 - high.success_rate * 100:.0f} % at {GOAL_LOAD:g}x"
        )
    return out


def _verdict(ratio: Ratio, bound: float, upper: bool) -> str:
    """``upper``: the ratio must stay at or under ``bound``; else reach at least it."""
    if upper:
        return "MISSED" if ratio.value > bound else "met"
    if ratio.value >= bound:
        return "met"
    return "not shown (a lower bound under the goal)" if ratio.at_least else "MISSED"


def format_details(result: SweepResult) -> str:
    """Every class of every run, for the record (percentiles over successes here), and
    each run's conditions: the pods' deepest queue, host load average, loop lag."""
    lines = []
    for load in result.options.loads:
        for name, runs in result.runs.items():
            for round_, run in enumerate(runs[load], start=1):
                tag = f"{load:>4g}x {name:<16}" + (f"#{round_} " if len(runs[load]) > 1 else "")
                for s in run.summary().values():
                    pods = ", ".join(f"{p}={n}" for p, n in s.served_by.items()) or "-"
                    lines.append(
                        f"{tag}{s.cls:<10} reqs {s.requests:>5} ok {s.successes:>5}"
                        f" shed {s.sheds:>5} err {s.errors:>4}"
                        f" p50 {_ms(s.p50_ms)} p99 {_ms(s.p99_ms)}  {pods}"
                    )
                queues = ", ".join(f"{p}={st.peak_waiting}" for p, st in run.pods.items())
                lines.append(
                    f"{'':>{len(tag)}}deepest queue {queues}; load avg {run.host_load:.1f};"
                    f" loop lag p99 {run.loop_lag_p99_ms:.1f} ms, max {run.loop_lag_max_ms:.0f} ms"
                    + (" (disturbed)" if run.noisy else "")
                )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return f"{'-':>7}" if value is None else f"{value:>7.0f}"


def format_report(result: SweepResult) -> str:
    demo = result.options.demo
    mix = ", ".join(f"{cls} {w:g}" for cls, w in demo.mix.items())
    return "\n".join(
        [
            f"1x = {result.capacity_rps:.0f} requests/s (2 simulated GPU pods, {demo.max_tokens}"
            f" tokens per request); {result.options.duration_s:g} s per run,"
            f" {result.options.repeat} run(s) per point (median p99 of the undisturbed);"
            f" mix {mix};"
            f" client deadline {demo.timeout_s:g} s;"
            f" max-concurrency {demo.testbed.max_concurrency}.",
            "",
            "critical p99 over every critical request (a failure counts as the deadline), its"
            " ratio to the same scenario's lowest load, and the share that succeeded:",
            format_sweep_table(result),
            "",
            *goal_lines(result),
            "",
            "per class, percentiles over successful requests:",
            format_details(result),
            "",
            f"plot: {result.plot}",
        ]
    )


def parse_loads(text: str) -> tuple[float, ...] | str:
    """``0.5,1,1.5,2`` as load factors; never raises: bad input gives an error message."""
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
        return "give at least one load factor, e.g. 0.5,1,1.5,2"
    return tuple(sorted(set(loads)))


def _loads_arg(text: str) -> tuple[float, ...]:
    parsed = parse_loads(text)
    if isinstance(parsed, str):
        raise argparse.ArgumentTypeError(parsed)
    return parsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.priority",
        description="Critical p99 under rising load, inferlane vs a round-robin Service.",
    )
    parser.add_argument("--loads", type=_loads_arg, default=DEFAULT_LOADS, help="e.g. 0.5,1,2")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per point (median p99)")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the PNG")
    parser.add_argument("--mix", default="critical=30,sheddable=70", help="class weights")
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=TestbedOptions.max_concurrency,
        help="inferlane.io/max-concurrency for llama (default: the GPU pod's 8 slots)",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(ALL_SCENARIOS),
        help=f"comma-separated, from {', '.join(ALL_SCENARIOS)}",
    )
    parser.add_argument("--seed", type=int, default=DemoOptions.seed)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    scenarios = tuple(dict.fromkeys(n.strip() for n in args.scenarios.split(",") if n.strip()))
    unknown = [n for n in scenarios if n not in ALL_SCENARIOS]
    if unknown or not scenarios:
        parser.error(f"--scenarios: choose from {', '.join(ALL_SCENARIOS)}")
    mix = parse_mix(args.mix)
    if isinstance(mix, str):
        parser.error(f"--mix: {mix}")
    if args.max_concurrency < 1:
        parser.error("--max-concurrency must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts = SweepOptions(
            loads=args.loads,
            scenarios=scenarios,
            duration_s=args.duration,
            repeat=args.repeat,
            out_dir=args.out,
            progress=False if args.no_progress else None,
            demo=DemoOptions(
                mix=mix,
                seed=args.seed,
                testbed=TestbedOptions(max_concurrency=args.max_concurrency),
            ),
        )
        result = asyncio.run(run_sweep(opts))
    except (ValueError, DemoError, EnvoyMissing) as exc:
        print(f"bench.priority: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
