"""The realistic fleet against ``inferlane serve``: each change timed from its input to
every affected proxy's ACK.

The control plane runs as ``inferlane serve --manifests DIR --workers W`` in its own
process tree; the fleet (``bench.fleet``) is written to DIR, and its proxies are
synthetic Envoy-like streams (``bench.synthetic``) in ``--client-processes`` processes of
their own. Scenarios, each repeated ``changes`` times:

* ``annotation``: one Service's ``inferlane.io/timeout`` changes in its manifest file
  (written atomically, as a deploy tool does). Every proxy routes to that Service, and
  its pods serve it, so every proxy's RDS changes. The clock starts when the file is
  written: the source's polling, the world rebuild and the debounce are inside.
* ``endpoint``: one model pod's Ready condition turns False in its file. Every proxy's
  EDS for that Service changes; nothing else should be sent.
* ``certs``: ``SIGUSR1`` makes the control plane replace every workload certificate at
  once (1,000 identities in the full fleet). Every proxy's SDS changes.
* ``restart``: the control plane's whole process tree is killed (SIGKILL) and started
  again on the same port; every proxy reconnects with Envoy's back-off, saying what it
  holds. Measured: the seconds from the kill until every proxy is connected and in sync
  (``/debug/syncz``), and the resources sent after the restart (the goal is none).

For the first three, per change, each proxy's latency is the time from the input to its
ACK of the first response of the scenario's type; p50 and p99 are over all (proxy,
change) samples, "all ACKed" is the slowest change's last ACK. CPU seconds per change are
the control plane's (all its processes) from the input until all ACKed. Event-loop lag
is read from ``inferlane_event_loop_lag_seconds`` over the scenario (the upper bound of
the p99's bucket, and of the highest bucket reached). Memory is the control plane's
proportional set size with every proxy connected, divided by the proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.fleet import Fleet, FleetShape, build_fleet, roles, set_ready, write_manifest
from bench.load import percentile
from bench.serving import ServeProcess, counter, cpu_seconds, histogram, pss_bytes
from bench.synthetic import BACKOFF_MAX_S
from bench.wait import eventually
from mesh import xds
from mesh.manifests import load_world
from mesh.proxy import proxy_from_node
from mtls.ca import CertificateAuthority
from mtls.secrets import SecretStore
from routing.generator import MeshGenerator
from xds_server.ads import collector
from xds_server.ads.cache import ConfigCache

SCENARIOS = ("annotation", "endpoint", "certs", "restart")
#: The type each scenario changes.
CHANGED_TYPE = {"annotation": "RDS", "endpoint": "EDS", "certs": "SDS"}
LAG = "inferlane_event_loop_lag_seconds"
#: Longest line a client process may print: a report lists every response since a mark.
REPORT_LIMIT = 1 << 30


@dataclass
class FleetResult:
    scenario: str
    workers: int
    proxies: int
    changes: int
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    all_acked_ms: float = float("nan")
    #: Responses of other types than the scenario's, per change (restart: resources sent).
    other: dict[str, float] = field(default_factory=dict)
    kb_per_proxy: float = float("nan")
    cpu_s_per_change: float = float("nan")
    lag_p99_ms: float = float("nan")
    lag_max_ms: float = float("nan")

    def row(self) -> str:
        other = ",".join(f"{t}={v:g}" for t, v in sorted(self.other.items()) if v) or "-"
        return (
            f"{self.scenario:<11} {self.workers:>3} {self.proxies:>7} {self.changes:>3} "
            f"{self.p50_ms:>9.0f} {self.p99_ms:>9.0f} {self.all_acked_ms:>10.0f} "
            f"{self.kb_per_proxy:>8.1f} {self.cpu_s_per_change:>7.2f} "
            f"{self.lag_p99_ms:>8.0f} {self.lag_max_ms:>8.0f}  {other}"
        )


HEADER = (
    f"{'scenario':<11} {'wrk':>3} {'proxies':>7} {'n':>3} {'p50 ms':>9} {'p99 ms':>9} "
    f"{'all ACK ms':>10} {'KB/prox':>8} {'CPU s':>7} {'lag p99':>8} {'lag max':>8}  "
    "also sent"
)


async def plan(fleet: Fleet) -> dict[str, Any]:
    """What the synthetic clients need: every proxy, and the names each role subscribes to
    (read from one representative's config, translated here as the control plane would)."""
    with tempfile.TemporaryDirectory() as tmp:
        fleet.write(Path(tmp))
        world = load_world(Path(tmp))
    cache = ConfigCache(MeshGenerator(world, {}, SecretStore(CertificateAuthority.generate())))
    names: dict[str, dict[str, list[str]]] = {}
    for role, proxy in roles(fleet):
        snap = await cache.snapshot_for(proxy_from_node(proxy.node_id, dict(proxy.metadata)))
        names[role] = {
            xds.CLUSTER: [],
            xds.LISTENER: [],
            xds.ENDPOINT: sorted(snap.of_type(xds.ENDPOINT)),
            xds.ROUTE: sorted(snap.of_type(xds.ROUTE)),
            xds.SECRET: sorted(snap.of_type(xds.SECRET)),
        }
    return {
        "names": names,
        "proxies": [dataclasses.asdict(p) | {"metadata": dict(p.metadata)} for p in fleet.proxies],
    }


class ClientProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.put_nowait(json.loads(line))

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while True:
                message = await self.lines.get()
                if message.get("event") == event:
                    return message

    async def command(self, cmd: str, answer: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd}).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.expect(answer, timeout=60)

    async def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self.reader.cancel()


class Clients:
    """The synthetic proxies, in several processes."""

    def __init__(self, processes: list[ClientProcess]) -> None:
        self.processes = processes

    async def mark(self) -> None:
        await asyncio.gather(*(p.command("mark", "marked") for p in self.processes))

    async def responses(self) -> list[tuple[int, str, float, int, int]]:
        replies = await asyncio.gather(*(p.command("report", "report") for p in self.processes))
        return [tuple(r) for reply in replies for r in reply["responses"]]


@contextlib.asynccontextmanager
async def synthetic_clients(
    plan_file: Path,
    target: str,
    parts: int,
    rate: float,
    timeout: float,  # noqa: ASYNC109
    *,
    reconnect_max_s: float = BACKOFF_MAX_S,
) -> AsyncIterator[Clients]:
    processes = []
    try:
        for part in range(parts):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.synthetic",
                "--target",
                target,
                "--plan",
                str(plan_file),
                "--part",
                str(part),
                "--parts",
                str(parts),
                "--rate",
                str(rate),
                "--reconnect-max",
                str(reconnect_max_s),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=REPORT_LIMIT,
            )
            processes.append(ClientProcess(proc))
        await asyncio.gather(*(p.expect("connected", timeout) for p in processes))
        yield Clients(processes)
    finally:
        await asyncio.gather(*(p.close() for p in processes))


@dataclass
class Bench:
    fleet: Fleet
    workdir: Path
    workers: int
    serve_args: list[str]
    server: ServeProcess
    clients: Clients | None = None
    step: int = 0

    @property
    def proxies(self) -> int:
        return len(self.fleet.proxies)

    async def metrics(self) -> str:
        return await self.server.get("/metrics")

    async def in_sync(self) -> bool:
        connected = sum(counter(await self.metrics(), "inferlane_xds_connected_proxies").values())
        if connected < self.proxies:
            return False
        entries = json.loads(await self.server.get("/debug/syncz"))
        return len(entries) >= self.proxies and all(
            t["status"] == "SYNCED" for e in entries for t in e["types"].values()
        )

    # -- the changes ------------------------------------------------------------------

    def change_annotation(self) -> None:
        self.step += 1
        svc = self.fleet.service(0)
        svc["metadata"]["annotations"]["inferlane.io/timeout"] = (
            f"critical=30s,sheddable={120 + self.step}s"
        )
        self._rewrite(0)

    def change_endpoint(self) -> None:
        self.step += 1
        pods = self.fleet.model_pods(0)
        set_ready(pods[self.step % len(pods)], False)
        self._rewrite(0)

    def renew_certificates(self) -> None:
        self.server.signal(signal.SIGUSR1)

    def _rewrite(self, k: int) -> None:
        write_manifest(
            self.workdir / "manifests" / self.fleet.service_file(k),
            self.fleet.files[self.fleet.service_file(k)],
        )

    # -- measurements -----------------------------------------------------------------

    async def measure(self, scenario: str, changes: int, timeout: float) -> FleetResult:  # noqa: ASYNC109
        assert self.clients is not None
        kind = CHANGED_TYPE[scenario]
        change: Callable[[], None] = {
            "annotation": self.change_annotation,
            "endpoint": self.change_endpoint,
            "certs": self.renew_certificates,
        }[scenario]
        samples: list[float] = []
        slowest: list[float] = []
        cpu: list[float] = []
        other: dict[str, float] = {}
        lag_before = histogram(await self.metrics(), LAG)
        for _ in range(changes):
            await self.clients.mark()
            pids = self.server.pids()
            cpu0 = cpu_seconds(pids)
            t0 = time.monotonic()
            change()
            first = await self._first_acks(scenario, kind, t0, timeout)
            cpu.append(cpu_seconds(pids) - cpu0)
            latencies = [at - t0 for at in first.values()]
            samples += latencies
            slowest.append(max(latencies))
            await asyncio.sleep(1.0)  # stragglers of other types, counted below
            for _proxy, type_short, _at, n, _removed in await self.clients.responses():
                if type_short != kind:
                    other[type_short] = other.get(type_short, 0) + n / changes
        lag = histogram(await self.metrics(), LAG).minus(lag_before)
        return FleetResult(
            scenario=scenario,
            workers=self.workers,
            proxies=self.proxies,
            changes=changes,
            p50_ms=statistics.median(samples) * 1000,
            p99_ms=(percentile(samples, 99) or math.nan) * 1000,
            all_acked_ms=max(slowest) * 1000,
            other={t: round(v, 1) for t, v in other.items()},
            cpu_s_per_change=statistics.mean(cpu),
            lag_p99_ms=lag.quantile(0.99) * 1000,
            lag_max_ms=lag.highest() * 1000,
        )

    async def _first_acks(
        self,
        scenario: str,
        kind: str,
        t0: float,
        timeout: float,  # noqa: ASYNC109
    ) -> dict[int, float]:
        """Each proxy's first ACK of ``kind`` after ``t0``, once every proxy has one."""
        assert self.clients is not None
        clients = self.clients
        first: dict[int, float] = {}

        async def all_acked() -> bool:
            for proxy, type_short, at, _n, _removed in await clients.responses():
                if type_short == kind and proxy not in first and at >= t0:
                    first[proxy] = at
            return len(first) >= self.proxies

        try:
            await eventually(all_acked, timeout=timeout, interval=0.25)
        except AssertionError:
            raise AssertionError(
                f"{scenario}: {len(first)} of {self.proxies} proxies ACKed a new {kind} "
                f"within {timeout} s; the control plane's log:\n{self.server.log()}"
            ) from None
        return first

    async def restart(self, timeout: float) -> FleetResult:  # noqa: ASYNC109
        assert self.clients is not None
        await self.clients.mark()
        await self.server.kill()
        t0 = time.monotonic()
        self.server = await ServeProcess(self.serve_args_fixed(), self.workdir).start()
        await eventually(
            self.in_sync, timeout=timeout, interval=0.5, what="every proxy reconnected and in sync"
        )
        took = time.monotonic() - t0
        pids = self.server.pids()
        sent = counter(await self.metrics(), "inferlane_xds_resources_sent_total")
        received = sum(n for _p, _t, _at, n, _r in await self.clients.responses())
        result = FleetResult(
            scenario="restart",
            workers=self.workers,
            proxies=self.proxies,
            changes=1,
            all_acked_ms=took * 1000,
            other={**{t: v for t, v in sent.items() if v}, "received": received},
            kb_per_proxy=pss_bytes(pids) / self.proxies / 1024,
        )
        return result

    def serve_args_fixed(self) -> list[str]:
        """The same command on the ports it bound the first time."""
        return [*self.serve_args, "--xds-port", str(self.server.ports["xds"])]


async def run_fleet(
    proxies: int,
    *,
    workers: int,
    scenarios: tuple[str, ...],
    changes: int,
    client_processes: int,
    rate: float,
    timeout: float,  # noqa: ASYNC109
    adaptive: bool = True,
    reconnect_max_s: float = BACKOFF_MAX_S,
    gc_threshold: int = collector.DEFAULT_THRESHOLD,
) -> list[FleetResult]:
    fleet = build_fleet(FleetShape.scaled(proxies, adaptive=adaptive))
    results: list[FleetResult] = []
    with tempfile.TemporaryDirectory(prefix="inferlane-fleet-") as tmp:
        workdir = Path(tmp)
        (workdir / "manifests").mkdir()
        fleet.write(workdir / "manifests")
        plan_file = workdir / "plan.json"
        plan_file.write_text(json.dumps(await plan(fleet)))
        args = [
            "--manifests", str(workdir / "manifests"),
            "--host", "127.0.0.1",
            "--admin-port", "0",
            "--xds-tls-port", "0",
            "--rls-port", "0",
            "--ca-dir", str(workdir / "ca"),
            "--workers", str(workers),
            "--gc-threshold", str(gc_threshold),
        ]  # fmt: skip
        server = await ServeProcess([*args, "--xds-port", "0"], workdir).start()
        bench = Bench(fleet, workdir, workers, args, server)
        try:
            target = f"127.0.0.1:{server.ports['xds']}"
            async with synthetic_clients(
                plan_file, target, client_processes, rate, timeout, reconnect_max_s=reconnect_max_s
            ) as clients:
                bench.clients = clients
                await eventually(
                    bench.in_sync, timeout=timeout, interval=0.5, what="every proxy in sync"
                )
                kb = pss_bytes(bench.server.pids()) / proxies / 1024
                for scenario in scenarios:
                    if scenario == "restart":
                        result = await bench.restart(timeout)
                    else:
                        result = await bench.measure(scenario, changes, timeout)
                        result.kb_per_proxy = kb
                    results.append(result)
                    print(result.row(), flush=True)
        finally:
            await bench.server.stop()
    return results
