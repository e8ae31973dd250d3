"""The demo (``make demo``, ``python -m bench.demo``): one overload through inferlane and
through a Kubernetes Service over the same GPU pods, and what each class got.

It runs the benchmark mesh of :mod:`bench.topology` on this machine (simulated vLLM pods
in a child process, the control plane in this one, a real Envoy for every caller, the
gateway and every pod, and a static Envoy for the baseline) and sends the same seeded
streaming arrivals, at twice the GPU pool's capacity by default, through:

- ``inferlane``: the control plane's config;
- ``k8s-service``: the fair baseline, a Kubernetes Service over the GPU pods only (round
  robin per request, no classes). It is what a team would run instead.

It prints, per scenario, each class's requests, success rate, sheds, TTFT p50/p99 and
end-to-end p99 (every failure counted at the deadline), the GPU pool's goodput and each
pod's peak sheddable occupancy; and it draws ``demo.png``: per class a CDF of the time to
first token over all requests, failures drawn at the deadline, the success rate per
class, and the goodput. ``python -m bench.priority`` is the full benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from bench.envoy import EnvoyMissing
from bench.plot import Outcome, plot_outcomes
from bench.priority import SEED, BenchOptions, add_knob_flags, knobs_from, make_point
from bench.report import Capacity, Point, format_point, pool_capacity, sheddable_cap
from bench.testbed import (
    INFERLANE,
    SERVICE_RR,
    Scenario,
    TestbedError,
    TestbedOptions,
    running_testbed,
)
from bench.topology import Knobs, Topology

#: What the demo compares.
SCENARIOS = (INFERLANE, SERVICE_RR)


@dataclass(frozen=True)
class DemoOptions:
    #: Offered load, a multiple of the GPU pool's capacity.
    load: float = 2.0
    #: Seconds of arrivals per scenario, the first ``warmup_s`` not counted.
    duration_s: float = 30.0
    warmup_s: float = 5.0
    deadline_s: float = 60.0
    ttft_deadline_s: float = 10.0
    knobs: Knobs = field(default_factory=Knobs)
    topology: Topology = field(default_factory=Topology)
    scenarios: tuple[Scenario, ...] = SCENARIOS
    seed: int = SEED
    out_dir: Path = Path(".")
    progress: bool | None = None

    def bench(self) -> BenchOptions:
        """The same run in the benchmark's terms (its load spec and its points)."""
        return BenchOptions(
            loads=(self.load,),
            scenarios=self.scenarios,
            duration_s=self.duration_s,
            warmup_s=self.warmup_s,
            knobs=self.knobs,
            deadline_s=self.deadline_s,
            ttft_deadline_s=self.ttft_deadline_s,
            seed=self.seed,
            topology=self.topology,
            out_dir=self.out_dir,
            progress=self.progress,
        )


@dataclass(frozen=True)
class DemoResult:
    options: DemoOptions
    capacity: Capacity
    points: Mapping[str, Point]
    plot: Path
    #: Process IDs of every process the demo started (all ended by the time it returns).
    pids: tuple[int, ...]


async def run_demo(opts: DemoOptions) -> DemoResult:
    """Run each scenario with the same arrivals, print nothing, return what happened."""
    bench = opts.bench()
    capacity = pool_capacity(opts.topology, opts.knobs, opts.seed)
    spec = bench.spec(capacity, opts.load)
    points: dict[str, Point] = {}
    async with running_testbed(TestbedOptions(topology=opts.topology, knobs=opts.knobs)) as bed:
        pids = bed.pids
        await bed.warm_up(bench.spec(capacity, 1.0), entries=[s.entry for s in opts.scenarios])
        for scenario in opts.scenarios:
            if opts.progress is not False:
                print(
                    f"{scenario.name}: {spec.rate_rps:.1f} requests/s for {opts.duration_s:g} s",
                    file=sys.stderr,
                )
            run = await bed.run(scenario, spec, progress=opts.progress)
            points[scenario.name] = make_point(bench, capacity, scenario.name, opts.load, [run])
    plot = plot_outcomes(
        {name: outcome(p) for name, p in points.items()},
        opts.out_dir / "demo.png",
        deadline_ms=opts.ttft_deadline_s * 1000.0,
        title=f"{opts.load:g}x the GPU pool's capacity ({spec.rate_rps:.1f} requests/s),"
        " all streaming",
    )
    return DemoResult(opts, capacity, MappingProxyType(points), plot, pids)


def outcome(point: Point) -> Outcome:
    """What :func:`~bench.plot.plot_outcomes` draws of a point, classes highest first."""
    classes = point.runs[0].load.spec.classes
    ttft: dict[str, list[float]] = {cls: [] for cls in classes}
    failures: dict[str, int] = dict.fromkeys(classes, 0)
    for r in point.records:
        ttft.setdefault(r.cls, [])
        failures.setdefault(r.cls, 0)
        if r.ok and r.ttft_ms is not None:
            ttft[r.cls].append(r.ttft_ms)
        else:
            failures[r.cls] += 1
    return Outcome(ttft, failures, point.goodput_share * 100)


def format_report(result: DemoResult) -> str:
    opts = result.options
    rate = opts.load * result.capacity.requests_per_s
    lines = [
        f"GPU pool: {len(opts.topology.gpu_pods)} simulated vLLM pods, capacity"
        f" {result.capacity.tokens_per_s:.0f} tokens/s = {result.capacity.requests_per_s:.1f}"
        f" requests/s; offered {rate:.1f} requests/s ({opts.load:g}x) for {opts.duration_s:g} s"
        f" from {len(opts.topology.callers)} callers, the first {opts.warmup_s:g} s not"
        f" counted; deadline {opts.deadline_s:g} s, first token {opts.ttft_deadline_s:g} s.",
        f"inferlane: {opts.knobs.label()}.",
    ]
    cap = sheddable_cap(opts.knobs)
    for name, point in result.points.items():
        lines += ["", f"== {name} ==  ({point.runs[0].conditions()})"]
        lines += format_point(point, cap if name == INFERLANE.name else None)
    lines += ["", f"plot: {result.plot}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.demo",
        description="Overload a simulated GPU pool through inferlane and through a Kubernetes"
        " Service over the same GPU pods, and show what each priority class got.",
    )
    parser.add_argument("--load", type=float, default=2.0, help="a multiple of GPU capacity")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per scenario")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds not counted")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--seed", type=int, default=SEED)
    add_knob_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts = DemoOptions(
            load=args.load,
            duration_s=args.duration,
            warmup_s=args.warmup,
            knobs=knobs_from(args),
            seed=args.seed,
            out_dir=args.out,
            progress=False if args.no_progress else None,
        )
        opts.bench()  # checks the options
    except ValueError as exc:
        parser.error(str(exc))
    try:
        result = asyncio.run(run_demo(opts))
    except (TestbedError, EnvoyMissing) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
