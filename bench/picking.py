"""Endpoint choice under load: least request, queue weights, ORCA-fed weighted round robin.

``python -m bench.picking`` sends the same seeded open-loop schedule through four caller
proxies to four simulated GPU pods (``bench.gpu_sim``, Llama-3.1-8B on an A100, run
``--slowdown`` times slower so this machine keeps up), one of which is ``--slow`` times
slower still. It compares how the callers pick a pod, one scenario at a time:

- ``least-request``: inferlane without queue weights; each caller's Envoy balances on its
  own in-flight requests (LEAST_REQUEST, what a mesh gives today);
- ``queue-weights``: inferlane as shipped: the control plane scrapes each pod's
  ``vllm:num_requests_waiting`` and sets its EDS weight in every caller
  (``routing.endpoints.queue_weight``), on top of least request;
- ``orca-wrr``: Envoy's ``client_side_weighted_round_robin`` fed by the ORCA reports the
  pods send when asked (``endpoint-load-metrics-format: JSON``), as vLLM sends them;
- ``round-robin``: a Kubernetes Service (no weights, no in-flight counts).

Every scenario gets the same pods (reset and idle before it starts) and ``--callers``
caller proxies; arrivals go to the callers in turn, ``--critical-share`` of them critical and
the rest sheddable (through inferlane, each class has its own cluster, whose least-request
counts see only that class's requests). Requests are not streamed, so every pod
sends its ORCA report (vLLM sends none on streams): the most ORCA can get. The figure
that matters is the end-to-end p99 against ``least-request`` at the same load; goodput
(tokens/s delivered, against the pool's capacity) shows whether a choice idles a pod.

Everything shares this machine's cores: figures are indicative, and the slowdown keeps
the simulated pods' time, not this machine's, the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import yaml

from bench.envoy import Envoy, EnvoyMissing, envoy_binary
from bench.gpu_sim import (
    SERVED_BY_HEADER,
    RunningSim,
    SimConfig,
    saturated_throughput,
    start_sim,
)
from bench.testbed import (
    free_port,
    node_id,
    running_control_plane,
    running_static_envoy,
    sidecar_metadata,
    wait_routed,
)
from bench.topology import SERVICE_HOST, SERVICE_PORT
from bench.wait import eventually
from xds_server.rls.runtime import RateLimitSettings
from xds_server.sidecar.bootstrap import BootstrapOptions

log = logging.getLogger(__name__)

SCENARIOS: Final = ("least-request", "queue-weights", "orca-wrr", "round-robin")
BASELINE: Final = "least-request"
#: Loopback addresses of the bench's pods and callers (apart from the tests' and demo's).
POD_IPS: Final = tuple(f"127.0.201.{i}" for i in range(1, 5))
#: Callers get 127.0.201.11 and up.
FIRST_CALLER: Final = 11
HOST: Final = f"{SERVICE_HOST}:{SERVICE_PORT}"
_CSWRR: Final = (
    "type.googleapis.com/envoy.extensions.load_balancing_policies."
    "client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin"
)
_HCM: Final = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
_ROUTER: Final = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


@dataclass(frozen=True)
class PickingOptions:
    load: float = 0.9
    duration_s: float = 20.0
    #: How much slower than the others the slow pod is.
    slow: float = 2.0
    #: Every pod runs this many times slower than the calibrated model.
    slowdown: float = 4.0
    prompt_tokens: int = 256
    output_tokens: int = 64
    max_num_seqs: int = 16
    seed: int = 7
    #: Share of requests sent as critical (the rest are sheddable). Each class has its own
    #: cluster, whose least-request counts see only that class's requests.
    critical_share: float = 0.3
    #: Caller proxies; arrivals go to them in turn. The more callers, the fewer of its
    #: requests each one sees in flight, and the less its least-request choice knows.
    callers: int = 4
    scenarios: tuple[str, ...] = SCENARIOS
    #: Seconds a request may take before it counts as failed.
    deadline_s: float = 60.0


@dataclass(frozen=True)
class Outcome:
    latency_s: float
    ok: bool
    pod: str
    tokens: int
    priority: str


def caller_ips(count: int) -> tuple[str, ...]:
    return tuple(f"127.0.201.{FIRST_CALLER + i}" for i in range(count))


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    outcomes: tuple[Outcome, ...]
    #: Tokens the pods generated while arrivals lasted, per second (read from the pods).
    goodput: float

    def percentile(self, q: float, priority: str | None = None) -> float:
        """Latency at ``q`` over every request (of ``priority``, if given); a failed one
        counts as the deadline."""
        values = sorted(
            o.latency_s for o in self.outcomes if priority is None or o.priority == priority
        )
        if not values:
            return math.nan
        return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]

    @property
    def ok_share(self) -> float:
        return sum(o.ok for o in self.outcomes) / max(1, len(self.outcomes))

    def pod_share(self, pod: str) -> float:
        return sum(o.pod == pod for o in self.outcomes) / max(1, len(self.outcomes))


def pods(opts: PickingOptions) -> list[SimConfig]:
    """Four GPU pods; the last one ``opts.slow`` times slower."""
    return [
        SimConfig.gpu_pod(
            f"gpu-{i}",
            ip,
            max_num_seqs=opts.max_num_seqs,
            slowdown=opts.slowdown * (opts.slow if i == len(POD_IPS) - 1 else 1.0),
        )
        for i, ip in enumerate(POD_IPS)
    ]


def capacity(configs: Sequence[SimConfig], opts: PickingOptions) -> tuple[float, float]:
    """(requests/s, tokens/s) the pool completes with every queue full."""
    lengths = (opts.prompt_tokens, opts.output_tokens)
    each = [saturated_throughput(c, itertools.repeat(lengths)) for c in configs]
    return sum(t.requests_per_s for t in each), sum(t.tokens_per_s for t in each)


def schedule(rate: float, seconds: float, seed: int) -> list[float]:
    """Poisson arrival times over ``seconds`` (seeded: the same for every scenario)."""
    rng = random.Random(seed)
    times: list[float] = []
    now = 0.0
    while True:
        now += rng.expovariate(rate)
        if now >= seconds:
            return times
        times.append(now)


# --- the two kinds of callers -------------------------------------------------------


def manifests(sims: Sequence[RunningSim], callers: Sequence[str]) -> list[dict[str, Any]]:
    """llama over the pods, and a client pod per caller, as ``kubectl get -o yaml``."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "llama",
            "namespace": "default",
            "annotations": {"inferlane.io/enabled": "true"},
        },
        "spec": {
            "selector": {"app": "llama"},
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http"}],
        },
    }

    def pod(name: str, ip: str, app: str, port: int | None) -> dict[str, Any]:
        container: dict[str, Any] = {"name": "main", "image": "example.com/app:1"}
        if port is not None:
            container["ports"] = [{"name": "http", "containerPort": port}]
            container["resources"] = {"limits": {"nvidia.com/gpu": 1}}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
            "spec": {"containers": [container], "serviceAccountName": app},
            "status": {
                "phase": "Running",
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }

    return [
        service,
        *(pod(s.name, s.config.host, "llama", s.port) for s in sims),
        *(pod(f"client-{i}", ip, "client", None) for i, ip in enumerate(callers)),
    ]


def static_bootstrap(
    ip: str, port: int, sims: Sequence[RunningSim], *, orca: bool
) -> dict[str, Any]:
    """A caller's listener on ``ip:port`` balancing over ``sims``: round robin, or ORCA
    weighted round robin (asking every pod for its report)."""
    route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": "pool"}}
    cluster: dict[str, Any] = {
        "name": "pool",
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": "pool",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": s.config.host,
                                        "port_value": s.port,
                                    }
                                }
                            }
                        }
                        for s in sims
                    ]
                }
            ],
        },
        "circuit_breakers": {
            "thresholds": [{"max_requests": 100000, "max_pending_requests": 100000}]
        },
    }
    if orca:
        route["request_headers_to_add"] = [
            {"header": {"key": "endpoint-load-metrics-format", "value": "JSON"}}
        ]
        policy = {
            "@type": _CSWRR,
            "blackout_period": "1s",
            "weight_update_period": "0.5s",
            "metric_names_for_computing_utilization": [
                "named_metrics.kv_cache_usage_perc",
                "named_metrics.num_requests_waiting",
            ],
        }
        cluster["load_balancing_policy"] = {
            "policies": [{"typed_extension_config": {"name": "cswrr", "typed_config": policy}}]
        }
    manager = {
        "@type": _HCM,
        "stat_prefix": "caller",
        "route_config": {"virtual_hosts": [{"name": "llama", "domains": ["*"], "routes": [route]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "caller",
                    "address": {"socket_address": {"address": ip, "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster],
        },
    }


@contextlib.asynccontextmanager
async def static_callers(
    sims: Sequence[RunningSim], callers: Sequence[str], *, orca: bool
) -> AsyncIterator[list[str]]:
    """A static Envoy per caller address; yields their URLs."""
    async with contextlib.AsyncExitStack() as stack:
        urls = []
        for ip in callers:
            port = free_port(ip)
            bootstrap = static_bootstrap(ip, port, sims, orca=orca)
            await stack.enter_async_context(running_static_envoy(bootstrap))
            urls.append(f"http://{ip}:{port}")
        yield urls


@contextlib.asynccontextmanager
async def inferlane_callers(
    sims: Sequence[RunningSim], callers: Sequence[str], workdir: Path, *, queue_weights: bool
) -> AsyncIterator[list[str]]:
    """The control plane and a sidecar per caller address; yields their outbound URLs."""
    manifest = workdir / "mesh.yaml"
    document = {"apiVersion": "v1", "kind": "List", "items": manifests(sims, callers)}
    manifest.write_text(yaml.safe_dump(document, sort_keys=False))
    ratelimit = RateLimitSettings(queue_weights=queue_weights, scrape_interval_s=0.5)
    async with (
        running_control_plane(manifest, 20, ratelimit) as plane,
        contextlib.AsyncExitStack() as stack,
    ):
        urls = []
        for i, ip in enumerate(callers):
            metadata = sidecar_metadata(ip, "client")
            opts = BootstrapOptions(
                node_id=node_id("sidecar", ip, f"client-{i}"),
                xds_port=plane.ports["xds"],
                admin_port=0,
                metadata=metadata,
            )
            await stack.enter_async_context(_running(Envoy(opts)))
            urls.append(f"http://{ip}:{metadata['INFERLANE_OUTBOUND_PORT']}")
        yield urls


@contextlib.asynccontextmanager
async def _running(envoy: Envoy) -> AsyncIterator[Envoy]:
    try:
        yield await envoy.start()
    finally:
        await envoy.stop()


# --- load ---------------------------------------------------------------------------


async def _one(
    session: aiohttp.ClientSession, url: str, opts: PickingOptions, prompt: str, priority: str
) -> Outcome:
    loop = asyncio.get_running_loop()
    started = loop.time()
    body = {"model": "llama", "prompt": prompt, "max_tokens": opts.output_tokens}
    headers = {"Host": HOST, "x-inference-priority": priority}
    try:
        async with session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
            data = await resp.json(content_type=None)
            ok = resp.status == 200
            tokens = int(data["usage"]["completion_tokens"]) if ok else 0
            pod = resp.headers.get(SERVED_BY_HEADER, "")
            return Outcome(loop.time() - started, ok, pod, tokens, priority)
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError):
        return Outcome(opts.deadline_s, False, "", 0, priority)


async def _ready(urls: Sequence[str]) -> None:
    for url in urls:
        await wait_routed(url, "critical", 30, url)


async def _idle(sims: Sequence[RunningSim]) -> None:
    async def idle() -> bool:
        return all(s.scheduler.idle for s in sims)

    await eventually(idle, timeout=120, what="the pods idle")
    for sim in sims:
        sim.reset()


async def drive(
    urls: Sequence[str],
    arrivals: Sequence[float],
    opts: PickingOptions,
    sims: Sequence[RunningSim],
) -> ScenarioResult:
    """Send ``arrivals`` open-loop, to the callers in turn; wait for every answer."""
    prompt = " ".join(["word"] * opts.prompt_tokens)
    timeout = aiohttp.ClientTimeout(total=opts.deadline_s)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        loop = asyncio.get_running_loop()
        rng = random.Random(opts.seed + 1)
        classes = [
            "critical" if rng.random() < opts.critical_share else "sheddable" for _ in arrivals
        ]
        start, wall = loop.time(), time.time()
        tasks = []
        for i, at in enumerate(arrivals):
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            url = urls[i % len(urls)]
            tasks.append(asyncio.create_task(_one(session, url, opts, prompt, classes[i])))
        outcomes = await asyncio.gather(*tasks)
    end = wall + opts.duration_s
    tokens = sum(s.stats().tokens_between(wall, end) for s in sims)
    return ScenarioResult("", tuple(outcomes), tokens / opts.duration_s)


async def run(opts: PickingOptions) -> tuple[list[ScenarioResult], float, float]:
    """Every scenario on the same pods and schedule: (results, capacity req/s, tok/s)."""
    envoy_binary()
    configs = pods(opts)
    rps, tps = capacity(configs, opts)
    arrivals = schedule(opts.load * rps, opts.duration_s, opts.seed)
    results = []
    async with contextlib.AsyncExitStack() as stack:
        sims = [await stack.enter_async_context(await start_sim(c)) for c in configs]
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="picking-")))
        ips = caller_ips(opts.callers)
        for name in opts.scenarios:
            if name in ("least-request", "queue-weights"):
                callers = inferlane_callers(
                    sims, ips, workdir, queue_weights=name == "queue-weights"
                )
            else:
                callers = static_callers(sims, ips, orca=name == "orca-wrr")
            async with callers as urls:
                await _ready(urls)
                await _idle(sims)
                log.info("scenario %s: %d requests", name, len(arrivals))
                result = await drive(urls, arrivals, opts, sims)
            results.append(dataclasses.replace(result, name=name))
    return results, rps, tps


def format_report(
    results: Sequence[ScenarioResult], rps: float, tps: float, opts: PickingOptions
) -> str:
    base = next((r for r in results if r.name == BASELINE), None)
    slow_pod = f"gpu-{len(POD_IPS) - 1}"
    lines = [
        f"load {opts.load:g}x of {rps:.2f} requests/s ({tps:.0f} tokens/s); "
        f"{opts.duration_s:g} s of arrivals; {opts.callers} callers; gpu-3 {opts.slow:g}x "
        f"slower; slowdown {opts.slowdown:g}",
        "",
        "| scenario | p50 | p99 | p99 vs least-request | critical p99 | vs least-request "
        "| ok | goodput (of capacity) | to the slow pod |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = r.percentile(0.99) / base.percentile(0.99) if base else math.nan
        critical = r.percentile(0.99, "critical")
        critical_ratio = critical / base.percentile(0.99, "critical") if base else math.nan
        lines.append(
            f"| {r.name} | {r.percentile(0.5):.2f} s | {r.percentile(0.99):.2f} s | "
            f"{ratio:.2f}x | {critical:.2f} s | {critical_ratio:.2f}x | "
            f"{100 * r.ok_share:.0f} % | {r.goodput:.0f} tok/s "
            f"({100 * r.goodput / tps:.0f} %) | {100 * r.pod_share(slow_pod):.0f} % |"
        )
    shares = {r.name: Counter(o.pod for o in r.outcomes) for r in results}
    lines += [
        "",
        "requests per pod: " + json.dumps({k: dict(sorted(v.items())) for k, v in shares.items()}),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.picking", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--load", type=float, default=PickingOptions.load)
    parser.add_argument("--duration", type=float, default=PickingOptions.duration_s)
    parser.add_argument("--slow", type=float, default=PickingOptions.slow)
    parser.add_argument("--slowdown", type=float, default=PickingOptions.slowdown)
    parser.add_argument("--seed", type=int, default=PickingOptions.seed)
    parser.add_argument("--callers", type=int, default=PickingOptions.callers)
    parser.add_argument("--critical-share", type=float, default=PickingOptions.critical_share)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args(argv)
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    unknown = set(scenarios) - set(SCENARIOS)
    bad = args.load <= 0 or args.duration <= 0 or args.slow < 1 or args.slowdown <= 0
    bad = bad or not 0 <= args.critical_share <= 1
    if unknown or bad or not 1 <= args.callers <= 200:
        parser.error(f"bad options (unknown scenarios: {sorted(unknown)})")
    opts = PickingOptions(
        load=args.load,
        duration_s=args.duration,
        slow=args.slow,
        slowdown=args.slowdown,
        seed=args.seed,
        callers=args.callers,
        critical_share=args.critical_share,
        scenarios=scenarios,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("xds_server").setLevel(logging.WARNING)
    try:
        results, rps, tps = asyncio.run(run(opts))
    except EnvoyMissing as exc:
        print(f"bench.picking: {exc}", file=sys.stderr)
        return 2
    print(format_report(results, rps, tps, opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
