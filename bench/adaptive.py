"""Adaptive limits against static limits and round-robin, and the global service's cost.

``python -m bench.adaptive`` extends the priority-effect benchmark (:mod:`bench.priority`,
on :mod:`bench.demo`'s testbed and request mix) with per-endpoint rate limits. The two
GPU pods get sidecars of their own, which enforce ``inferlane.io/rate-limit`` on their
inbound side; the llama Service limits ``sheddable`` to about half a GPU pod's capacity
per endpoint. Three scenarios run the same seeded open-loop schedule at each load:

- ``inferlane-adaptive``: the limit with ``inferlane.io/adaptive: "true"``: the control
  plane scrapes each GPU pod's vLLM gauges and tightens that pod's sheddable limit when it
  saturates (:data:`CONTROLLER` settings), and loosens it when the pod has room again;
- ``inferlane-static``: the same limit, fixed;
- ``round-robin``: the plain Service of :mod:`bench.demo` (all three pods, no classes);
- ``critical-only``, a control: the critical share of the schedule alone through inferlane,
  as if every other request were refused at no cost. Critical requests still queue behind
  each other at high load, and no limit on the other classes can do better than this.

Each run begins with the controller reset and fresh pods; the first ``--warmup`` seconds
of arrivals are sent but not counted (the adaptive controller needs a few steps to find
the limit; every scenario gets the same warm-up, so the comparison is like for like).

Goal (issue 5): critical p99 at 1.5x and at 2x at most 1.2x its unloaded value (the same
scenario's value at the lowest load). The p99 counts a failed critical request as one that
took the whole client deadline, as :mod:`bench.priority` does.

Then the global rate-limit service with Envoy as its client: one sidecar in front of an
echo backend, driven closed-loop from a separate process, without the global filter and
with it (a limit no request reaches, so every request asks the service and none is
refused), with counters in memory and in Redis. It reports the service's decisions per
second and the p99 latency the filter adds.

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
import os
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
import yaml
from aiohttp import web
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from google.protobuf import json_format

from bench.demo import (
    BASELINE,
    CLIENT_IP,
    CLIENT_NODE_ID,
    CLIENT_SERVICE_ACCOUNT,
    EXAMPLE_MANIFESTS,
    GPU_PODS,
    SERVICE_HOST,
    SERVICE_NAME,
    SERVICE_NAMESPACE,
    DemoError,
    DemoOptions,
    ScenarioResult,
    Testbed,
    TestbedOptions,
    baseline_bootstrap,
    free_port,
    gpu_capacity_rps,
    load_spec,
    pod_configs,
    running_static_envoy,
    stage_manifests,
    start_pods,
)
from bench.envoy import Envoy, EnvoyMissing, envoy_binary, running_envoy
from bench.gpu_sim import SERVED_BY_HEADER, SimConfig
from bench.load import LoadSpec, percentile
from bench.plot import plot_sweep
from bench.priority import SweepOptions, SweepResult, format_details, format_sweep_table
from bench.wait import eventually
from mesh.manifests import ManifestSource
from mesh.model import PRIORITY_HEADER, Priority
from ratelimit.adaptive import AdaptiveSettings
from xds_server.app import ControlPlane, ServeSettings
from xds_server.rls.runtime import RateLimitSettings

log = logging.getLogger(__name__)

ADAPTIVE: Final = "inferlane-adaptive"
STATIC: Final = "inferlane-static"
#: A control, not a way to run a mesh: the same critical arrivals with no other class at
#: all, as if every lower-class request were refused at no cost. Its ratio is the floor
#: any limit on the other classes can reach; the rest is critical queueing behind critical.
CRITICAL_ONLY: Final = "critical-only"
SCENARIOS: Final = (ADAPTIVE, STATIC, BASELINE, CRITICAL_ONLY)
DEFAULT_LOADS: Final = (0.5, 1.5, 2.0)
#: Loads the goal is judged at, and the bound on critical p99 relative to the lowest load.
GOAL_LOADS: Final = (1.5, 2.0)
GOAL_RATIO: Final = 1.2

#: The controller as the benchmark runs it: quicker than the defaults (2 s to tighten,
#: 10 s to loosen, a 1 s scrape), so it settles within the warm-up of a short run. The
#: change budget still bounds pushes: at most 20 per endpoint per minute.
CONTROLLER: Final = AdaptiveSettings(
    tighten_hold_s=0.5, loosen_hold_s=3.0, max_changes_per_minute=20.0
)
SCRAPE_INTERVAL_S: Final = 0.25

CRITICAL: Final = "critical"
#: The example's pod IPs, moved to addresses of this benchmark's own, so that it never
#: contends with a demo or a bench.priority run for 127.0.0.11 to 127.0.0.22.
RELOCATED: Final = MappingProxyType({f"127.0.0.{n}": f"127.0.1.{n}" for n in (11, 12, 13, 21, 22)})
RATE_LIMIT: Final = "inferlane.io/rate-limit"
ADAPTIVE_ANNOTATION: Final = "inferlane.io/adaptive"
GLOBAL_RATE_LIMIT: Final = "inferlane.io/global-rate-limit"
LOCAL_FILTER: Final = "envoy.filters.http.local_ratelimit"
RLS_CLUSTER: Final = "inferlane-rls"


@dataclass(frozen=True)
class AdaptiveBenchOptions:
    loads: tuple[float, ...] = DEFAULT_LOADS
    scenarios: tuple[str, ...] = SCENARIOS
    #: Seconds of counted arrivals per run, after the warm-up.
    duration_s: float = 15.0
    #: Seconds of arrivals at the start of each run that are sent but not counted.
    warmup_s: float = 5.0
    #: Rounds over every load and scenario; a point's p99 is the median of its rounds.
    repeat: int = 1
    #: Sheddable requests per second each GPU endpoint admits; None: half a GPU pod's
    #: capacity (a guess an operator could make without measuring the load).
    sheddable_limit: float | None = None
    out_dir: Path = Path(".")
    progress: bool | None = None
    #: Seconds per phase of the rate-limit service measurement; 0 skips it.
    rls_seconds: float = 5.0
    #: Requests in flight in the rate-limit service measurement.
    rls_concurrency: tuple[int, ...] = (1, 16)
    rls_backends: tuple[str, ...] = ("memory", "redis")
    demo: DemoOptions = field(default_factory=DemoOptions)

    def __post_init__(self) -> None:
        if not self.loads or any(not x > 0 for x in self.loads):
            raise ValueError("loads must be positive multiples of capacity")
        if not self.duration_s > 0 or self.warmup_s < 0 or self.rls_seconds < 0:
            raise ValueError("duration must be positive, warm-up and rls seconds not negative")
        unknown = [s for s in self.scenarios if s not in SCENARIOS]
        if unknown or not self.scenarios:
            raise ValueError(f"scenarios: choose from {', '.join(SCENARIOS)}")
        if self.repeat < 1:
            raise ValueError("repeat must be at least 1")
        if self.sheddable_limit is not None and not self.sheddable_limit > 0:
            raise ValueError("the sheddable limit must be positive")
        object.__setattr__(self, "loads", tuple(sorted(set(self.loads))))

    def limit(self) -> float:
        if self.sheddable_limit is not None:
            return self.sheddable_limit
        gpu = SimConfig.gpu_pod("gpu")
        return float(round(gpu.capacity_rps(self.demo.max_tokens) / 2))


# --- the testbed ---------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _write_atomically(path: Path, documents: Sequence[Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump_all([_plain(d) for d in documents], sort_keys=False))
    os.replace(tmp, path)


def annotate_llama(documents: Sequence[Any], annotations: Mapping[str, str | None]) -> list[Any]:
    """A copy of ``documents`` with the llama Service's annotations set (None removes)."""
    out = []
    for doc in documents:
        copy = _plain(doc)
        meta = copy.get("metadata") or {}
        if copy.get("kind") == "Service" and meta.get("name") == SERVICE_NAME:
            current = dict(meta.get("annotations") or {})
            for key, value in annotations.items():
                if value is None:
                    current.pop(key, None)
                else:
                    current[key] = value
            copy["metadata"] = {**meta, "annotations": current}
        out.append(copy)
    return out


def relocate(documents: Sequence[Any], addresses: Mapping[str, str]) -> list[Any]:
    """A copy of ``documents`` with each Pod's IP replaced as ``addresses`` maps it."""
    out = []
    for doc in documents:
        copy = _plain(doc)
        status = copy.get("status") if copy.get("kind") == "Pod" else None
        if isinstance(status, dict):
            if "podIP" in status:
                status["podIP"] = addresses.get(status["podIP"], status["podIP"])
            for entry in status.get("podIPs") or []:
                entry["ip"] = addresses.get(entry.get("ip"), entry.get("ip"))
        out.append(copy)
    return out


def bench_pods() -> list[SimConfig]:
    """The demo's pods, at this benchmark's own addresses."""
    return [dataclasses.replace(c, host=RELOCATED[c.host]) for c in pod_configs()]


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


async def listener_url(envoy: Envoy, port: int | None = None, name: str | None = None) -> str:
    async def find() -> str:
        data = await envoy.admin_json("/listeners?format=json")
        for entry in data.get("listener_statuses", []):
            sock = entry.get("local_address", {}).get("socket_address", {})
            bound = int(sock.get("port_value", 0))
            if bound and (port is None or bound == port) and (name in (None, entry.get("name"))):
                return f"http://{sock.get('address', '127.0.0.1')}:{bound}"
        return ""

    return await eventually(find, timeout=30, what=f"listener {name or port}")


async def wait_routed(url: str, what: str) -> None:
    body = {"model": SERVICE_NAME, "prompt": "ready?", "max_tokens": 1}
    headers = {"Host": SERVICE_HOST, PRIORITY_HEADER: "critical"}
    async with aiohttp.ClientSession() as session:

        async def routed() -> bool:
            async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
                await r.read()
                return r.status == 200 and bool(r.headers.get(SERVED_BY_HEADER))

        await eventually(routed, timeout=30, interval=0.05, what=f"{what} routing")


def _sidecar_metadata(ip: str, service_account: str) -> tuple[dict[str, str], int]:
    outbound = free_port(ip)
    return {
        "NAMESPACE": SERVICE_NAMESPACE,
        "SERVICE_ACCOUNT": service_account,
        "INFERLANE_OUTBOUND_PORT": str(outbound),
        "INFERLANE_INBOUND_PORT": str(free_port(ip)),
        "INFERLANE_BIND_ADDRESS": ip,
        # Pods share this host's loopback: each workload listens on its own pod IP.
        "INFERLANE_WORKLOAD_ADDRESS": ip,
    }, outbound


class LimitsBed:
    """The demo's testbed plus sidecars on the GPU pods and a rate-limited llama Service."""

    def __init__(
        self,
        *,
        bed: Testbed,
        plane: ControlPlane,
        manifest: Path,
        documents: list[Any],
        limit: float,
        gpu_sidecars: Sequence[Envoy],
    ) -> None:
        self.bed = bed
        self.plane = plane
        self.manifest = manifest
        self.documents = documents
        self.limit = limit
        self.gpu_sidecars = tuple(gpu_sidecars)
        self.adaptive: bool | None = None

    async def use(self, adaptive: bool) -> None:
        """Switch llama to adaptive or static limits, reset the controller, and wait until
        every GPU sidecar enforces the annotation's limit again."""
        if adaptive != self.adaptive:
            value = "true" if adaptive else None
            _write_atomically(
                self.manifest, annotate_llama(self.documents, {ADAPTIVE_ANNOTATION: value})
            )

            async def switched() -> bool:
                world = self.plane.world
                svc = world.service(SERVICE_NAMESPACE, SERVICE_NAME) if world else None
                return svc is not None and svc.config.adaptive == adaptive

            await eventually(switched, timeout=10, what="llama's adaptive annotation")
            self.adaptive = adaptive
        self.plane.ratelimits.reset_adaptive()
        full_ms = 1000.0 / self.limit

        async def at_full_limit() -> bool:
            found = [await sheddable_ms(e) for e in self.gpu_sidecars]
            return all(ms is not None and math.isclose(ms, full_ms) for ms in found)

        await eventually(at_full_limit, timeout=10, interval=0.05, what="limits reset")


@contextlib.asynccontextmanager
async def limits_testbed(opts: AdaptiveBenchOptions) -> AsyncIterator[LimitsBed]:
    """Pods, the control plane, the client and GPU sidecars, and the baseline Envoy."""
    envoy_binary()
    workdir = Path(tempfile.mkdtemp(prefix="inferlane-adaptive-"))
    pods = []
    try:
        staged = stage_manifests(EXAMPLE_MANIFESTS, workdir, opts.demo.testbed.max_concurrency)
        documents = [d for d in yaml.safe_load_all(staged.read_text()) if d]
        limit = opts.limit()
        documents = annotate_llama(
            relocate(documents, RELOCATED), {RATE_LIMIT: f"sheddable={limit:g}"}
        )
        _write_atomically(staged, documents)
        pods = await start_pods(bench_pods())
        bed = Testbed(opts.demo.testbed, pods)
        settings = ServeSettings(
            manifests=staged,
            host="127.0.0.1",
            xds_port=0,
            admin_port=0,
            shutdown_grace=0.2,
            ratelimit=RateLimitSettings(scrape_interval_s=SCRAPE_INTERVAL_S, adaptive=CONTROLLER),
        )
        plane = ControlPlane(settings, ManifestSource(staged, poll_interval=0.1))
        task = asyncio.create_task(plane.run(), name="adaptive-bench-control-plane")
        try:

            async def started() -> bool:
                if task.done():
                    task.result()
                    raise DemoError("the control plane stopped")
                return plane.started.is_set() and plane.world is not None

            await eventually(started, timeout=30, what="the control plane")
            async with contextlib.AsyncExitStack() as stack:
                client_ip = RELOCATED[CLIENT_IP]
                client_meta, outbound = _sidecar_metadata(client_ip, CLIENT_SERVICE_ACCOUNT)
                client_id = CLIENT_NODE_ID.replace(CLIENT_IP, client_ip)
                client = await stack.enter_async_context(
                    running_envoy(client_id, plane.ports["xds"], metadata=client_meta)
                )
                gpu_sidecars = []
                for name, example_ip in GPU_PODS:
                    ip = RELOCATED[example_ip]
                    meta, _ = _sidecar_metadata(ip, "llama")
                    node_id = f"sidecar~{ip}~{name}.{SERVICE_NAMESPACE}~{SERVICE_NAMESPACE}"
                    node_id += ".svc.cluster.local"
                    gpu_sidecars.append(
                        await stack.enter_async_context(
                            running_envoy(node_id, plane.ports["xds"], metadata=meta)
                        )
                    )
                backends = {BASELINE: bench_pods()}
                baseline = await stack.enter_async_context(
                    running_static_envoy(baseline_bootstrap(backends, route_timeout_s=30.0))
                )
                inferlane_url = await listener_url(client, port=outbound)
                bed.urls = {
                    ADAPTIVE: inferlane_url,
                    STATIC: inferlane_url,
                    CRITICAL_ONLY: inferlane_url,
                    BASELINE: await listener_url(baseline, name=BASELINE),
                }
                bed.envoys = {"client": client, BASELINE: baseline}
                for i, envoy in enumerate(gpu_sidecars):
                    bed.envoys[f"gpu-{i}"] = envoy
                for scenario, url in bed.urls.items():
                    await wait_routed(url, scenario)
                yield LimitsBed(
                    bed=bed,
                    plane=plane,
                    manifest=staged,
                    documents=documents,
                    limit=limit,
                    gpu_sidecars=gpu_sidecars,
                )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        for pod in bed.pods if pods else []:
            await pod.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- the sweep -----------------------------------------------------------------------


def after_warmup(run: ScenarioResult, warmup_s: float) -> ScenarioResult:
    """``run`` with only the requests that started after the warm-up."""
    kept = tuple(r for r in run.load.records if r.started_s >= warmup_s)
    return dataclasses.replace(run, load=dataclasses.replace(run.load, records=kept))


@dataclass(frozen=True)
class AdaptiveSnapshot:
    """What the controller had done by the end of an adaptive run."""

    multipliers: Mapping[str, float]
    changes: int
    suppressed: int


@dataclass(frozen=True)
class BenchResult:
    options: AdaptiveBenchOptions
    sweep: SweepResult
    limit: float
    controller: Mapping[float, AdaptiveSnapshot]
    rls: tuple[RlsOverhead, ...] = ()


async def run_sweep(opts: AdaptiveBenchOptions) -> tuple[SweepResult, dict[float, Any]]:
    capacity = gpu_capacity_rps(opts.demo.max_tokens)
    runs: dict[str, dict[float, list[ScenarioResult]]] = {
        name: {load: [] for load in opts.loads} for name in opts.scenarios
    }
    controller: dict[float, AdaptiveSnapshot] = {}
    total_s = opts.warmup_s + opts.duration_s
    async with limits_testbed(opts) as lbed:
        for round_ in range(opts.repeat):
            seeded = dataclasses.replace(opts.demo, seed=opts.demo.seed + round_)
            for load in opts.loads:
                spec = load_spec(seeded, load * capacity, total_s)
                for scenario in opts.scenarios:
                    if scenario in (ADAPTIVE, STATIC):
                        await lbed.use(adaptive=scenario == ADAPTIVE)
                    if opts.progress is not False:
                        print(
                            f"round {round_ + 1}/{opts.repeat}: {scenario} at {load:g}x"
                            f" ({spec.rate_rps:.0f} requests/s)",
                            file=sys.stderr,
                        )
                    run = await lbed.bed.run(
                        scenario, _scenario_spec(scenario, spec), progress=opts.progress
                    )
                    runs[scenario][load].append(after_warmup(run, opts.warmup_s))
                    if scenario == ADAPTIVE:
                        controller[load] = _controller_state(lbed.plane)
    sweep_opts = SweepOptions(
        loads=opts.loads,
        scenarios=opts.scenarios,
        duration_s=opts.duration_s,
        out_dir=opts.out_dir,
        progress=opts.progress,
        repeat=opts.repeat,
        demo=opts.demo,
    )
    frozen = {
        name: MappingProxyType({load: tuple(rs) for load, rs in points.items()})
        for name, points in runs.items()
    }
    result = SweepResult(sweep_opts, capacity, MappingProxyType(frozen))
    plot = plot_sweep(
        result.plotted(),
        opts.out_dir / "adaptive-sweep.png",
        title=f"Critical p99 with rate limits (1x = {capacity:.0f} requests/s)",
        ylabel=f"critical p99 (ms; failures count as {opts.demo.timeout_s:g} s)",
    )
    return SweepResult(sweep_opts, capacity, result.runs, plot), controller


def _scenario_spec(scenario: str, spec: LoadSpec) -> LoadSpec:
    """The control sends only the schedule's critical share, at the critical rate."""
    if scenario != CRITICAL_ONLY:
        return spec
    share = spec.mix.get(CRITICAL, 0.0) / sum(spec.mix.values())
    return dataclasses.replace(spec, mix={CRITICAL: 1.0}, rate_rps=spec.rate_rps * share)


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


# --- the rate-limit service with Envoy as its client -------------------------------

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
            _write_atomically(manifest, _echo_documents(port, global_limit=False))
            settings = ServeSettings(
                manifests=manifest,
                host="127.0.0.1",
                xds_port=0,
                admin_port=0,
                shutdown_grace=0.2,
                ratelimit=RateLimitSettings(rls_port=0, redis_url=redis_url, rls_timeout_s=0.5),
            )
            plane = ControlPlane(settings, ManifestSource(manifest, poll_interval=0.1))
            task = asyncio.create_task(plane.run(), name="rls-bench-control-plane")
            try:
                await eventually(
                    lambda: _started(plane, task), timeout=30, what="the control plane"
                )
                meta, outbound = _sidecar_metadata(RLS_CLIENT_IP, "bench")
                node_id = f"sidecar~{RLS_CLIENT_IP}~rls-client-0.default~default.svc.cluster.local"
                async with running_envoy(node_id, plane.ports["xds"], metadata=meta):
                    url = f"http://{RLS_CLIENT_IP}:{outbound}/"
                    await eventually(
                        lambda: _status_ok(url), timeout=30, what="echo through the sidecar"
                    )
                    without = [await drive_in_child(url, seconds, n) for n in concurrency]
                    _write_atomically(manifest, _echo_documents(port, global_limit=True))
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
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return [
        RlsOverhead(backend, n, off, on, calls / on.seconds)
        for n, off, on, calls in zip(concurrency, without, with_filter, decided, strict=True)
    ]


async def _started(plane: ControlPlane, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()
        raise DemoError("the control plane stopped")
    return plane.started.is_set() and plane.world is not None


async def _status_ok(url: str) -> bool:
    headers = {"Host": ECHO_HOST, PRIORITY_HEADER: "standard"}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        await resp.read()
        return resp.status == 200


# --- the whole run and its report -------------------------------------------------


async def run_bench(opts: AdaptiveBenchOptions) -> BenchResult:
    sweep, controller = await run_sweep(opts)
    rls = []
    if opts.rls_seconds > 0:
        for backend in opts.rls_backends:
            if opts.progress is not False:
                print(f"rate-limit service, {backend} counters", file=sys.stderr)
            rls += await measure_rls(backend, opts.rls_seconds, opts.rls_concurrency)
    return BenchResult(opts, sweep, opts.limit(), MappingProxyType(controller), tuple(rls))


def goal_lines(result: BenchResult) -> list[str]:
    sweep = result.sweep
    low = min(result.options.loads)
    out = []
    for name in (ADAPTIVE, STATIC, BASELINE, CRITICAL_ONLY):
        if name not in sweep.runs:
            continue
        for load in GOAL_LOADS:
            if load not in sweep.runs[name]:
                continue
            ratio = sweep.ratio(name, load)
            what = "control" if name == CRITICAL_ONLY else "goal"
            claim = (
                f"{what} {name}: critical p99 at {load:g}x <= {GOAL_RATIO:g}x its {low:g}x value: "
            )
            if ratio is None:
                out.append(claim + "not a number (critical failed at the lowest load)")
                continue
            noisy = sweep.disturbed(name, low) or sweep.disturbed(name, load)
            verdict = "met" if ratio.value <= GOAL_RATIO and not ratio.at_least else "MISSED"
            if name == CRITICAL_ONLY:
                verdict = "the floor for any limit on the other classes"
            caveat = " (from a disturbed run: measure again)" if noisy else ""
            out.append(claim + f"{ratio}, {verdict}{caveat}")
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
    opts = result.options
    demo = opts.demo
    mix = ", ".join(f"{cls} {w:g}" for cls, w in demo.mix.items())
    lines = [
        f"1x = {result.sweep.capacity_rps:.0f} requests/s (2 simulated GPU pods,"
        f" {demo.max_tokens} tokens per request); {opts.duration_s:g} s counted per point after"
        f" a {opts.warmup_s:g} s warm-up; mix {mix}; client deadline {demo.timeout_s:g} s;"
        f" max-concurrency {demo.testbed.max_concurrency}; rate-limit sheddable="
        f"{result.limit:g} per GPU endpoint.",
        f"controller: scrape every {SCRAPE_INTERVAL_S:g} s, tighten after"
        f" {CONTROLLER.tighten_hold_s:g} s, loosen after {CONTROLLER.loosen_hold_s:g} s, at most"
        f" {CONTROLLER.max_changes_per_minute:g} changes per endpoint per minute.",
        "",
        "critical p99 over every critical request (a failure counts as the deadline), its"
        " ratio to the same scenario's lowest load, and the share that succeeded:",
        format_sweep_table(result.sweep),
        "",
        *goal_lines(result),
        "",
        "adaptive controller at the end of each adaptive run (sheddable multiplier per"
        " endpoint; changes and budget-suppressed changes over the run):",
    ]
    for load, snap in result.controller.items():
        mults = ", ".join(f"{k}={v:g}" for k, v in snap.multipliers.items())
        lines.append(f"  {load:g}x: {mults}; {snap.changes} changes, {snap.suppressed} suppressed")
    lines += ["", "per class, percentiles over successful requests:", format_details(result.sweep)]
    if result.rls:
        lines += ["", format_rls(result.rls, opts.rls_seconds)]
    lines += ["", f"plot: {result.sweep.plot}"]
    return "\n".join(lines)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers, e.g. 0.5,1.5,2") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.adaptive",
        description="Critical p99 with adaptive and static rate limits against round-robin, "
        "and the global rate-limit service's cost with Envoy as its client.",
    )
    parser.add_argument("--loads", type=_floats, default=DEFAULT_LOADS, help="e.g. 0.5,1.5,2")
    parser.add_argument("--duration", type=float, default=15.0, help="counted seconds per run")
    parser.add_argument("--warmup", type=float, default=5.0, help="uncounted seconds per run")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; a point is their median")
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
    parser.add_argument("--seed", type=int, default=DemoOptions.seed)
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
            demo=DemoOptions(seed=args.seed, testbed=TestbedOptions()),
        )
        result = asyncio.run(run_bench(opts))
    except (ValueError, DemoError, EnvoyMissing) as exc:
        print(f"bench.adaptive: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
