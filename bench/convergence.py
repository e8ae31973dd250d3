"""Convergence: the time from a config change until every proxy has ACKed it.

``python -m bench.convergence`` runs, one after the other:

* 10 and 50 real Envoys (``--concurrency 1``, ``--use-dynamic-base-id``, SotW ADS) on
  ``examples/cluster``, with the control plane in this process. Each change moves an
  inference Service's per-class timeout, which changes every proxy's routes; the clock
  starts when the change is installed (after the debouncer), and each proxy's ACK is
  timed by the server (the ``inferlane_xds_convergence_seconds`` path).
* The realistic fleet (``bench.fleetbench``): ``--fleet`` proxies shaped like a cluster
  (``bench.fleet``), served by ``inferlane serve --workers W`` in its own processes, for
  each ``--workers`` value side by side; each change is timed from its input (a file
  written, a signal) to each proxy's ACK, so the source and the debounce are inside.

``make bench`` runs the short form (a fleet of 1,000). The full run:

    python -m bench.convergence --envoys 10,50 --fleet 10000 --workers 1,2

The machine has 2 cores, and the proxies or synthetic clients share them with the
control plane: these are upper bounds on what a dedicated control plane would show.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import grpc

from bench.envoy import Envoy
from bench.fleetbench import HEADER as FLEET_HEADER
from bench.fleetbench import SCENARIOS, run_fleet
from bench.load import percentile
from bench.synthetic import BACKOFF_MAX_S
from bench.wait import eventually
from mesh import xds as xds_types
from mesh.manifests import load_world
from mesh.model import Priority, World
from mesh.proxy import proxy_from_node
from routing.generator import MeshGenerator
from xds_server.ads import collector
from xds_server.ads.cache import ConfigCache
from xds_server.ads.server import SERVER_OPTIONS, Connection, XdsServer
from xds_server.cli.serve import default_workers
from xds_server.sidecar.bootstrap import BootstrapOptions, TlsSettings

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster"


def rss_bytes() -> int:
    """This process's resident set size, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def changed_world(world: World, step: int) -> World:
    """The world with the first Service's critical timeout moved: every proxy's routes change."""
    first, *rest = world.services
    timeouts = dict(first.config.timeouts) | {Priority.CRITICAL: 30.0 + step}
    config = dataclasses.replace(first.config, timeouts=MappingProxyType(timeouts))
    return dataclasses.replace(world, services=(dataclasses.replace(first, config=config), *rest))


@dataclass
class Result:
    scenario: str
    proxies: int
    changes: int
    p50_ms: float
    p99_ms: float
    slowest_all_acked_ms: float
    connect_s: float
    rss_per_stream_kb: float

    def row(self) -> str:
        return (
            f"{self.scenario:<22} {self.proxies:>7} {self.changes:>7} {self.p50_ms:>9.1f} "
            f"{self.p99_ms:>9.1f} {self.slowest_all_acked_ms:>11.1f} {self.connect_s:>9.1f} "
            f"{self.rss_per_stream_kb:>12.1f}"
        )


HEADER = (
    f"{'scenario':<22} {'proxies':>7} {'changes':>7} {'p50 ms':>9} {'p99 ms':>9} "
    f"{'all ACKed ms':>11} {'connect s':>9} {'RSS KB/stream':>12}"
)


@contextlib.asynccontextmanager
async def control_plane(world: World) -> AsyncIterator[tuple[ConfigCache, XdsServer, int]]:
    cache = ConfigCache()
    xds = XdsServer(cache)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    xds.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    cache.update(MeshGenerator(world, {}))
    try:
        yield cache, xds, port
    finally:
        await server.stop(None)


#: A control plane serving a world: (cache, server, the port proxies connect to).
PlaneFactory = Callable[[World], AbstractAsyncContextManager[tuple[ConfigCache, XdsServer, int]]]


def _all_synced(xds: XdsServer, n: int) -> bool:
    if len(xds.connections) < n:
        return False
    return all(
        len(c.state.types) == 4
        and all(t.acked_version and not t.pending for t in c.state.types.values())
        for c in xds.connections.values()
    )


async def _measure_changes(
    cache: ConfigCache, xds: XdsServer, world: World, n: int, changes: int
) -> tuple[list[float], list[float]]:
    samples: list[float] = []
    slowest: list[float] = []
    acked: set[int] = set()
    done = asyncio.Event()

    def on_ack(conn: Connection, type_url: str, seconds: float | None) -> None:
        if type_url == xds_types.ROUTE and seconds is not None and conn.id not in acked:
            acked.add(conn.id)
            samples.append(seconds)
            if len(acked) >= n:
                done.set()

    xds.on_ack = on_ack
    for step in range(changes):
        acked.clear()
        done.clear()
        before = len(samples)
        started = time.monotonic()
        cache.update(MeshGenerator(changed_world(world, step + 1), {}), started)
        xds.push_all()
        await asyncio.wait_for(done.wait(), timeout=120)
        slowest.append(max(samples[before:]))
        await asyncio.sleep(0.2)  # let straggling ACKs of other types settle between changes
    return samples, slowest


async def envoy_scenario(
    world: World,
    n: int,
    changes: int,
    *,
    plane: PlaneFactory = control_plane,
    tls: TlsSettings | None = None,
    scenario: str = "real Envoy (SotW)",
) -> Result:
    """``n`` Envoys on ``plane`` (over TLS with ``tls``), then ``changes`` changes."""
    async with plane(world) as (cache, xds, port):
        gc.collect()
        base_rss = rss_bytes()
        envoys: list[Envoy] = []
        started = time.monotonic()
        try:
            for i in range(n):
                node = f"sidecar~127.0.1.{i + 1}~client-{i}.bench~bench.svc.cluster.local"
                # Every Envoy binds the default listener ports: Envoy sets SO_REUSEPORT on
                # listeners, so like sidecars in separate pods they share one config.
                meta = {"NAMESPACE": "bench", "SERVICE_ACCOUNT": "client"}
                proxy_from_node(node, meta)  # fail fast on a bad node ID
                opts = BootstrapOptions(
                    node_id=node, xds_port=port, admin_port=0, metadata=meta, tls=tls
                )
                envoys.append(await Envoy(opts, log_level="error").start())

            async def synced() -> bool:
                return _all_synced(xds, n)

            await eventually(synced, timeout=120, what=f"{n} Envoys in sync")
            connect_s = time.monotonic() - started
            gc.collect()
            per_stream = (rss_bytes() - base_rss) / n / 1024
            samples, slowest = await _measure_changes(cache, xds, world, n, changes)
        finally:
            await asyncio.gather(*(e.stop() for e in envoys))
    return _result(
        scenario,
        n=n,
        changes=changes,
        samples=samples,
        slowest=slowest,
        connect_s=connect_s,
        per_stream_kb=per_stream,
    )


#: The synthetic scenario's clients: alike client sidecars whose pods are not in the world,
#: so that every stream gets the same config.
CLIENT_NODE_ID = "sidecar~10.0.0.1~client-{}.bench~bench.svc.cluster.local"
CLIENT_METADATA = {"SERVICE_ACCOUNT": "client"}


def uniform_plan(n: int, names: dict[str, list[str]]) -> dict[str, object]:
    """A ``bench.synthetic`` plan of ``n`` alike SotW client sidecars."""
    proxies = [
        {
            "node_id": CLIENT_NODE_ID.format(i),
            "metadata": CLIENT_METADATA,
            "role": "client",
            "delta": False,
            "namespace": "bench",
            "pod": f"client-{i}",
        }
        for i in range(n)
    ]
    return {"proxies": proxies, "names": {"client": names}}


async def synthetic_scenario(
    world: World,
    n: int,
    changes: int,
    rate: float,
    *,
    plane: PlaneFactory = control_plane,
    tls_dir: Path | None = None,
    per_channel: int | None = None,
    scenario: str = "synthetic (SotW)",
) -> Result:
    """``n`` synthetic streams (over mutual TLS with the files in ``tls_dir``; ``per_channel``
    streams on each connection, bench.synthetic's default if None), then ``changes``
    changes."""
    async with plane(world) as (cache, xds, port):
        node = CLIENT_NODE_ID.format(0)
        snap = await cache.snapshot_for(proxy_from_node(node, dict(CLIENT_METADATA)))
        names = {
            xds_types.CLUSTER: [],
            xds_types.ENDPOINT: sorted(snap.of_type(xds_types.ENDPOINT)),
            xds_types.LISTENER: [],
            xds_types.ROUTE: sorted(snap.of_type(xds_types.ROUTE)),
        }
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(uniform_plan(n, names), f)
        gc.collect()
        base_rss = rss_bytes()
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.synthetic",
            "--target",
            f"127.0.0.1:{port}",
            "--plan",
            f.name,
            "--rate",
            str(rate),
            *(("--tls", str(tls_dir)) if tls_dir is not None else ()),
            *(("--per-channel", str(per_channel)) if per_channel is not None else ()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=300)
            if not line:
                raise RuntimeError("synthetic clients exited before connecting")

            async def synced() -> bool:
                return _all_synced(xds, n)

            await eventually(synced, timeout=120, what=f"{n} synthetic streams in sync")
            connect_s = time.monotonic() - started
            gc.collect()
            per_stream = (rss_bytes() - base_rss) / n / 1024
            samples, slowest = await _measure_changes(cache, xds, world, n, changes)
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), timeout=20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            Path(f.name).unlink(missing_ok=True)  # noqa: ASYNC240 - one small file
    return _result(
        scenario,
        n=n,
        changes=changes,
        samples=samples,
        slowest=slowest,
        connect_s=connect_s,
        per_stream_kb=per_stream,
    )


def _result(
    scenario: str,
    *,
    n: int,
    changes: int,
    samples: list[float],
    slowest: list[float],
    connect_s: float,
    per_stream_kb: float,
) -> Result:
    return Result(
        scenario=scenario,
        proxies=n,
        changes=changes,
        p50_ms=statistics.median(samples) * 1000,
        p99_ms=(percentile(samples, 99) or math.nan) * 1000,
        slowest_all_acked_ms=max(slowest) * 1000,
        connect_s=connect_s,
        rss_per_stream_kb=per_stream_kb,
    )


async def run(envoys: list[int], changes: int) -> list[Result]:
    world = load_world(EXAMPLE)
    if not world.services:
        raise SystemExit(f"no inference Services in {EXAMPLE}")
    results: list[Result] = []
    print(HEADER, flush=True)
    for n in envoys:
        results.append(await envoy_scenario(world, n, changes))
        print(results[-1].row(), flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--envoys", default="10,50", help="comma-separated counts of real Envoys")
    p.add_argument("--changes", type=int, default=5, help="changes measured per Envoy scenario")
    fleet = p.add_argument_group("the realistic fleet (bench.fleetbench)")
    fleet.add_argument("--fleet", default="1000", help="comma-separated fleet sizes (proxies)")
    fleet.add_argument(
        "--workers", default=f"1,{default_workers()}", help="--workers values to compare"
    )
    fleet.add_argument("--scenarios", default=",".join(SCENARIOS), help="which fleet scenarios")
    fleet.add_argument("--fleet-changes", type=int, default=3, help="changes per fleet scenario")
    fleet.add_argument("--client-processes", type=int, default=2)
    fleet.add_argument("--rate", type=float, default=2000, help="streams opened per second")
    fleet.add_argument("--timeout", type=float, default=300, help="seconds any one wait may take")
    fleet.add_argument(
        "--no-adaptive",
        action="store_true",
        help="the fleet's Services without adaptive limits (no scraping of the model pods)",
    )
    fleet.add_argument(
        "--reconnect-max",
        default=f"{BACKOFF_MAX_S:g}",
        help="comma-separated caps of the clients' reconnect back-off (s) to compare (Envoy's: 30)",
    )
    fleet.add_argument(
        "--gc-threshold",
        default=str(collector.DEFAULT_THRESHOLD),
        help="comma-separated values of inferlane serve --gc-threshold to compare "
        "(0: Python's default collector thresholds)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()

    def counts(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    out: list[dict[str, object]] = []
    envoy_results = asyncio.run(run(counts(a.envoys), a.changes))
    out += [dataclasses.asdict(r) for r in envoy_results]
    scenarios = tuple(s for s in a.scenarios.split(",") if s)
    for n in counts(a.fleet):
        print(f"\nrealistic fleet of {n} proxies (the clock starts at the input)", flush=True)
        print(FLEET_HEADER, flush=True)
        caps = [float(x) for x in a.reconnect_max.split(",") if x.strip()]
        thresholds = counts(a.gc_threshold)
        for workers in dict.fromkeys(counts(a.workers)):
            for cap, threshold in itertools.product(caps, thresholds):
                if len(caps) > 1:
                    print(f"(clients reconnect with a back-off capped at {cap:g} s)", flush=True)
                if len(thresholds) > 1:
                    print(f"(inferlane serve --gc-threshold {threshold})", flush=True)
                fleet_results = asyncio.run(
                    run_fleet(
                        n,
                        workers=workers,
                        scenarios=scenarios,
                        changes=a.fleet_changes,
                        client_processes=a.client_processes,
                        rate=a.rate,
                        timeout=a.timeout,
                        adaptive=not a.no_adaptive,
                        reconnect_max_s=cap,
                        gc_threshold=threshold,
                    )
                )
                out += [
                    {**dataclasses.asdict(r), "reconnect_max_s": cap, "gc_threshold": threshold}
                    for r in fleet_results
                ]
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
