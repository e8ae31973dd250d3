"""What a push costs the ADS engine per stream, without gRPC or translation.

``python -m bench.pushcost`` connects the realistic fleet's proxies (``bench.fleet``,
SotW and Delta as the fleet says) to one :class:`XdsServer` through in-process fake
streams that subscribe as ``bench.synthetic`` does (CDS and LDS by wildcard, then EDS,
RDS and SDS by name) and ACK every response. Each change (``annotation``: one Service's
timeout; ``endpoint``: one model pod turns unready) installs a generation whose snapshots
are all built before the clock starts, so what is timed is the engine's own work:

* ``push``: from ``push_all`` until every stream has written what is due (each stream's
  refresh, ``StreamState.responses``, the write path with a write that costs nothing);
* ``ack``: from handing every stream the ACKs of what it was sent until all are applied.

Both are CPU seconds of this process (``time.process_time``), reported per stream and
change in microseconds; grpc.aio's own cost of a write is not in them. The clients'
parsing of responses happens between the two clocks.

    python -m bench.pushcost --fleet 1000 --changes 5
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from bench.fleet import FleetProxy, FleetShape, build_fleet
from bench.fleetbench import plan
from bench.translation import Fleetworld
from mesh import xds
from mesh.proxy import proxy_from_node
from mtls.ca import CertificateAuthority
from mtls.secrets import SecretStore
from routing.generator import MeshGenerator
from xds_server.ads.cache import ConfigCache
from xds_server.ads.server import XdsServer

#: The order Envoy subscribes in (as ``bench.synthetic``).
ORDER = (xds.CLUSTER, xds.ENDPOINT, xds.LISTENER, xds.ROUTE, xds.SECRET)


class FakeStream:
    """A grpc.aio servicer context whose client is this object: requests are queued by
    the benchmark, responses kept until the benchmark answers them."""

    def __init__(self, proxy: FleetProxy, names: dict[str, list[str]]) -> None:
        self.proxy = proxy
        self.names = names
        self.requests: asyncio.Queue[bytes | object] = asyncio.Queue()
        self.responses: list[bytes] = []
        self.types = [t for t in ORDER if t in names]
        self.seen: set[str] = set()

    # -- the servicer context the server uses ------------------------------------------

    async def read(self) -> bytes | object:
        return await self.requests.get()

    async def write(self, payload: bytes) -> None:
        self.responses.append(payload)

    def peer(self) -> str:
        return f"ipv4:{self.proxy.pod}"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{self.proxy.node_id} aborted: {code} {details}")

    def set_code(self, code: grpc.StatusCode) -> None:
        raise RuntimeError(f"{self.proxy.node_id} ended: {code}")

    def set_details(self, details: str) -> None:
        pass

    # -- the client -------------------------------------------------------------------

    def subscribe(self) -> None:
        for i, type_url in enumerate(self.types):
            req: Any
            if self.proxy.delta:
                req = discovery_pb2.DeltaDiscoveryRequest(
                    type_url=type_url, resource_names_subscribe=self.names[type_url]
                )
            else:
                req = discovery_pb2.DiscoveryRequest(
                    type_url=type_url, resource_names=self.names[type_url]
                )
            if i == 0:
                req.node.id = self.proxy.node_id
                req.node.user_agent_name = "envoy"
                req.node.metadata.update(self.proxy.metadata)
            self.requests.put_nowait(req.SerializeToString())

    def answer(self) -> int:
        """ACK every response received since the last call; how many."""
        got, self.responses = self.responses, []
        for payload in got:
            ack: Any
            if self.proxy.delta:
                resp = discovery_pb2.DeltaDiscoveryResponse.FromString(payload)
                ack = discovery_pb2.DeltaDiscoveryRequest(
                    type_url=resp.type_url, response_nonce=resp.nonce
                )
            else:
                resp = discovery_pb2.DiscoveryResponse.FromString(payload)
                ack = discovery_pb2.DiscoveryRequest(
                    type_url=resp.type_url,
                    version_info=resp.version_info,
                    response_nonce=resp.nonce,
                    resource_names=self.names[resp.type_url],
                )
            self.seen.add(resp.type_url)
            self.requests.put_nowait(ack.SerializeToString())
        return len(got)


async def _settled(server: XdsServer, streams: list[FakeStream]) -> None:
    """Until no push is queued or running and every stream has applied every request.

    Applying requests and writing never suspend a stream here (the fake writes do not),
    so a stream whose requests and inbox are empty and whose inbox is not set is idle."""
    while True:
        await asyncio.sleep(0.001)
        queue = server.pushes
        if len(queue) or queue._active:
            continue
        if any(
            s.requests.qsize() or len(c.inbox) or c.inbox._ready.is_set()
            for s, c in _pairs(server, streams)
        ):
            continue
        return


def _pairs(server: XdsServer, streams: list[FakeStream]) -> list[tuple[FakeStream, Any]]:
    by_node = {c.proxy.node_id: c for c in server.connections.values()}
    return [(s, by_node[s.proxy.node_id]) for s in streams if s.proxy.node_id in by_node]


async def _timed(work: Callable[[], Any], settle: Callable[[], Awaitable[None]]) -> float:
    gc.collect()
    started = time.process_time()
    work()
    await settle()
    return time.process_time() - started


async def run(proxies: int, changes: int) -> None:
    fleet = build_fleet(FleetShape.scaled(proxies, adaptive=False))
    names: dict[str, dict[str, list[str]]] = (await plan(fleet))["names"]
    secrets = SecretStore(CertificateAuthority.generate())
    with tempfile.TemporaryDirectory(prefix="inferlane-pushcost-") as tmp:
        fw = Fleetworld(fleet, Path(tmp))
        generator = MeshGenerator(fw.world, {}, secrets)
        cache = ConfigCache(generator)
        server = XdsServer(cache)
        streams = [FakeStream(p, names[p.role]) for p in fleet.proxies]
        serving = [asyncio.create_task(server._serve(s, delta=s.proxy.delta)) for s in streams]
        for s in streams:
            s.subscribe()

        async def settle() -> None:
            await _settled(server, streams)

        deadline = time.monotonic() + 120
        while not all(len(s.seen) == len(s.types) for s in streams):
            assert time.monotonic() < deadline, "not every stream synced"
            await asyncio.sleep(0.05)
            for s in streams:
                s.answer()
        await settle()
        while sum(s.answer() for s in streams):
            await settle()
        print(
            f"{len(streams)} streams ({sum(s.proxy.delta for s in streams)} Delta), "
            f"synced; per stream and change, CPU microseconds:",
            flush=True,
        )
        print(f"{'scenario':<11} {'change':>6} {'push us':>9} {'ack us':>9} {'responses':>9}")
        results: dict[str, list[tuple[float, float]]] = {}
        for step in range(changes):
            for scenario, edit in (("annotation", fw.annotation), ("endpoint", fw.endpoint)):
                generator = MeshGenerator(fw.edit(edit), {}, secrets, previous=generator)
                cache.update(generator)
                for s in streams:  # every snapshot built before the clock starts
                    await cache.snapshot_for(
                        proxy_from_node(s.proxy.node_id, dict(s.proxy.metadata))
                    )
                push = await _timed(server.push_all, settle)
                responses = sum(len(s.responses) for s in streams)
                ack = await _timed(lambda: [s.answer() for s in streams], settle)
                while sum(s.answer() for s in streams):  # what the ACKs released
                    await settle()
                n = len(streams)
                results.setdefault(scenario, []).append((push / n * 1e6, ack / n * 1e6))
                print(
                    f"{scenario:<11} {step:>6} {push / n * 1e6:>9.1f} {ack / n * 1e6:>9.1f} "
                    f"{responses:>9}",
                    flush=True,
                )
        for scenario, rows in results.items():
            print(
                f"{scenario:<11} {'median':>6} {statistics.median(r[0] for r in rows):>9.1f} "
                f"{statistics.median(r[1] for r in rows):>9.1f}"
            )
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fleet", type=int, default=1000, help="proxies")
    p.add_argument("--changes", type=int, default=5, help="changes per scenario")
    a = p.parse_args()
    asyncio.run(run(a.fleet, a.changes))


if __name__ == "__main__":
    main()
