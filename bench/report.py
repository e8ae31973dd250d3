"""What a benchmark run means: the pool's capacity, goodput, occupancy, per-class tables.

Shared by ``python -m bench.priority`` and the demo. Everything here is plain arithmetic
on what :mod:`bench.testbed` returns; nothing starts a process.

- **Capacity (1x)** is computed, not guessed: each GPU pod's scheduler is run in virtual
  time with a queue that never empties and requests drawn from the load's own length
  distributions (:func:`bench.gpu_sim.saturated_throughput`); the pool's capacity is the
  sum, in tokens and in requests per second.
- **Goodput** is the tokens per second that successful requests received from the GPU
  pods during the counted window (each request's tokens spread from its first token to
  its last): work a user got. **GPU busy** is what the pods generated in the same window,
  wasted work (streams cut at a deadline, recomputed preemptions) included. Both are
  judged against what the pool sustains saturated with the run's own requests
  (:func:`workload_capacity`), so that a short run's sample does not decide the goal.
- **Occupancy** is each pod's own count of the requests of a class it held at once
  (queued or running), read from the pod; the cap it is held against is the Service's
  ``max-concurrency`` times the class's share.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from bench.gpu_sim import Throughput, saturated_throughput
from bench.load import (
    ClassSummary,
    LoadSpec,
    RequestRecord,
    build_schedule,
    delivered_tokens,
    ms,
    summarize,
)
from bench.testbed import RunResult
from bench.topology import Knobs, Topology
from mesh.model import Priority, ServiceConfig
from ratelimit.adaptive import class_limits

SHEDDABLE: Final = "sheddable"
CRITICAL: Final = "critical"


@dataclass(frozen=True)
class Capacity:
    """What the GPU pool sustains with every pod saturated: 1x."""

    tokens_per_s: float
    requests_per_s: float
    per_pod: Mapping[str, Throughput]


def pool_capacity(topology: Topology, knobs: Knobs, seed: int = 0) -> Capacity:
    """Each GPU pod saturated in virtual time with the load's length distributions."""
    per_pod = {}
    for pod, cfg in zip(topology.pods, topology.sim_configs(knobs), strict=True):
        if pod.gpu:
            per_pod[pod.name] = saturated_throughput(cfg, _lengths(topology, seed))
    return Capacity(
        tokens_per_s=sum(t.tokens_per_s for t in per_pod.values()),
        requests_per_s=sum(t.requests_per_s for t in per_pod.values()),
        per_pod=MappingProxyType(per_pod),
    )


#: Workload capacities already computed, by pod configs and schedule.
_WORKLOADS: dict[tuple[Hashable, ...], float] = {}


def workload_capacity(topology: Topology, knobs: Knobs, spec: LoadSpec) -> float:
    """Tokens per second the GPU pods sustain saturated with this load's own requests (its
    whole schedule, every class, in order and repeated), in virtual time.

    Goodput is judged against this rather than against 1x: a short run's sample of long or
    short requests moves what a saturated pool delivers by several percent (prefill costs
    more per token for short outputs), which would otherwise decide a 95 % goal.
    """
    configs = tuple(
        cfg for pod, cfg in zip(topology.pods, topology.sim_configs(knobs), strict=True) if pod.gpu
    )
    schedule = build_schedule(dataclasses.replace(spec, only=None))
    lengths = [(a.prompt_tokens, a.max_tokens) for a in schedule]
    key = (configs, tuple(lengths))
    if key not in _WORKLOADS:
        _WORKLOADS[key] = sum(
            saturated_throughput(cfg, itertools.cycle(lengths), seconds=60, warmup_s=5).tokens_per_s
            for cfg in configs
        )
    return _WORKLOADS[key]


def _lengths(topology: Topology, seed: int) -> Iterator[tuple[int, int]]:
    rng = random.Random(f"capacity/{seed}")
    while True:
        yield topology.prompt_lengths.draw(rng), topology.output_lengths.draw(rng)


def sheddable_cap(knobs: Knobs) -> int | None:
    """The most sheddable requests one pod should hold: its share of max-concurrency, as
    the pod's sidecar admits it (:func:`ratelimit.adaptive.class_limits`)."""
    if knobs.max_concurrency is None:
        return None
    config = ServiceConfig(max_concurrency=knobs.max_concurrency)
    return class_limits(config).concurrency[Priority.SHEDDABLE]


@dataclass(frozen=True)
class Point:
    """One scenario at one load: its rounds pooled."""

    scenario: str
    load: float
    runs: tuple[RunResult, ...]
    #: Seconds of arrivals at the start of each run that are sent but not counted.
    warmup_s: float
    capacity: Capacity
    gpu_pods: tuple[str, ...]
    #: Per run, tokens per second the GPU pods sustain with that run's own requests
    #: (:func:`workload_capacity`); goodput is judged against it. Empty: against 1x.
    references: tuple[float, ...] = ()

    @property
    def reference_tokens_per_s(self) -> float:
        if not self.references:
            return self.capacity.tokens_per_s
        return sum(self.references) / len(self.references)

    @property
    def records(self) -> list[RequestRecord]:
        """The counted requests: those scheduled after the warm-up, every round."""
        return [r for run in self.runs for r in run.load.records if r.scheduled_s >= self.warmup_s]

    def summary(self) -> dict[str, ClassSummary]:
        return summarize(self.records, classes=self.runs[0].load.spec.classes)

    def _window(self, run: RunResult) -> tuple[float, float]:
        return self.warmup_s, run.load.spec.duration_s

    @property
    def goodput_tokens_per_s(self) -> float:
        """Tokens per second successful requests got from the GPU pods in the window."""
        rates = []
        for run in self.runs:
            start, end = self._window(run)
            tokens = delivered_tokens(run.load.records, start, end, pods=self.gpu_pods)
            rates.append(tokens / (end - start))
        return sum(rates) / len(rates)

    @property
    def busy_tokens_per_s(self) -> float:
        """Tokens per second the GPU pods generated in the window, wasted ones included."""
        rates = []
        for run in self.runs:
            start, end = self._window(run)
            t0 = run.load.started_at
            tokens = sum(
                run.pods[p].tokens_between(t0 + start, t0 + end)
                for p in self.gpu_pods
                if p in run.pods
            )
            rates.append(tokens / (end - start))
        return sum(rates) / len(rates)

    @property
    def goodput_share(self) -> float:
        """Goodput over what the pool sustains with these very requests."""
        return self.goodput_tokens_per_s / self.reference_tokens_per_s

    def peak(self, cls: str) -> dict[str, int]:
        """Each pod's largest count of ``cls`` requests held at once, over every round."""
        out: dict[str, int] = {}
        for run in self.runs:
            for name, stats in run.pods.items():
                out[name] = max(out.get(name, 0), stats.peak_in_flight.get(cls, 0))
        return out

    @property
    def disturbed(self) -> bool:
        return all(run.noisy for run in self.runs)

    def ttft_p99(self, cls: str) -> float | None:
        summary = self.summary().get(cls)
        return None if summary is None else summary.ttft_p99_ms


@dataclass(frozen=True)
class Ratio:
    value: float | None
    #: Why there is no number, when there is none.
    why: str = ""

    def __str__(self) -> str:
        return self.why if self.value is None else f"{self.value:.2f}x"


def ratio(num: float | None, den: float | None, deadline_s: float) -> Ratio:
    """``num / den`` in ms where either may be a failure (None: at or beyond the deadline,
    in seconds)."""
    if den is None:
        return Ratio(None, "no ratio: the reference itself failed")
    if num is None:
        return Ratio(None, f">={deadline_s * 1000 / den:.1f}x (failures)")
    return Ratio(num / den)


def class_rows(point: Point) -> list[str]:
    """One line per class: requests, success, sheds, TTFT p50/p99, end-to-end p99 (a
    failure as ``>=`` the first token's deadline, or the whole request's)."""
    spec = point.runs[0].load.spec
    first, whole = spec.ttft_timeout_s, spec.timeout_s
    rows = []
    for s in point.summary().values():
        if not s.requests:
            continue
        rows.append(
            f"{s.cls:<10} {s.requests:>6} {s.success_rate * 100:>6.1f}% {s.sheds:>6}"
            f" {ms(s.ttft_p50_ms, first):>9} {ms(s.ttft_p99_ms, first):>9}"
            f" {ms(s.e2e_p99_ms, whole):>9}"
        )
    return rows


CLASS_HEADER: Final = (
    f"{'class':<10} {'reqs':>6} {'ok':>7} {'sheds':>6} {'TTFT p50':>9} {'TTFT p99':>9}"
    f" {'e2e p99':>9}"
)


def occupancy_line(point: Point, cap: int | None) -> str:
    peaks = point.peak(SHEDDABLE)
    gpu = {p: peaks.get(p, 0) for p in point.gpu_pods}
    text = ", ".join(f"{p.removeprefix('llama-')}={n}" for p, n in gpu.items())
    limit = "no cap (max-concurrency unset)" if cap is None else f"cap {cap}"
    return f"peak sheddable per pod: {text} ({limit})"


def scenario_line(point: Point) -> str:
    reference = point.reference_tokens_per_s
    return (
        f"goodput {point.goodput_tokens_per_s:.0f} tok/s ({point.goodput_share:.0%} of the"
        f" {reference:.0f} the pool sustains with these requests), GPUs busy"
        f" {point.busy_tokens_per_s / reference:.0%}"
    )


def format_point(point: Point, cap: int | None) -> list[str]:
    mark = "  [disturbed]" if point.disturbed else ""
    lines = [f"  {point.scenario}: {scenario_line(point)}{mark}"]
    lines += ["    " + CLASS_HEADER] + ["    " + row for row in class_rows(point)]
    lines.append("    " + occupancy_line(point, cap))
    return lines


def mean_output_tokens(records: Sequence[RequestRecord]) -> float:
    sizes = [r.max_tokens for r in records if r.max_tokens]
    return sum(sizes) / len(sizes) if sizes else 0.0
