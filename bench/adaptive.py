"""Adaptive limits against static limits, and the global rate-limit service's cost.

``python -m bench.adaptive`` runs the benchmark mesh of :mod:`bench.priority` (four
simulated vLLM GPU pods and a CPU pod with sidecars, four calling sidecars and a gateway,
all streaming; at addresses of its own, 127.0.11.x, so that it never contends with a demo
or a ``bench.priority`` run) with per-endpoint rate limits: the llama Service limits
``sheddable`` to half a GPU pod's capacity, in requests per second, at each endpoint's
sidecar. The same seeded arrivals go through, at each load:

- ``inferlane-adaptive``: that limit with ``inferlane.io/adaptive: "true"``: the control
  plane scrapes each GPU pod's vLLM gauges and tightens that pod's sheddable limit when it
  saturates (:data:`CONTROLLER`), and loosens it when the pod has room again;
- ``inferlane-static``: the same limit, fixed;
- ``k8s-service``: a Kubernetes Service over the GPU pods, no classes;
- ``critical-only``: the critical arrivals alone: the floor no limit on the other classes
  can beat.

Each run starts with the controller reset and every GPU sidecar back at the annotation's
limit; the first ``--warmup`` seconds of arrivals are sent but not counted (the controller
needs a few steps to find its limit; every scenario gets the same warm-up).

Goal (issue 5): critical TTFT p99 at 1.5x and at 2x at most 1.2x its value at the lowest
load. The ratio to critical-only at the same load is shown beside it. Every failure ranks
at the deadline.

Then the global rate-limit service with Envoy as its client: one sidecar in front of an
echo backend, driven closed-loop from a separate process, without the global filter and
with it (a limit no request reaches, so every request asks the service and none is
refused), with counters in memory and in Redis. It reports the service's decisions per
second and the latency the filter adds.

Everything shares this machine's cores: the figures are lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import multiprocessing
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import aiohttp
from aiohttp import web
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from google.protobuf import json_format

from bench.envoy import Envoy, EnvoyMissing, running_envoy
from bench.load import percentile
from bench.priority import SEED, BenchOptions, Hook, loads_arg, make_point, measure
from bench.report import Capacity, Point, format_point, pool_capacity, ratio, sheddable_cap
from bench.testbed import (
    CRITICAL_ONLY,
    INFERLANE,
    SERVICE_RR,
    Scenario,
    Testbed,
    TestbedError,
    running_control_plane,
    sidecar_metadata,
)
from bench.topology import Knobs, Topology, write_documents
from bench.wait import eventually
from mesh.model import PRIORITY_HEADER, Priority
from ratelimit.adaptive import AdaptiveSettings
from xds_server.app import ControlPlane
from xds_server.rls.runtime import RateLimitSettings

log = logging.getLogger(__name__)

ADAPTIVE: Final = "inferlane-adaptive"
STATIC: Final = "inferlane-static"
SCENARIOS: Final = (ADAPTIVE, STATIC, SERVICE_RR.name, CRITICAL_ONLY.name)
DEFAULT_LOADS: Final = (0.5, 1.5, 2.0)
#: Loads the goal is judged at, and the bound on critical TTFT p99 relative to the lowest.
GOAL_LOADS: Final = (1.5, 2.0)
GOAL_RATIO: Final = 1.2
CRITICAL: Final = "critical"

#: The controller as the benchmark runs it: quicker than the defaults (2 s to tighten,
#: 10 s to loosen, a 1 s scrape), so it settles within the warm-up of a short run. The
#: change budget still bounds pushes: at most 20 per endpoint per minute.
CONTROLLER: Final = AdaptiveSettings(
    tighten_hold_s=0.5, loosen_hold_s=3.0, max_changes_per_minute=20.0
)
SCRAPE_INTERVAL_S: Final = 0.25
#: The benchmark mesh's addresses (127.0.10.x) moved to this benchmark's own.
ADDRESS_FROM: Final = "127.0.10."
ADDRESS_TO: Final = "127.0.11."
LOCAL_FILTER: Final = "envoy.filters.http.local_ratelimit"
GLOBAL_RATE_LIMIT: Final = "inferlane.io/global-rate-limit"


def relocated(topology: Topology, old: str = ADDRESS_FROM, new: str = ADDRESS_TO) -> Topology:
    """``topology`` with every pod's and caller's address moved from ``old`` to ``new``."""

    def move(ip: str) -> str:
        return new + ip.removeprefix(old) if ip.startswith(old) else ip

    pods = tuple(dataclasses.replace(p, ip=move(p.ip)) for p in topology.pods)
    callers = tuple(dataclasses.replace(c, ip=move(c.ip)) for c in topology.callers)
    return dataclasses.replace(topology, pods=pods, callers=callers)


@dataclass(frozen=True)
class AdaptiveBenchOptions:
    loads: tuple[float, ...] = DEFAULT_LOADS
    scenarios: tuple[str, ...] = SCENARIOS
    #: Seconds of arrivals per run, the first ``warmup_s`` of them not counted.
    duration_s: float = 25.0
    warmup_s: float = 5.0
    #: Rounds over every load and scenario, pooled.
    repeat: int = 1
    #: Sheddable requests per second each GPU endpoint admits; None: half a GPU pod's
    #: capacity (a guess an operator could make without measuring the load).
    sheddable_limit: float | None = None
    knobs: Knobs = field(default_factory=Knobs)
    seed: int = SEED
    out_dir: Path = Path(".")
    progress: bool | None = None
    #: Seconds per phase of the rate-limit service measurement; 0 skips it.
    rls_seconds: float = 5.0
    #: Requests in flight in the rate-limit service measurement.
    rls_concurrency: tuple[int, ...] = (1, 16)
    rls_backends: tuple[str, ...] = ("memory", "redis")

    def __post_init__(self) -> None:
        if self.rls_seconds < 0:
            raise ValueError("rls seconds must not be negative")
        unknown = [s for s in self.scenarios if s not in SCENARIOS]
        if unknown or not self.scenarios:
            raise ValueError(f"scenarios: choose from {', '.join(SCENARIOS)}")
        if self.sheddable_limit is not None and not self.sheddable_limit > 0:
            raise ValueError("the sheddable limit must be positive")
        self.bench()  # checks loads, durations and rounds
        object.__setattr__(self, "loads", tuple(sorted(set(self.loads))))

    def bench(self, knobs: Knobs | None = None) -> BenchOptions:
        return BenchOptions(
            loads=self.loads,
            duration_s=self.duration_s,
            warmup_s=self.warmup_s,
            repeat=self.repeat,
            knobs=knobs or self.knobs,
            seed=self.seed,
            topology=relocated(Topology()),
            out_dir=self.out_dir,
            progress=self.progress,
        )

    def limit(self, capacity: Capacity) -> float:
        """Sheddable requests per second per GPU endpoint."""
        if self.sheddable_limit is not None:
            return self.sheddable_limit
        per_pod = [t.requests_per_s for t in capacity.per_pod.values()]
        return float(max(1, round(sum(per_pod) / len(per_pod) / 2)))

    def limited(self, capacity: Capacity, adaptive: bool) -> Knobs:
        limit = f"sheddable={self.limit(capacity):g}"
        return dataclasses.replace(self.knobs, rate_limit=limit, adaptive=adaptive)


# --- the sweep -----------------------------------------------------------------------


async def sheddable_ms(envoy: Envoy) -> float | None:
    """Milliseconds per token of the sheddable bucket on the sidecar's inbound routes."""
    dump = await envoy.admin_json("/config_dump?resource=dynamic_route_configs")
    for entry in dump.get("configs", []):
        config = entry.get("route_config", {})
        if config.get("name") != "inbound":
            continue
        for vhost in config.get("virtual_hosts", []):
            packed = vhost.get("typed_per_filter_config", {}).get(LOCAL_FILTER)
            if packed is None:
                continue
            limit = local_rate_limit_pb2.LocalRateLimit()
            json_format.ParseDict({k: v for k, v in packed.items() if k != "@type"}, limit)
            for d in limit.descriptors:
                if d.entries[0].value == "sheddable":
                    bucket = d.token_bucket
                    return float(
                        bucket.fill_interval.ToMilliseconds() / bucket.tokens_per_fill.value
                    )
    return None


@dataclass(frozen=True)
class AdaptiveSnapshot:
    """What the controller had done by the end of an adaptive run."""

    multipliers: Mapping[str, float]
    changes: int
    suppressed: int


@dataclass(frozen=True)
class SweepResult:
    options: AdaptiveBenchOptions
    capacity: Capacity
    limit: float
    #: (scenario, load) -> point.
    points: Mapping[tuple[str, float], Point]
    controller: Mapping[float, AdaptiveSnapshot]

    def ratio_to_lowest(self, scenario: str, load: float) -> str:
        low = min(self.options.loads)
        here, base = self.points.get((scenario, load)), self.points.get((scenario, low))
        if here is None or base is None:
            return "not run"
        deadline = here.runs[0].load.spec.ttft_timeout_s
        return str(ratio(here.ttft_p99(CRITICAL), base.ttft_p99(CRITICAL), deadline))

    def ratio_to_floor(self, scenario: str, load: float) -> str:
        here, floor = self.points.get((scenario, load)), self.points.get((CRITICAL_ONLY.name, load))
        if here is None or floor is None:
            return "not run"
        deadline = here.runs[0].load.spec.ttft_timeout_s
        return str(ratio(here.ttft_p99(CRITICAL), floor.ttft_p99(CRITICAL), deadline))


@dataclass(frozen=True)
class BenchResult:
    sweep: SweepResult
    rls: tuple[RlsOverhead, ...] = ()


async def run_sweep(opts: AdaptiveBenchOptions) -> SweepResult:
    base = opts.bench()
    capacity = pool_capacity(base.topology, base.knobs, base.seed)
    ratelimit = RateLimitSettings(scrape_interval_s=SCRAPE_INTERVAL_S, adaptive=CONTROLLER)
    points: dict[tuple[str, float], Point] = {}
    controller: dict[float, AdaptiveSnapshot] = {}
    for name, adaptive in ((ADAPTIVE, True), (STATIC, False)):
        if name not in opts.scenarios:
            continue
        sub = opts.bench(opts.limited(capacity, adaptive))
        reset = _reset_limits(1000.0 / opts.limit(capacity), base.topology)

        async def snapshot(bed: Testbed, _scenario: Scenario, load: float) -> None:
            controller[load] = _controller_state(bed.plane)

        runs = await measure(
            sub,
            capacity,
            [INFERLANE],
            opts.loads,
            ratelimit=ratelimit,
            before=reset,
            after=snapshot if adaptive else None,
        )
        for load in opts.loads:
            points[(name, load)] = make_point(
                sub, capacity, name, load, runs[(INFERLANE.name, load)]
            )
    others = [s for s in (SERVICE_RR, CRITICAL_ONLY) if s.name in opts.scenarios]
    if others:
        runs = await measure(base, capacity, others, opts.loads)
        points.update({key: make_point(base, capacity, *key, rs) for key, rs in runs.items()})
    limit = opts.limit(capacity)
    return SweepResult(
        opts, capacity, limit, MappingProxyType(points), MappingProxyType(controller)
    )


def _reset_limits(full_ms: float, topology: Topology) -> Hook:
    """Before a run: the controller reset, and every GPU sidecar back at the full limit."""

    async def reset(bed: Testbed, _scenario: Scenario, _load: float) -> None:
        bed.plane.ratelimits.reset_adaptive()
        sidecars = [bed.envoys[p.name] for p in topology.gpu_pods]

        async def at_full_limit() -> bool:
            found = [await sheddable_ms(e) for e in sidecars]
            return all(ms is not None and math.isclose(ms, full_ms) for ms in found)

        await eventually(at_full_limit, timeout=10, interval=0.05, what="limits reset")

    return reset


def _controller_state(plane: ControlPlane) -> AdaptiveSnapshot:
    snapshot = plane.ratelimits.controller.snapshot()
    mults = {
        key.split(":")[0]: state.multipliers.get(Priority.SHEDDABLE, 1.0)
        for key, state in sorted(snapshot.endpoints.items())
    }
    return AdaptiveSnapshot(
        multipliers=MappingProxyType(mults),
        changes=sum(s.changes for s in snapshot.endpoints.values()),
        suppressed=sum(s.suppressed for s in snapshot.endpoints.values()),
    )


# --- the rate-limit service with Envoy as its client ------------------------------

ECHO_IP: Final = "127.0.1.41"
RLS_CLIENT_IP: Final = "127.0.1.42"
ECHO_HOST: Final = "echo.default.svc.cluster.local"


@dataclass(frozen=True)
class DriveResult:
    requests: int
    failures: int
    seconds: float
    latencies_ms: tuple[float, ...]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def p(self, pct: float) -> float:
        return percentile(self.latencies_ms, pct) or math.nan


@dataclass(frozen=True)
class RlsOverhead:
    backend: str
    in_flight: int
    without: DriveResult
    with_filter: DriveResult
    #: ShouldRateLimit calls the service answered per second during the filtered phase.
    decisions_per_s: float

    @property
    def added_p99_ms(self) -> float:
        return self.with_filter.p(99) - self.without.p(99)

    @property
    def added_p50_ms(self) -> float:
        return self.with_filter.p(50) - self.without.p(50)


def _drive_main(url: str, seconds: float, concurrency: int) -> DriveResult:
    """In a child process: closed-loop GETs through Envoy for ``seconds``."""
    return asyncio.run(_drive(url, seconds, concurrency))


async def _drive(url: str, seconds: float, concurrency: int) -> DriveResult:
    latencies: list[float] = []
    failures = 0
    headers = {"Host": ECHO_HOST, PRIORITY_HEADER: "standard"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url, headers=headers) as resp:  # connect before timing
            await resp.read()
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal failures
            while (started := time.perf_counter()) < deadline:
                try:
                    async with session.get(url, headers=headers) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - started) * 1000.0)
                else:
                    failures += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return DriveResult(len(latencies), failures, elapsed, tuple(latencies))


async def drive_in_child(url: str, seconds: float, concurrency: int) -> DriveResult:
    """Run the client in its own process, so it does not share the service's event loop."""
    ctx = multiprocessing.get_context("spawn")

    def run() -> DriveResult:
        with ctx.Pool(1) as pool:
            return pool.apply(_drive_main, (url, seconds, concurrency))

    return await asyncio.to_thread(run)


def _echo_documents(backend_port: int, global_limit: bool) -> list[dict[str, Any]]:
    annotations = {"inferlane.io/enabled": "true"}
    if global_limit:
        annotations[GLOBAL_RATE_LIMIT] = "standard=1000000"  # asked, never reached
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo", "namespace": "default", "annotations": annotations},
        "spec": {
            "selector": {"app": "echo"},
            "ports": [{"name": "http", "port": 8000, "targetPort": "http"}],
        },
    }

    def pod(name: str, ip: str, account: str, port: int | None) -> dict[str, Any]:
        container: dict[str, Any] = {"name": "main", "image": "example.com/app:1"}
        if port is not None:
            container["ports"] = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": name[:-2]}},
            "spec": {"serviceAccountName": account, "containers": [container]},
            "status": {
                "phase": "Running",
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }

    return [
        service,
        pod("echo-0", ECHO_IP, "echo", backend_port),
        pod("rls-client-0", RLS_CLIENT_IP, "bench", None),
    ]


@contextlib.asynccontextmanager
async def _echo_backend() -> AsyncIterator[int]:
    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, ECHO_IP, 0)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _redis_url(backend: str) -> AsyncIterator[str | None]:
    if backend != "redis":
        yield None
        return
    from bench.rls import _Redis

    redis = _Redis()
    try:
        yield redis.url
    finally:
        redis.stop()


def _rls_calls(plane: ControlPlane) -> float:
    total = 0.0
    for family in plane.ratelimits.registry.collect():
        for s in family.samples:
            if s.name == "inferlane_rls_requests_total":
                total += s.value
    return total


async def measure_rls(
    backend: str, seconds: float, concurrency: Sequence[int]
) -> list[RlsOverhead]:
    """Envoy -> echo backend, without and with the global filter, at each number of
    requests in flight; counters in ``backend``."""
    workdir = Path(tempfile.mkdtemp(prefix="inferlane-rls-"))
    manifest = workdir / "echo.yaml"
    try:
        async with _echo_backend() as port, _redis_url(backend) as redis_url:
            write_documents(manifest, _echo_documents(port, global_limit=False))
            ratelimit = RateLimitSettings(rls_port=0, redis_url=redis_url, rls_timeout_s=0.5)
            async with running_control_plane(manifest, 30.0, ratelimit) as plane:
                meta = sidecar_metadata(RLS_CLIENT_IP, "bench")
                outbound = int(meta["INFERLANE_OUTBOUND_PORT"])
                node_id = f"sidecar~{RLS_CLIENT_IP}~rls-client-0.default~default.svc.cluster.local"
                async with running_envoy(node_id, plane.ports["xds"], metadata=meta):
                    url = f"http://{RLS_CLIENT_IP}:{outbound}/"
                    await eventually(
                        lambda: _status_ok(url), timeout=30, what="echo through the sidecar"
                    )
                    without = [await drive_in_child(url, seconds, n) for n in concurrency]
                    write_documents(manifest, _echo_documents(port, global_limit=True))
                    before = _rls_calls(plane)

                    async def asking() -> bool:
                        return await _status_ok(url) and _rls_calls(plane) > before

                    await eventually(asking, timeout=30, what="the sidecar asking the service")
                    with_filter, decided = [], []
                    for n in concurrency:
                        before = _rls_calls(plane)
                        with_filter.append(await drive_in_child(url, seconds, n))
                        decided.append(_rls_calls(plane) - before)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return [
        RlsOverhead(backend, n, off, on, calls / on.seconds)
        for n, off, on, calls in zip(concurrency, without, with_filter, decided, strict=True)
    ]


async def _status_ok(url: str) -> bool:
    headers = {"Host": ECHO_HOST, PRIORITY_HEADER: "standard"}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        await resp.read()
        return resp.status == 200


# --- the whole run and its report -------------------------------------------------


async def run_bench(opts: AdaptiveBenchOptions) -> BenchResult:
    sweep = await run_sweep(opts)
    rls = []
    if opts.rls_seconds > 0:
        for backend in opts.rls_backends:
            if opts.progress is not False:
                print(f"rate-limit service, {backend} counters", file=sys.stderr)
            rls += await measure_rls(backend, opts.rls_seconds, opts.rls_concurrency)
    return BenchResult(sweep, tuple(rls))


def goal_lines(sweep: SweepResult) -> list[str]:
    low = min(sweep.options.loads)
    out = []
    for name in (ADAPTIVE, STATIC, SERVICE_RR.name, CRITICAL_ONLY.name):
        for load in GOAL_LOADS:
            point = sweep.points.get((name, load))
            if point is None or (name, low) not in sweep.points:
                continue
            here, base = point.ttft_p99(CRITICAL), sweep.points[(name, low)].ttft_p99(CRITICAL)
            r = ratio(here, base, point.runs[0].load.spec.ttft_timeout_s)
            what = "control" if name == CRITICAL_ONLY.name else "goal"
            claim = (
                f"{what} {name}: critical TTFT p99 at {load:g}x <= {GOAL_RATIO:g}x its"
                f" {low:g}x value: {r}"
            )
            if name == CRITICAL_ONLY.name:
                verdict = "the floor for any limit on the other classes"
            else:
                verdict = "met" if r.value is not None and r.value <= GOAL_RATIO else "MISSED"
            noisy = " (from a disturbed run: measure again)" if point.disturbed else ""
            out.append(f"{claim}, {verdict}{noisy}")
    return out


def format_rls(results: Sequence[RlsOverhead], seconds: float) -> str:
    lines = [
        f"global rate-limit service with Envoy as the client: {seconds:g} s per phase,"
        " closed loop from a separate process",
        f"{'counters':<9} {'in flight':>9} {'filter':<7} {'requests/s':>10} {'p50 ms':>8}"
        f" {'p99 ms':>8} {'failed':>7} {'decisions/s':>12}",
    ]
    for r in results:
        for label, run, decisions in (
            ("off", r.without, ""),
            ("on", r.with_filter, f"{r.decisions_per_s:.0f}"),
        ):
            lines.append(
                f"{r.backend:<9} {r.in_flight:>9} {label:<7} {run.rate:>10.0f} {run.p(50):>8.2f}"
                f" {run.p(99):>8.2f} {run.failures:>7} {decisions:>12}"
            )
        lines.append(
            f"{'':<9} added by the filter: p50 {r.added_p50_ms:+.2f} ms,"
            f" p99 {r.added_p99_ms:+.2f} ms"
        )
    return "\n".join(lines)


def format_report(result: BenchResult) -> str:
    sweep = result.sweep
    opts = sweep.options
    cap = sheddable_cap(opts.knobs)
    lines = [
        f"GPU pool capacity (1x) {sweep.capacity.tokens_per_s:.0f} tokens/s ="
        f" {sweep.capacity.requests_per_s:.2f} requests/s; rate-limit sheddable="
        f"{sweep.limit:g} a GPU endpoint; {opts.duration_s:g} s of arrivals a run, the first"
        f" {opts.warmup_s:g} s not counted; inferlane: {opts.knobs.label()}.",
        f"controller: scrape every {SCRAPE_INTERVAL_S:g} s, tighten after"
        f" {CONTROLLER.tighten_hold_s:g} s, loosen after {CONTROLLER.loosen_hold_s:g} s, at most"
        f" {CONTROLLER.max_changes_per_minute:g} changes per endpoint per minute.",
    ]
    for load in opts.loads:
        lines += ["", f"== {load:g}x ({load * sweep.capacity.requests_per_s:.1f} requests/s) =="]
        for name in opts.scenarios:
            point = sweep.points.get((name, load))
            if point is None:
                continue
            lines += format_point(point, cap if name in (ADAPTIVE, STATIC) else None)
            if name != CRITICAL_ONLY.name:
                lines.append(
                    f"    critical TTFT p99: {sweep.ratio_to_lowest(name, load)} its"
                    f" {min(opts.loads):g}x value, {sweep.ratio_to_floor(name, load)}"
                    " critical-only's"
                )
    lines += ["", *goal_lines(sweep), ""]
    lines.append(
        "adaptive controller at the end of each adaptive run (sheddable multiplier per"
        " endpoint; changes and budget-suppressed changes over the run):"
    )
    for load, snap in sweep.controller.items():
        mults = ", ".join(f"{k}={v:g}" for k, v in snap.multipliers.items())
        lines.append(f"  {load:g}x: {mults}; {snap.changes} changes, {snap.suppressed} suppressed")
    if result.rls:
        lines += ["", format_rls(result.rls, opts.rls_seconds)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.adaptive",
        description="Critical TTFT with adaptive and static rate limits against a Kubernetes "
        "Service, and the global rate-limit service's cost with Envoy as its client.",
    )
    parser.add_argument("--loads", type=loads_arg, default=DEFAULT_LOADS, help="e.g. 0.5,1.5,2")
    parser.add_argument("--duration", type=float, default=25.0, help="seconds of arrivals a run")
    parser.add_argument("--warmup", type=float, default=5.0, help="of them, seconds not counted")
    parser.add_argument("--repeat", type=int, default=1, help="rounds, pooled")
    parser.add_argument(
        "--sheddable-limit", type=float, help="per-endpoint sheddable rps (default: half a pod)"
    )
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"from {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--rls-seconds", type=float, default=5.0, help="0 skips the RLS part")
    parser.add_argument("--rls-concurrency", default="1,16", help="requests in flight, e.g. 1,16")
    parser.add_argument("--rls-backends", default="memory,redis", help="memory, redis or both")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the PNG")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    scenarios = tuple(dict.fromkeys(s.strip() for s in args.scenarios.split(",") if s.strip()))
    backends = tuple(b.strip() for b in args.rls_backends.split(",") if b.strip())
    if any(b not in ("memory", "redis") for b in backends):
        parser.error("--rls-backends: memory, redis")
    try:
        in_flight = tuple(int(n) for n in args.rls_concurrency.split(",") if n.strip())
    except ValueError:
        parser.error("--rls-concurrency: whole numbers, e.g. 1,16")
    if not in_flight or min(in_flight) < 1:
        parser.error("--rls-concurrency: each at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts = AdaptiveBenchOptions(
            loads=args.loads,
            scenarios=scenarios,
            duration_s=args.duration,
            warmup_s=args.warmup,
            repeat=args.repeat,
            sheddable_limit=args.sheddable_limit,
            out_dir=args.out,
            progress=False if args.no_progress else None,
            rls_seconds=args.rls_seconds,
            rls_concurrency=in_flight,
            rls_backends=backends,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        result = asyncio.run(run_bench(opts))
    except (TestbedError, EnvoyMissing) as exc:
        print(f"bench.adaptive: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
