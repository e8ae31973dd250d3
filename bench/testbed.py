"""The benchmark mesh, running: simulated pods, the control plane, real Envoys, baselines.

:func:`running_testbed` starts, for one :class:`~bench.topology.Knobs` setting:

- the pods of :mod:`bench.topology` in a child process (``python -m bench.gpu_sim
  --pods``), so that their engine loops get a core of their own; they are read and reset
  over HTTP (``/sim/stats``, ``/sim/reset``), as a benchmark reads real pods;
- the control plane in this process, on the topology's manifests;
- a real Envoy 1.40 for each caller (a sidecar, or the gateway for the gateway caller)
  and a sidecar for each pod, all bootstrapped to the control plane (``--use-dynamic-
  base-id`` each): inferlane's path is caller, its Envoy, the pod's sidecar, the pod;
- one static Envoy for the baselines, with two listeners per caller over the GPU pods
  alone: ROUND_ROBIN per request (a Kubernetes Service, set up well: kube-proxy balances
  connections, not requests) and LEAST_REQUEST (what a mesh gives today), no classes, no
  limits. Each caller has clusters of its own, so each balances on its own view, as each
  caller's sidecar or node would.

:meth:`Testbed.run` sends one load through one :class:`Scenario` and returns what the
clients saw and what the pods counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import gc
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import aiohttp
import yaml

from bench.envoy import Envoy, envoy_binary, running_envoy
from bench.gpu_sim import SERVED_BY_HEADER, SimConfig, SimStats
from bench.load import LengthDist, LoadResult, LoadSpec, percentile, run_load
from bench.topology import (
    NAMESPACE,
    SERVICE,
    SERVICE_HOST,
    CallerPod,
    Knobs,
    Topology,
)
from bench.wait import eventually
from mesh.manifests import ManifestSource
from mesh.model import PRIORITY_HEADER
from xds_server.app import ControlPlane, ServeSettings
from xds_server.rls.runtime import RateLimitSettings
from xds_server.sidecar.bootstrap import BootstrapOptions

log = logging.getLogger(__name__)

REPO: Final = Path(__file__).resolve().parent.parent
#: Event-loop lag (99th percentile) above which a run is flagged as disturbed.
NOISY_LAG_MS: Final = 10.0
#: A single stall of the loop longer than this also flags the run.
NOISY_STALL_MS: Final = 100.0
#: A run whose pods' steps started late for more than this share of the run is flagged.
NOISY_POD_LATE: Final = 0.02
#: Outputs of the warm-up's requests: short, so that it ends soon after its arrivals.
WARM_UP_OUTPUT: Final = LengthDist(median=4, sigma=0.0, low=4, high=4)
#: How long a start waits for the pods' addresses to be free (a run just before may
#: still be closing), in seconds.
ADDRESS_GRACE_S: Final = 10.0
#: How often the loop-lag probe wakes, in seconds.
LAG_PROBE_S: Final = 0.01


class TestbedError(RuntimeError):
    """The testbed cannot run here (a busy address, a missing binary); the message says why."""

    __test__ = False  # not a pytest test class, despite the name


class Entry(enum.Enum):
    """Where callers send their requests."""

    INFERLANE = "inferlane"
    ROUND_ROBIN = "round-robin"
    LEAST_REQUEST = "least-request"


@dataclass(frozen=True)
class Scenario:
    name: str
    entry: Entry
    description: str
    #: Send only these classes of the schedule (the arrivals of the others are dropped).
    only: frozenset[str] | None = None


INFERLANE: Final = Scenario(
    "inferlane", Entry.INFERLANE, "the control plane's config, through real Envoys"
)
SERVICE_RR: Final = Scenario(
    "k8s-service",
    Entry.ROUND_ROBIN,
    "a Kubernetes Service over the GPU pods: round robin, no classes",
)
LEAST_REQUEST: Final = Scenario(
    "least-request",
    Entry.LEAST_REQUEST,
    "each caller's Envoy, LEAST_REQUEST over the GPU pods, no classes (a mesh today)",
)
CRITICAL_ONLY: Final = Scenario(
    "critical-only",
    Entry.INFERLANE,
    "the same critical arrivals and nothing else: the physical limit",
    only=frozenset({"critical"}),
)
SCENARIOS: Final = (INFERLANE, SERVICE_RR, LEAST_REQUEST, CRITICAL_ONLY)


def scenario_named(name: str) -> Scenario:
    for s in SCENARIOS:
        if s.name == name:
            return s
    raise ValueError(f"no scenario {name!r}; choose from {', '.join(s.name for s in SCENARIOS)}")


@dataclass(frozen=True)
class RunResult:
    """One load through one scenario."""

    scenario: str
    knobs: Knobs
    load: LoadResult
    #: Each pod's counters for this run alone (reset before it).
    pods: Mapping[str, SimStats]
    #: The host's 1-minute load average when the run ended (2 cores: above 2 is contended).
    host_load: float = 0.0
    #: How late this process's event loop woke, p99 and worst, in milliseconds: the load
    #: generator and the control plane share it.
    loop_lag_p99_ms: float = 0.0
    loop_lag_max_ms: float = 0.0

    @property
    def pods_late_share(self) -> float:
        """The share of the run the pods' engine steps started late (their loop was busy)."""
        late = max((s.late_s for s in self.pods.values()), default=0.0)
        return late / self.load.elapsed_s if self.load.elapsed_s > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return (
            self.loop_lag_p99_ms > NOISY_LAG_MS
            or self.loop_lag_max_ms > NOISY_STALL_MS
            or self.pods_late_share > NOISY_POD_LATE
        )

    def conditions(self) -> str:
        text = (
            f"host load {self.host_load:.1f}, loop lag p99 {self.loop_lag_p99_ms:.1f} ms"
            f" (max {self.loop_lag_max_ms:.0f} ms), pods late {self.pods_late_share:.1%}"
        )
        return text + (": disturbed, the tail is suspect" if self.noisy else "")


# --- addresses ------------------------------------------------------------------------


def in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports free on ``host`` right now (the caller binds them soon
    after). They are held open together while chosen: one at a time, the kernel may
    hand out the same port twice, and a sidecar given it for two listeners rejects both.
    xDS listener ports cannot be 0 (node metadata must name a port)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port(host: str) -> int:
    """A port that is free on ``host`` right now (the caller binds it soon after)."""
    return free_ports(host, 1)[0]


# --- the pods, in a child process ----------------------------------------------------


class PodHost:
    """Simulated pods served by ``python -m bench.gpu_sim --pods`` in a child process."""

    def __init__(self, configs: Sequence[SimConfig], workdir: Path) -> None:
        self.configs = tuple(configs)
        self._workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None
        self.urls: dict[str, str] = {}
        self._session: aiohttp.ClientSession | None = None

    def _busy(self) -> list[str]:
        return [f"{c.host}:{c.port}" for c in self.configs if c.port and in_use(c.host, c.port)]

    async def start(self, timeout_s: float = 30.0) -> PodHost:
        # A run that just ended may still be closing its sockets: give it a few seconds.
        with contextlib.suppress(AssertionError):
            await eventually(lambda: _none(self._busy()), timeout=ADDRESS_GRACE_S, interval=0.2)
        busy = self._busy()
        if busy:
            raise TestbedError(
                f"address in use: {', '.join(busy)}. Another demo, benchmark or test is serving"
                " the benchmark pods' addresses; stop it (or wait for it) and try again."
            )
        spec = self._workdir / "pods.json"
        spec.write_text(json.dumps([c.to_json() for c in self.configs]))
        errors = self._workdir / "pods.log"
        with errors.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.gpu_sim",
                "--pods",
                str(spec),
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        except TimeoutError:
            line = b""
        if not line:
            await self.stop()
            raise TestbedError(f"the simulated pods did not start: {_tail(errors)}")
        self.urls = {p["name"]: p["url"] for p in json.loads(line)["pods"]}
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 5.0)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def stats(self) -> dict[str, SimStats]:
        return {
            name: await self._call("GET", url + "/sim/stats") for name, url in self.urls.items()
        }

    async def reset(self) -> None:
        for url in self.urls.values():
            await self._call("POST", url + "/sim/reset")

    async def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Until no pod holds a request (the clients of the last run have all gone)."""

        async def idle() -> bool:
            return all(s.running == s.waiting == 0 for s in (await self.stats()).values())

        await eventually(idle, timeout=timeout_s, interval=0.05, what="the pods to go idle")

    async def _call(self, method: str, url: str) -> SimStats:
        assert self._session is not None
        async with self._session.request(method, url) as resp:
            resp.raise_for_status()
            return SimStats.from_json(await resp.json())


async def _none(items: Sequence[object]) -> bool:
    return not items


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:]) or "(no output)"
    except OSError:
        return "(no output)"


# --- the baseline Envoy --------------------------------------------------------------

_HCM: Final = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_ROUTER: Final = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
#: Never binds: kube-proxy puts no limit on a Service's connections either.
_UNLIMITED: Final = 100_000
#: Envoy's load-balancing policy for each baseline entry.
_POLICIES: Final = MappingProxyType(
    {Entry.ROUND_ROBIN: "ROUND_ROBIN", Entry.LEAST_REQUEST: "LEAST_REQUEST"}
)


def baseline_name(entry: Entry, caller: str) -> str:
    return f"{entry.value}-{caller}"


def baseline_bootstrap(callers: Sequence[str], pods: Sequence[SimConfig]) -> dict[str, Any]:
    """A static Envoy: for each caller and each baseline policy, a listener (port 0) and a
    cluster over ``pods``, both named :func:`baseline_name`.

    No classes, no priorities, no retries, no circuit breaking and no route timeout (a
    stream may take as long as it produces tokens; the client has its own deadline).
    """
    names = [baseline_name(entry, c) for entry in _POLICIES for c in callers]
    policies = [_POLICIES[entry] for entry in _POLICIES for _ in callers]
    return {
        "node": {"id": "baseline", "cluster": "baseline"},
        "admin": {"address": _loopback_port_0()},
        "static_resources": {
            "listeners": [_static_listener(name) for name in names],
            "clusters": [_cluster(n, p, pods) for n, p in zip(names, policies, strict=True)],
        },
    }


def _loopback_port_0() -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": 0}}


def _static_listener(name: str) -> dict[str, Any]:
    route = {"match": {"prefix": "/"}, "route": {"cluster": name, "timeout": "0s"}}
    manager = {
        "@type": _HCM,
        "stat_prefix": name,
        "route_config": {
            "name": name,
            "virtual_hosts": [{"name": SERVICE, "domains": ["*"], "routes": [route]}],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
    return {"name": name, "address": _loopback_port_0(), "filter_chains": [{"filters": [hcm]}]}


def _cluster(name: str, policy: str, pods: Sequence[SimConfig]) -> dict[str, Any]:
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
        "lb_policy": policy,
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", **unlimited}]},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
    }


class StaticEnvoy(Envoy):
    """An :class:`~bench.envoy.Envoy` run on a static bootstrap instead of ADS."""

    def __init__(self, bootstrap: Mapping[str, Any], log_level: str = "warning") -> None:
        super().__init__(BootstrapOptions(node_id="baseline"), log_level=log_level)
        self.bootstrap = bootstrap

    def bootstrap_text(self) -> str:
        return yaml.safe_dump(json.loads(json.dumps(self.bootstrap)), sort_keys=False)


@contextlib.asynccontextmanager
async def running_static_envoy(bootstrap: Mapping[str, Any]) -> AsyncIterator[Envoy]:
    envoy = StaticEnvoy(bootstrap)
    try:
        yield await envoy.start()
    finally:
        await envoy.stop()


# --- the control plane ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_control_plane(
    manifests: Path, timeout_s: float, ratelimit: RateLimitSettings | None = None
) -> AsyncIterator[ControlPlane]:
    """The control plane in this process, on ``manifests``; cancelled and awaited on exit."""
    settings = ServeSettings(
        manifests=manifests,
        host="127.0.0.1",
        xds_port=0,
        admin_port=0,
        shutdown_grace=0.2,
        ratelimit=ratelimit or RateLimitSettings(),
    )
    plane = ControlPlane(settings, ManifestSource(manifests, poll_interval=0.1))
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
            raise TestbedError(f"the control plane did not start within {timeout_s} s")
        yield plane
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def sidecar_metadata(ip: str, account: str, *, gateway: bool = False) -> dict[str, str]:
    """Node metadata for a proxy at ``ip``: its identity and free ports of its own."""
    meta = {
        "NAMESPACE": NAMESPACE,
        "SERVICE_ACCOUNT": account,
        "INFERLANE_BIND_ADDRESS": ip,
        # Pods share this host's loopback: each workload listens on its own pod IP.
        "INFERLANE_WORKLOAD_ADDRESS": ip,
    }
    inbound, other = free_ports(ip, 2)
    meta["INFERLANE_INBOUND_PORT"] = str(inbound)
    meta["INFERLANE_GATEWAY_PORT" if gateway else "INFERLANE_OUTBOUND_PORT"] = str(other)
    return meta


def node_id(kind: str, ip: str, pod: str) -> str:
    return f"{kind}~{ip}~{pod}.{NAMESPACE}~{NAMESPACE}.svc.cluster.local"


async def listener_url(
    envoy: Envoy, timeout_s: float, *, port: int | None = None, name: str | None = None
) -> str:
    """The URL of the listener bound to ``port`` or called ``name``, from the admin API."""

    async def find() -> str:
        data = await envoy.admin_json("/listeners?format=json")
        for entry in data.get("listener_statuses", []):
            sock = entry.get("local_address", {}).get("socket_address", {})
            bound = int(sock.get("port_value", 0))
            if bound and port in (None, bound) and name in (None, entry.get("name")):
                return f"http://{sock.get('address', '127.0.0.1')}:{bound}"
        return ""

    return await eventually(find, timeout=timeout_s, what=f"Envoy listener {name or port}")


async def wait_routed(
    url: str,
    cls: str,
    timeout_s: float,
    what: str,
    *,
    host: str = SERVICE_HOST,
    model: str = SERVICE,
) -> None:
    """Poll until a request of ``cls`` through ``url`` to ``host`` is answered by a pod."""
    body = {"model": model, "prompt": "ready?", "max_tokens": 1}
    headers = {"Host": host, PRIORITY_HEADER: cls}
    async with aiohttp.ClientSession() as session:

        async def routed() -> bool:
            async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
                await r.read()
                return r.status == 200 and bool(r.headers.get(SERVED_BY_HEADER))

        await eventually(routed, timeout=timeout_s, interval=0.05, what=f"{what} routing")


# --- the testbed ---------------------------------------------------------------------


@dataclass(frozen=True)
class TestbedOptions:
    __test__ = False  # not a pytest test class, despite the name

    topology: Topology = dataclasses.field(default_factory=Topology)
    knobs: Knobs = dataclasses.field(default_factory=Knobs)
    #: The control plane's rate-limit runtime (adaptive limits); its defaults otherwise.
    ratelimit: RateLimitSettings | None = None
    #: How long setup (Envoys, first xDS push, first routed request) may take, seconds.
    setup_timeout_s: float = 60.0


class Testbed:
    """The running mesh. Made by :func:`running_testbed`."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, options: TestbedOptions, pods: PodHost, plane: ControlPlane) -> None:
        self.options = options
        self.pods = pods
        self.plane = plane
        self.envoys: dict[str, Envoy] = {}
        #: entry -> caller -> base URL.
        self.urls: dict[Entry, dict[str, str]] = {}

    @property
    def pids(self) -> tuple[int, ...]:
        procs = [e.proc for e in self.envoys.values()] + [self.pods.proc]
        return tuple(p.pid for p in procs if p is not None)

    async def run(
        self, scenario: Scenario, spec: LoadSpec, *, progress: bool | None = None
    ) -> RunResult:
        """Send ``spec`` through ``scenario`` from idle, reset pods.

        The load generator shares this process with the control plane, whose heap is
        large (protobuf, grpc, kubernetes): a full cyclic garbage collection would stall
        every request in flight. So the heap is collected and frozen before each run
        (``gc.freeze``), and collections during the run only look at what it allocates.
        """
        await self.pods.wait_idle()
        await self.pods.reset()
        gc.collect()
        gc.freeze()
        spec = dataclasses.replace(spec, only=scenario.only, host=SERVICE_HOST)
        lags: list[float] = []
        probe = asyncio.create_task(_probe_loop_lag(lags), name="loop-lag-probe")
        try:
            result = await run_load(spec, self.urls[scenario.entry], progress=progress)
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        return RunResult(
            scenario=scenario.name,
            knobs=self.options.knobs,
            load=result,
            pods=MappingProxyType(await self.pods.stats()),
            host_load=os.getloadavg()[0],
            loop_lag_p99_ms=percentile(lags, 99) or 0.0,
            loop_lag_max_ms=max(lags, default=0.0),
        )

    async def warm_up(self, spec: LoadSpec, entries: Sequence[Entry] = tuple(Entry)) -> None:
        """A few seconds through each entry at a light rate, thrown away: the first run
        after start-up would otherwise pay for new connections and first-time code."""
        light = dataclasses.replace(
            spec, rate_rps=spec.rate_rps / 4, duration_s=2.0, output_lengths=WARM_UP_OUTPUT
        )
        for entry in entries:
            scenario = next(s for s in SCENARIOS if s.entry is entry and s.only is None)
            await self.run(scenario, light, progress=False)


async def _probe_loop_lag(lags: list[float]) -> None:
    """Append, every LAG_PROBE_S, how many ms later than asked the loop woke up."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        await asyncio.sleep(LAG_PROBE_S)
        lags.append(max(0.0, (loop.time() - asked - LAG_PROBE_S) * 1000.0))


@contextlib.asynccontextmanager
async def running_testbed(options: TestbedOptions | None = None) -> AsyncIterator[Testbed]:
    """Start the pods, the control plane, every Envoy; stop all of them on exit, whatever
    happens."""
    opts = options or TestbedOptions()
    topo, knobs = opts.topology, opts.knobs
    envoy_binary()  # fail before anything starts if there is no envoy
    workdir = Path(tempfile.mkdtemp(prefix="inferlane-bench-"))
    try:
        manifests = topo.write_manifests(workdir / "mesh.yaml", knobs)
        configs = topo.sim_configs(knobs)
        async with contextlib.AsyncExitStack() as stack:
            pods = await PodHost(configs, workdir).start(opts.setup_timeout_s)
            stack.push_async_callback(pods.stop)
            plane = await stack.enter_async_context(
                running_control_plane(manifests, opts.setup_timeout_s, opts.ratelimit)
            )
            bed = Testbed(opts, pods, plane)
            await _start_inferlane_envoys(bed, stack, topo)
            gpu = [c for c, pod in zip(configs, topo.pods, strict=True) if pod.gpu]
            callers = [c.name for c in topo.callers]
            baseline = await stack.enter_async_context(
                running_static_envoy(baseline_bootstrap(callers, gpu))
            )
            bed.envoys["baseline"] = baseline
            for entry in (Entry.ROUND_ROBIN, Entry.LEAST_REQUEST):
                bed.urls[entry] = {
                    c: await listener_url(
                        baseline, opts.setup_timeout_s, name=baseline_name(entry, c)
                    )
                    for c in callers
                }
            for entry, urls in bed.urls.items():
                for caller, url in urls.items():
                    what = f"{caller} through {entry.value}"
                    await wait_routed(url, _some_class(topo, caller), opts.setup_timeout_s, what)
            yield bed
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise TestbedError(f"address in use: {exc}; rerun when it is free") from exc
        raise
    finally:
        gc.unfreeze()
        shutil.rmtree(workdir, ignore_errors=True)


def _some_class(topo: Topology, caller: str) -> str:
    mix = next(c.caller.mix for c in topo.callers if c.name == caller)
    return max(mix, key=lambda cls: mix[cls])


async def _start_inferlane_envoys(
    bed: Testbed, stack: contextlib.AsyncExitStack, topo: Topology
) -> None:
    """A sidecar for each pod, then each caller's sidecar (or gateway)."""
    xds = bed.plane.ports["xds"]
    for pod in topo.pods:
        meta = sidecar_metadata(pod.ip, SERVICE)
        envoy = await stack.enter_async_context(
            running_envoy(node_id("sidecar", pod.ip, pod.name), xds, metadata=meta)
        )
        bed.envoys[pod.name] = envoy
    urls: dict[str, str] = {}
    for caller in topo.callers:
        envoy, port = await _caller_envoy(stack, caller, xds)
        bed.envoys[caller.name] = envoy
        urls[caller.name] = await listener_url(envoy, bed.options.setup_timeout_s, port=port)
    bed.urls[Entry.INFERLANE] = urls


async def _caller_envoy(
    stack: contextlib.AsyncExitStack, caller: CallerPod, xds_port: int
) -> tuple[Envoy, int]:
    meta = sidecar_metadata(caller.ip, caller.service_account, gateway=caller.gateway)
    kind = "router" if caller.gateway else "sidecar"
    port_key = "INFERLANE_GATEWAY_PORT" if caller.gateway else "INFERLANE_OUTBOUND_PORT"
    envoy = await stack.enter_async_context(
        running_envoy(node_id(kind, caller.ip, f"{caller.name}-0"), xds_port, metadata=meta)
    )
    return envoy, int(meta[port_key])
