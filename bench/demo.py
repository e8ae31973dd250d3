"""The demo (``make demo``, ``python -m bench.demo``): one overload through inferlane and
through a plain Service.

Everything runs on this machine, on loopback addresses that stand in for pod IPs:

- simulated model servers on the example cluster's pod IPs, port 8000: two GPU pods
  (``llama-gpu-0`` at 127.0.0.11, ``llama-gpu-1`` at 127.0.0.12) and one CPU pod
  (``llama-cpu-0`` at 127.0.0.13), with :mod:`bench.gpu_sim`'s profiles;
- the control plane, in process, on a copy of ``examples/cluster`` with
  ``inferlane.io/max-concurrency: "8"`` added to the llama Service (the example leaves
  it unset; see :func:`stage_manifests`), and a real Envoy as the ``chat-frontend-0``
  sidecar;
- the baseline: a second real Envoy with a static bootstrap, one ROUND_ROBIN cluster over
  all three pods, no classes and no priorities, which is what a Kubernetes Service gives.

The same seeded open-loop schedule of critical and sheddable requests, above the GPU
pool's capacity, goes through each in turn, after a short warm-up through each. The pods
are restarted before each run, so work a previous run left queued (a client gives up; the
simulated server does not) never leaks into the next.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import gc
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import aiohttp
import yaml

from bench.envoy import Envoy, EnvoyMissing, envoy_binary, running_envoy
from bench.gpu_sim import SERVED_BY_HEADER, RunningSim, SimConfig, SimStats, start_sims
from bench.load import (
    DEFAULT_MIX,
    ClassSummary,
    LoadResult,
    LoadSpec,
    format_table,
    parse_mix,
    percentile,
    run_load,
)
from bench.plot import plot_latency
from bench.wait import eventually
from mesh.manifests import ManifestSource, load_objects
from mesh.model import PRIORITY_HEADER
from xds_server.app import ControlPlane, ServeSettings
from xds_server.sidecar.bootstrap import BootstrapOptions

log = logging.getLogger(__name__)

#: The example cluster shipped with the repository.
EXAMPLE_MANIFESTS: Final = Path(__file__).resolve().parent.parent / "examples" / "cluster"

SERVICE_NAMESPACE: Final = "default"
SERVICE_NAME: Final = "llama"
SERVICE_HOST: Final = "llama.default.svc.cluster.local"
SERVICE_PORT: Final = 8000
MAX_CONCURRENCY_ANNOTATION: Final = "inferlane.io/max-concurrency"

#: The example's pods: (name, pod IP).
GPU_PODS: Final = (("llama-gpu-0", "127.0.0.11"), ("llama-gpu-1", "127.0.0.12"))
CPU_PODS: Final = (("llama-cpu-0", "127.0.0.13"),)

#: The client whose sidecar the demo runs: on llama's critical-callers list.
CLIENT_IP: Final = "127.0.0.21"
CLIENT_NODE_ID: Final = "sidecar~127.0.0.21~chat-frontend-0.default~default.svc.cluster.local"
CLIENT_SERVICE_ACCOUNT: Final = "chat-frontend"

INFERLANE: Final = "inferlane"
BASELINE: Final = "round-robin"
#: A control, not part of the demo: round-robin over the GPU pods alone, to tell the
#: effect of class-blind queueing apart from that of the slow CPU pod.
BASELINE_GPU: Final = "round-robin-gpu"
#: What the demo compares.
SCENARIOS: Final = (INFERLANE, BASELINE)


#: Event-loop lag (99th percentile) above which a run is flagged as disturbed.
NOISY_LAG_MS: Final = 10.0
#: A single loop stall longer than this also flags the run (a GPU request takes 148 ms).
NOISY_STALL_MS: Final = 100.0
#: Length of each warm-up run, and its requests' deadline, in seconds.
WARM_UP_S: Final = 2.0
#: How often the loop-lag probe wakes, in seconds.
LAG_PROBE_S: Final = 0.01


class DemoError(RuntimeError):
    """The demo cannot run here (a busy address, a missing file); the message says why."""


@dataclass(frozen=True)
class TestbedOptions:
    """What runs behind the two entry points: pods, control plane, two Envoys."""

    __test__ = False  # not a pytest test class, despite the name

    #: Kubernetes manifests to copy and annotate (see :func:`stage_manifests`).
    manifests: Path = EXAMPLE_MANIFESTS
    #: Written as ``inferlane.io/max-concurrency`` on the llama Service. 8 is the
    #: simulated GPU pod's slot count, i.e. its ``max_num_seqs``.
    max_concurrency: int = 8
    #: How long setup (Envoy start, first xDS push, first routed request) may take, seconds.
    setup_timeout_s: float = 30.0


@dataclass(frozen=True)
class DemoOptions:
    #: Length of each scenario's arrival schedule, in seconds.
    duration_s: float = 20.0
    #: Offered load as a multiple of the GPU pool's capacity (:func:`gpu_capacity_rps`).
    load: float = 1.5
    #: Where the PNG goes.
    out_dir: Path = Path(".")
    #: Progress bar on stderr: True, False, or None to show it only on a terminal.
    progress: bool | None = None
    #: Class weights of the request mix.
    mix: Mapping[str, float] = field(default_factory=lambda: DEFAULT_MIX)
    #: Tokens each request generates. 64 makes a GPU request take 148 ms, long enough that
    #: the proxies' and the event loop's few milliseconds do not blur the queueing.
    max_tokens: int = 64
    #: A request's whole deadline at the client; past it, the request counts as an error.
    timeout_s: float = 10.0
    #: Seeds the schedule, so both scenarios get the very same arrivals.
    seed: int = 20240601
    testbed: TestbedOptions = field(default_factory=TestbedOptions)

    def __post_init__(self) -> None:
        if not self.duration_s > 0 or not self.load > 0 or not self.timeout_s > 0:
            raise ValueError("duration, load and timeout must be positive")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    load: LoadResult
    #: Each simulated pod's counters for this run alone (the pods restart per run).
    pods: Mapping[str, SimStats]
    #: The host's 1-minute load average when the run ended: with 2 cores, much above 2
    #: means the run competed for CPU (this process, the Envoys and anything else).
    host_load: float = 0.0
    #: How late this process's event loop woke up during the run, 99th percentile, in
    #: milliseconds. Pods and load generator share the loop, so lag adds to every
    #: latency: over :data:`NOISY_LAG_MS` the run competed for CPU and its tail is suspect.
    loop_lag_p99_ms: float = 0.0
    #: The longest single stall of the loop: one stall delays every request in flight.
    loop_lag_max_ms: float = 0.0

    @property
    def noisy(self) -> bool:
        return self.loop_lag_p99_ms > NOISY_LAG_MS or self.loop_lag_max_ms > NOISY_STALL_MS

    def summary(self) -> dict[str, ClassSummary]:
        return self.load.summary()


@dataclass(frozen=True)
class DemoResult:
    options: DemoOptions
    #: What the GPU pods complete per second together, for ``options.max_tokens``.
    capacity_rps: float
    rate_rps: float
    scenarios: Mapping[str, ScenarioResult]
    plot: Path
    #: Process IDs of every process the demo started (all ended by the time it returns).
    pids: tuple[int, ...]


# --- the pods ------------------------------------------------------------------------


def pod_configs(port: int = SERVICE_PORT) -> list[SimConfig]:
    """The example's three pods, GPU profile for the GPU pods, CPU profile for the other."""
    gpu = [SimConfig.gpu_pod(name, host, port) for name, host in GPU_PODS]
    cpu = [SimConfig.cpu_pod(name, host, port) for name, host in CPU_PODS]
    return gpu + cpu


def gpu_capacity_rps(max_tokens: int, configs: Sequence[SimConfig] | None = None) -> float:
    """Requests per second the GPU pods complete together with every slot busy."""
    gpu_names = {name for name, _ in GPU_PODS}
    cfgs = pod_configs() if configs is None else configs
    return sum(c.capacity_rps(max_tokens) for c in cfgs if c.name in gpu_names)


async def start_pods(configs: Sequence[SimConfig]) -> list[RunningSim]:
    """Start the pods; an address in use becomes a :class:`DemoError` that names it."""
    try:
        return await start_sims(configs)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        taken = ", ".join(f"{c.host}:{c.port}" for c in configs if _in_use(c.host, c.port))
        raise DemoError(
            f"address in use: {taken or exc}. Another demo, benchmark or test is serving "
            "the example pods' addresses; stop it and try again."
        ) from exc


def _in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str) -> int:
    """A port that is free on ``host`` right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --- manifests -----------------------------------------------------------------------


def stage_manifests(source: Path, dest_dir: Path, max_concurrency: int) -> Path:
    """Copy the manifests under ``source`` into one file in ``dest_dir``, adding
    ``inferlane.io/max-concurrency`` to the llama Service; return the file.

    The example leaves max-concurrency unset, and without it every class may fill the
    GPU pods. The copy keeps every other object and annotation as it is.
    """
    objects, errors = load_objects(source)
    if errors:
        raise DemoError("; ".join(f"{e.source}: {e.message}" for e in errors))
    staged: list[dict[str, Any]] = []
    found = False
    for obj in objects:
        copy = _plain(obj)
        meta = copy.get("metadata") or {}
        if (
            copy.get("kind") == "Service"
            and meta.get("name") == SERVICE_NAME
            and meta.get("namespace", "default") == SERVICE_NAMESPACE
        ):
            annotations = dict(meta.get("annotations") or {})
            annotations[MAX_CONCURRENCY_ANNOTATION] = str(max_concurrency)
            copy["metadata"] = {**meta, "annotations": annotations}
            found = True
        staged.append(copy)
    if not found:
        raise DemoError(f"no Service {SERVICE_NAMESPACE}/{SERVICE_NAME} under {source}")
    out = dest_dir / "cluster.yaml"
    out.write_text(yaml.safe_dump_all(staged, sort_keys=False))
    return out


def _plain(value: Any) -> Any:
    """A deep copy as plain dicts and lists (safe_dump refuses other mapping types)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --- the baseline Envoy --------------------------------------------------------------

_HCM: Final = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_ROUTER: Final = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
#: Never binds: kube-proxy puts no limit on a Service's connections either.
_UNLIMITED: Final = 100_000


def baseline_bootstrap(
    backends: Mapping[str, Sequence[SimConfig]], route_timeout_s: float
) -> dict[str, Any]:
    """A static Envoy: per entry, a listener (port 0) and a ROUND_ROBIN cluster over its
    pods, both named after the entry.

    No classes, no priorities, no retries and no circuit breaking: what a Kubernetes
    Service gives. The route timeout matches the inferlane critical route's, so neither
    side cuts requests off sooner.
    """
    return {
        "node": {"id": "baseline", "cluster": "baseline"},
        "admin": {"address": _loopback_port_0()},
        "static_resources": {
            "listeners": [_static_listener(name, route_timeout_s) for name in backends],
            "clusters": [_round_robin_cluster(name, pods) for name, pods in backends.items()],
        },
    }


def _loopback_port_0() -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": 0}}


def _static_listener(name: str, route_timeout_s: float) -> dict[str, Any]:
    route = {"match": {"prefix": "/"}, "route": {"cluster": name, "timeout": f"{route_timeout_s}s"}}
    manager = {
        "@type": _HCM,
        "stat_prefix": name,
        "route_config": {
            "name": name,
            "virtual_hosts": [{"name": SERVICE_NAME, "domains": ["*"], "routes": [route]}],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
    return {"name": name, "address": _loopback_port_0(), "filter_chains": [{"filters": [hcm]}]}


def _round_robin_cluster(name: str, pods: Sequence[SimConfig]) -> dict[str, Any]:
    endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": p.host, "port_value": p.port}}}}
        for p in pods
    ]
    unlimited = {
        "max_connections": _UNLIMITED,
        "max_pending_requests": _UNLIMITED,
        "max_requests": _UNLIMITED,
        "max_retries": _UNLIMITED,
    }
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "lb_policy": "ROUND_ROBIN",
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", **unlimited}]},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
    }


class StaticEnvoy(Envoy):
    """An :class:`~bench.envoy.Envoy` run on a static bootstrap instead of ADS."""

    def __init__(self, bootstrap: Mapping[str, Any], log_level: str = "warning") -> None:
        super().__init__(BootstrapOptions(node_id="baseline"), log_level=log_level)
        self.bootstrap = bootstrap

    def bootstrap_text(self) -> str:
        return yaml.safe_dump(_plain(self.bootstrap), sort_keys=False)


@contextlib.asynccontextmanager
async def running_static_envoy(bootstrap: Mapping[str, Any]) -> AsyncIterator[Envoy]:
    envoy = StaticEnvoy(bootstrap)
    try:
        yield await envoy.start()
    finally:
        await envoy.stop()


# --- the control plane ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_control_plane(manifests: Path, timeout_s: float) -> AsyncIterator[ControlPlane]:
    """The control plane in this process, on ``manifests``; cancelled and awaited on exit."""
    settings = ServeSettings(manifests=manifests, host="127.0.0.1", xds_port=0, admin_port=0)
    plane = ControlPlane(settings, ManifestSource(manifests))
    task = asyncio.create_task(plane.run(), name="inferlane-control-plane")
    try:
        started = asyncio.create_task(plane.started.wait(), name="control-plane-started")
        done, _ = await asyncio.wait(
            {task, started}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if started not in done:
            started.cancel()
            if task in done:
                task.result()  # raises the control plane's own error
            raise DemoError(f"the control plane did not start within {timeout_s} s")
        yield plane
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- the testbed ---------------------------------------------------------------------


class Testbed:
    """The running pods and both proxies. Made by :func:`testbed`."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, options: TestbedOptions, pods: list[RunningSim]) -> None:
        self.options = options
        self.pods = pods
        self.urls: dict[str, str] = {}
        self.envoys: dict[str, Envoy] = {}

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(e.proc.pid for e in self.envoys.values() if e.proc is not None)

    async def restart_pods(self) -> None:
        """Fresh pods at the same addresses: empty queues, zeroed counters.

        A client that gives up does not cancel the request at the simulated server, so
        without this the queue a run leaves behind would slow the next one down.
        """
        configs = [p.config for p in self.pods]
        for pod in self.pods:
            await pod.stop()
        self.pods = []
        self.pods = await start_pods(configs)

    def pod_stats(self) -> dict[str, SimStats]:
        return {p.name: p.stats() for p in self.pods}

    async def run(
        self, scenario: str, spec: LoadSpec, *, progress: bool | None = None
    ) -> ScenarioResult:
        """Restart the pods, then send ``spec`` (its url replaced) through ``scenario``.

        Pods, load generator and control plane share this process, whose heap is large
        (protobuf, grpc, kubernetes): a full cyclic garbage collection stalls the event
        loop for 100 to 250 ms, and every request in flight with it. So the heap is
        collected and frozen before each run (``gc.freeze``), and collections during
        the run only look at what the run allocates.
        """
        await self.restart_pods()
        gc.collect()
        gc.freeze()
        spec = dataclasses.replace(spec, url=self.urls[scenario], host=SERVICE_HOST)
        lags: list[float] = []
        probe = asyncio.create_task(_probe_loop_lag(lags), name="loop-lag-probe")
        try:
            result = await run_load(spec, progress=progress)
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        return ScenarioResult(
            scenario,
            result,
            MappingProxyType(self.pod_stats()),
            host_load=os.getloadavg()[0],
            loop_lag_p99_ms=percentile(lags, 99) or 0.0,
            loop_lag_max_ms=max(lags, default=0.0),
        )

    async def warm_up(self, scenarios: Sequence[str], spec: LoadSpec) -> None:
        """Two seconds through each scenario at half of ``spec``'s rate, thrown away.

        The first run after start-up pays for new connections and first-time code paths;
        without this, whichever run comes first would show it.
        """
        light = dataclasses.replace(
            spec, rate_rps=spec.rate_rps / 2, duration_s=WARM_UP_S, timeout_s=WARM_UP_S
        )
        for scenario in scenarios:
            await self.run(scenario, light, progress=False)


async def _probe_loop_lag(lags: list[float]) -> None:
    """Append, every LAG_PROBE_S, how many ms later than asked the loop woke up."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        await asyncio.sleep(LAG_PROBE_S)
        lags.append(max(0.0, (loop.time() - asked - LAG_PROBE_S) * 1000.0))


@contextlib.asynccontextmanager
async def testbed(options: TestbedOptions | None = None) -> AsyncIterator[Testbed]:
    """Start pods, control plane, the inferlane sidecar and the baseline Envoy; stop all
    of them on exit, whatever happens."""
    opts = options or TestbedOptions()
    envoy_binary()  # fail before anything starts if there is no envoy
    workdir = Path(tempfile.mkdtemp(prefix="inferlane-demo-"))
    bed: Testbed | None = None
    try:
        manifests = stage_manifests(opts.manifests, workdir, opts.max_concurrency)
        bed = Testbed(opts, await start_pods(pod_configs()))
        async with contextlib.AsyncExitStack() as stack:
            plane = await stack.enter_async_context(
                running_control_plane(manifests, opts.setup_timeout_s)
            )
            outbound = free_port(CLIENT_IP)
            metadata = {
                "NAMESPACE": SERVICE_NAMESPACE,
                "SERVICE_ACCOUNT": CLIENT_SERVICE_ACCOUNT,
                "INFERLANE_OUTBOUND_PORT": str(outbound),
                "INFERLANE_INBOUND_PORT": str(free_port(CLIENT_IP)),
                "INFERLANE_BIND_ADDRESS": CLIENT_IP,
            }
            sidecar = await stack.enter_async_context(
                running_envoy(CLIENT_NODE_ID, plane.ports["xds"], metadata=metadata)
            )
            bed.envoys[INFERLANE] = sidecar
            backends = {BASELINE: pod_configs(), BASELINE_GPU: pod_configs()[: len(GPU_PODS)]}
            baseline = await stack.enter_async_context(
                running_static_envoy(baseline_bootstrap(backends, route_timeout_s=30.0))
            )
            bed.envoys[BASELINE] = baseline
            bed.urls[INFERLANE] = await _listener_url(sidecar, opts.setup_timeout_s, port=outbound)
            for name in backends:
                bed.urls[name] = await _listener_url(baseline, opts.setup_timeout_s, name=name)
            for scenario, url in bed.urls.items():
                await _wait_routed(url, scenario, opts.setup_timeout_s)
            yield bed
    finally:
        if bed is not None:
            for pod in bed.pods:
                await pod.stop()
        gc.unfreeze()
        shutil.rmtree(workdir, ignore_errors=True)


async def _listener_url(
    envoy: Envoy, timeout_s: float, *, port: int | None = None, name: str | None = None
) -> str:
    """The URL of the listener bound to ``port`` or called ``name``, from the admin API."""

    async def find() -> str:
        data = await envoy.admin_json("/listeners?format=json")
        for entry in data.get("listener_statuses", []):
            sock = entry.get("local_address", {}).get("socket_address", {})
            bound = int(sock.get("port_value", 0))
            if bound and bound == (port or bound) and entry.get("name") == (name or entry["name"]):
                return f"http://{sock.get('address', '127.0.0.1')}:{bound}"
        return ""

    what = f"Envoy listener {name or ''} on port {port or 'any'}"
    url = await eventually(find, timeout=timeout_s, what=what)
    log.info("listener %s", url)
    return url


async def _wait_routed(url: str, scenario: str, timeout_s: float) -> None:
    """Poll until a critical request through ``url`` is answered by a pod."""
    body = {"model": SERVICE_NAME, "prompt": "ready?", "max_tokens": 1}
    headers = {"Host": SERVICE_HOST, PRIORITY_HEADER: "critical"}

    async with aiohttp.ClientSession() as session:

        async def routed() -> bool:
            async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
                await r.read()
                return r.status == 200 and bool(r.headers.get(SERVED_BY_HEADER))

        await eventually(routed, timeout=timeout_s, interval=0.05, what=f"{scenario} routing")


# --- the demo ------------------------------------------------------------------------


def load_spec(options: DemoOptions, rate_rps: float, duration_s: float | None = None) -> LoadSpec:
    """The demo's load at ``rate_rps``; the url is set per scenario by :meth:`Testbed.run`."""
    return LoadSpec(
        url="http://unset",
        rate_rps=rate_rps,
        duration_s=duration_s or options.duration_s,
        mix=options.mix,
        host=SERVICE_HOST,
        max_tokens=options.max_tokens,
        timeout_s=options.timeout_s,
        seed=options.seed,
    )


async def run_demo(opts: DemoOptions) -> DemoResult:
    """Run both scenarios with the same schedule, print nothing, return what happened."""
    capacity = gpu_capacity_rps(opts.max_tokens)
    rate = opts.load * capacity
    spec = load_spec(opts, rate)
    scenarios: dict[str, ScenarioResult] = {}
    pids: tuple[int, ...] = ()
    async with testbed(opts.testbed) as bed:
        pids = bed.pids
        await bed.warm_up(SCENARIOS, spec)
        for scenario in SCENARIOS:
            if opts.progress is not False:
                print(
                    f"{scenario}: {rate:.0f} requests/s for {opts.duration_s:g} s", file=sys.stderr
                )
            scenarios[scenario] = await bed.run(scenario, spec, progress=opts.progress)
    plot = plot_latency(
        {name: s.load for name, s in scenarios.items()},
        opts.out_dir / "demo-latency.png",
        title=f"Latency per class at {opts.load:g}x GPU capacity ({rate:.0f} requests/s)",
    )
    return DemoResult(
        options=opts,
        capacity_rps=capacity,
        rate_rps=rate,
        scenarios=MappingProxyType(scenarios),
        plot=plot,
        pids=pids,
    )


def format_report(result: DemoResult) -> str:
    opts = result.options
    mix = ", ".join(f"{cls} {w:g}" for cls, w in opts.mix.items())
    lines = [
        f"GPU pool capacity {result.capacity_rps:.0f} requests/s ({opts.max_tokens} tokens each);"
        f" offered {result.rate_rps:.0f} requests/s ({opts.load:g}x) for {opts.duration_s:g} s,"
        f" mix {mix}, client deadline {opts.timeout_s:g} s.",
    ]
    for name, scenario in result.scenarios.items():
        lines += ["", f"== {name} ==  ({_conditions(scenario)})"]
        lines.append(format_table(scenario.summary()))
        lines.append("pods:  " + _pod_line(scenario.pods))
    lines += ["", f"latency plot: {result.plot}"]
    return "\n".join(lines)


def _conditions(run: ScenarioResult) -> str:
    """The run's CPU conditions, flagged when they disturbed the measurement."""
    text = (
        f"host load average {run.host_load:.1f}, loop lag p99 {run.loop_lag_p99_ms:.1f} ms,"
        f" max {run.loop_lag_max_ms:.0f} ms"
    )
    return text + (": disturbed, the tail is suspect" if run.noisy else "")


def _pod_line(pods: Mapping[str, SimStats]) -> str:
    parts = []
    for name, stats in pods.items():
        classes = ", ".join(f"{c or 'none'} {n}" for c, n in sorted(stats.by_priority.items()))
        parts.append(f"{name} received {sum(stats.by_priority.values())} ({classes or '-'})")
    return "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.demo",
        description="Overload a simulated GPU pool through inferlane and through a plain "
        "round-robin Service, and show what each priority class got.",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per scenario")
    parser.add_argument(
        "--load", type=float, default=1.5, help="offered load, a multiple of GPU capacity"
    )
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--mix", default="critical=30,sheddable=70", help="class weights")
    parser.add_argument("--seed", type=int, default=DemoOptions.seed)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mix = parse_mix(args.mix)
    if isinstance(mix, str):
        parser.error(f"--mix: {mix}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts = DemoOptions(
            duration_s=args.duration,
            load=args.load,
            out_dir=args.out,
            progress=False if args.no_progress else None,
            mix=mix,
            seed=args.seed,
        )
        result = asyncio.run(run_demo(opts))
    except (ValueError, DemoError, EnvoyMissing) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
