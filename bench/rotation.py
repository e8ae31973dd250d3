"""How long rotating every proxy's certificate takes, until every proxy has ACKed it, and
how late the event loop runs meanwhile.

The control plane runs in this process on a fixed world: ``--streams`` pods in namespace
``bench``, spread over ``--identities`` service accounts, and one inference Service. A
child process (``python -m bench.rotation --clients ...``) opens that many State-of-the-
World ADS streams that behave like Envoy sidecars: CDS and LDS by wildcard, EDS and RDS by
name, SDS for ``default`` and ``ROOTCA``, and an ACK for every response. Streams are opened
in a staggered way, as in ``bench/synthetic.py``.

Each round replaces every certificate at once (``SecretStore.rotate_all``: one renewal
pass that signs a new certificate per identity) and measures until every stream has ACKed
an SDS version it did not hold before. That covers the signing, the debounce, the
per-identity snapshots, the pushes and the ACKs. The proxies' other resources are
unchanged, so only SDS is sent.

Meanwhile a probe task sleeps 1 ms at a time and records how late it wakes: the event
loop's lag, which every other stream's ACKs, every health check and every admin request
wait as well. Each ``--modes`` entry runs the whole benchmark with its own control plane:
``worker`` signs, translates and serializes on the control plane's worker thread (the
default), ``loop`` does it all on the event loop (as before that thread existed), so the
two are compared side by side in one run.

    python -m bench.rotation --streams 1000 --identities 1000 --rounds 5

prints one JSON object. Client and server share this machine's cores, so the figures are
upper bounds for the control plane's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from bench.load import percentile
from mesh import xds
from mesh.model import (
    PRIORITIES,
    Endpoint,
    InferenceService,
    ServiceConfig,
    ServicePort,
    Workload,
    World,
)
from mesh.sources import Publish
from mtls.sds import SECRET_NAMES
from routing import names
from xds_server.ads.debounce import DebounceSettings
from xds_server.ads.server import Connection
from xds_server.app import ControlPlane, ServeSettings

NAMESPACE = "bench"
SERVICE = "llama"
PORT = 8000


def node_id(i: int) -> str:
    ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
    return f"sidecar~{ip}~client-{i}.{NAMESPACE}~{NAMESPACE}.svc.cluster.local"


def bench_world(streams: int, identities: int) -> World:
    """``streams`` client pods over ``identities`` service accounts, and one Service."""
    workloads = {
        (NAMESPACE, f"client-{i}"): Workload(
            namespace=NAMESPACE, name=f"client-{i}", service_account=f"sa-{i % identities}"
        )
        for i in range(streams)
    }
    svc = InferenceService(
        namespace=NAMESPACE,
        name=SERVICE,
        ports=(ServicePort(port=PORT, name="http", target_port=PORT),),
        config=ServiceConfig(enabled=True),
        endpoints=(Endpoint(address="10.200.0.1", port=PORT, service_port=PORT, gpu=True),),
    )
    return World(services=(svc,), workloads=MappingProxyType(workloads))


def subscriptions() -> dict[str, list[str]]:
    """What each synthetic proxy asks for by name (CDS and LDS are wildcard)."""
    host = f"{SERVICE}.{NAMESPACE}.svc.cluster.local"
    return {
        xds.CLUSTER: [],
        xds.LISTENER: [],
        xds.ENDPOINT: [names.outbound_cluster(PORT, p, host) for p in PRIORITIES],
        xds.ROUTE: [names.INBOUND_ROUTE, names.OUTBOUND_ROUTE],
        xds.SECRET: sorted(SECRET_NAMES),
    }


class StaticSource:
    """Publishes one world, then waits."""

    def __init__(self, world: World) -> None:
        self.world = world

    async def run(self, publish: Publish) -> None:
        publish(self.world)
        await asyncio.Event().wait()


# --------------------------------------------------------------------------- the clients


class SyntheticProxy:
    """One ADS stream that subscribes like an Envoy sidecar and ACKs everything."""

    def __init__(self, index: int, wanted: Mapping[str, list[str]]) -> None:
        self.index = index
        self.wanted = wanted
        self.outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self.seen: set[str] = set()
        self.ready = asyncio.Event()

    async def requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        for position, (type_url, wanted) in enumerate(self.wanted.items()):
            request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=wanted)
            if position == 0:
                request.node.id = node_id(self.index)
                request.node.user_agent_name = "envoy"
                request.node.metadata.update({"NAMESPACE": NAMESPACE})
            yield request
        while (item := await self.outbox.get()) is not None:
            yield item

    async def run(self, stub: Any) -> None:
        async for response in stub.StreamAggregatedResources(self.requests()):
            self.outbox.put_nowait(
                discovery_pb2.DiscoveryRequest(
                    type_url=response.type_url,
                    version_info=response.version_info,
                    response_nonce=response.nonce,
                    resource_names=self.wanted.get(response.type_url, []),
                )
            )
            self.seen.add(response.type_url)
            if len(self.seen) == len(self.wanted):
                self.ready.set()


async def run_clients(target: str, streams: int, per_channel: int, rate: float) -> None:
    wanted = subscriptions()
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range((streams + per_channel - 1) // per_channel)
    ]
    stubs = [ads_pb2_grpc.AggregatedDiscoveryServiceStub(c) for c in channels]
    proxies = [SyntheticProxy(i, wanted) for i in range(streams)]
    tasks = []
    for i, proxy in enumerate(proxies):
        tasks.append(asyncio.create_task(proxy.run(stubs[i // per_channel])))
        if rate > 0 and i % 100 == 99:
            await asyncio.sleep(100 / rate)
    await asyncio.gather(*(p.ready.wait() for p in proxies))
    print(json.dumps({"event": "connected", "streams": streams}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for proxy in proxies:
        proxy.outbox.put_nowait(None)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()


# --------------------------------------------------------------------------- the server side


class AckTracker:
    """Counts streams whose SDS ACK moved past the version they held at the start."""

    def __init__(self, plane: ControlPlane, expected: int) -> None:
        self.plane = plane
        self.expected = expected
        self.baseline: dict[int, str] = {}
        self.done: set[int] = set()
        self.all_acked = asyncio.Event()
        plane.xds.on_ack = self.on_ack

    def _acked(self, conn: Connection) -> str:
        state = conn.state.types.get(xds.SECRET)
        return state.acked_version if state is not None else ""

    def start(self) -> None:
        self.baseline = {c.id: self._acked(c) for c in self.plane.xds.connections.values()}
        self.done = set()
        self.all_acked.clear()

    def on_ack(self, conn: Connection, type_url: str, _seconds: float | None) -> None:
        if type_url != xds.SECRET or conn.id not in self.baseline:
            return
        if self._acked(conn) != self.baseline[conn.id]:
            self.done.add(conn.id)
            if len(self.done) >= self.expected:
                self.all_acked.set()


async def _all_have_secrets(plane: ControlPlane, streams: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while True:
        acked = [
            c
            for c in plane.xds.connections.values()
            if (s := c.state.types.get(xds.SECRET)) is not None and s.acked_version
        ]
        if len(acked) >= streams:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(acked)} of {streams} streams hold secrets")
        await asyncio.sleep(0.05)


class LoopLag:
    """How late the event loop wakes a task that sleeps ``interval`` seconds, recorded
    while ``recording`` is set. While the loop runs something else (signing, translating,
    serializing), everything it serves waits that long."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.recording = False
        self.samples: list[float] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.interval)
            if self.recording:
                self.samples.append(loop.time() - started - self.interval)

    def summary(self) -> dict[str, float]:
        ms = [s * 1000 for s in self.samples]
        return {
            "lag_p50_ms": round(percentile(ms, 50) or 0.0, 2),
            "lag_p99_ms": round(percentile(ms, 99) or 0.0, 2),
            "lag_max_ms": round(max(ms, default=0.0), 2),
        }


async def measure(args: argparse.Namespace, worker_thread: bool) -> dict[str, Any]:
    settings = ServeSettings(
        host="127.0.0.1",
        xds_port=0,
        admin_port=0,
        debounce=DebounceSettings(quiet=args.debounce_quiet, max_delay=args.debounce_max),
        shutdown_grace=0.2,
        worker_thread=worker_thread,
    )
    plane = ControlPlane(settings, StaticSource(bench_world(args.streams, args.identities)))
    serving = asyncio.create_task(plane.run(), name="control-plane")
    lag = LoopLag()
    probe = asyncio.create_task(lag.run(), name="loop-lag-probe")
    client: asyncio.subprocess.Process | None = None
    try:
        while not plane.started.is_set():
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.rotation",
            "--clients",
            "--target",
            f"127.0.0.1:{plane.ports['xds']}",
            "--streams",
            str(args.streams),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert client.stdout is not None
        started = time.monotonic()
        line = await asyncio.wait_for(client.stdout.readline(), timeout=args.connect_timeout)
        if not line:
            raise RuntimeError("the client process ended before connecting")
        await _all_have_secrets(plane, args.streams, args.connect_timeout)
        connect_s = time.monotonic() - started
        assert plane.secrets is not None
        tracker = AckTracker(plane, args.streams)
        rounds: list[float] = []
        for _ in range(args.rounds):
            await asyncio.sleep(args.pause)
            tracker.start()
            began = time.monotonic()
            lag.recording = True
            await plane.secrets.rotate_all()
            await asyncio.wait_for(tracker.all_acked.wait(), timeout=args.round_timeout)
            lag.recording = False
            rounds.append(time.monotonic() - began)
        return {
            "mode": "worker" if worker_thread else "loop",
            "connect_s": round(connect_s, 3),
            "rounds_s": [round(r, 3) for r in rounds],
            "median_s": round(statistics.median(rounds), 3),
            "max_s": round(max(rounds), 3),
            **lag.summary(),
        }
    finally:
        probe.cancel()
        if client is not None:
            if client.stdin is not None:
                client.stdin.close()
            try:
                await asyncio.wait_for(client.wait(), timeout=10)
            except TimeoutError:
                client.kill()
                await client.wait()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


async def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Every mode in turn, on the same world and clients; the ratio of lag p99 between
    the loop and the worker, when both ran."""
    modes = {m: await measure(args, worker_thread=m == "worker") for m in args.modes}
    result: dict[str, Any] = {
        "bench": "rotation",
        "streams": args.streams,
        "identities": args.identities,
        "certificates_per_round": args.identities,
        "debounce_quiet_s": args.debounce_quiet,
        "modes": modes,
        "goal_s": 5.0,
        "met_goal": all(m["max_s"] < 5.0 for m in modes.values()),
    }
    if {"loop", "worker"} <= modes.keys() and modes["worker"]["lag_p99_ms"] > 0:
        ratio = modes["loop"]["lag_p99_ms"] / modes["worker"]["lag_p99_ms"]
        result["lag_p99_loop_over_worker"] = round(ratio, 1)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--identities", type=int, default=1000, help="service accounts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between rounds")
    parser.add_argument("--debounce-quiet", type=float, default=0.1)
    parser.add_argument("--debounce-max", type=float, default=1.0)
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument("--round-timeout", type=float, default=60.0)
    parser.add_argument(
        "--modes",
        type=lambda text: [m for m in text.split(",") if m],
        default=["worker", "loop"],
        help="comma-separated: worker (heavy work on the worker thread), loop (on the loop)",
    )
    parser.add_argument("--out", type=Path, help="also write the result JSON here")
    clients = parser.add_argument_group("client process")
    clients.add_argument("--clients", action="store_true", help=argparse.SUPPRESS)
    clients.add_argument("--target", help=argparse.SUPPRESS)
    clients.add_argument("--per-channel", type=int, default=500, help=argparse.SUPPRESS)
    clients.add_argument("--rate", type=float, default=2000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clients:
        asyncio.run(run_clients(args.target, args.streams, args.per_channel, args.rate))
        return
    unknown = set(args.modes) - {"worker", "loop"}
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    result = asyncio.run(compare(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
