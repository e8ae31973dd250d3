"""Synthetic ADS clients that behave like Envoy: thousands of streams in one process.

Run as separate processes (``python -m bench.synthetic``), so the clients do not share the
control plane's event loop; the benchmark starts several and gives each a share of the
fleet (``--part I --parts N``). The plan file names every proxy (node ID, metadata, role,
SotW or Delta) and, per role, the names it subscribes to by type.

Each stream subscribes as Envoy does: CDS and LDS by wildcard, then EDS, RDS and SDS by
name; it ACKs every response at once. A stream that ends or fails reconnects with
Envoy's jittered exponential back-off (a random delay below 0.5 s, doubling to 30 s), and
says what it holds, as Envoy does: SotW requests carry the last acknowledged
``version_info``, Delta requests the ``initial_resource_versions`` of every resource.

Protocol, one JSON object per line. On stdout: ``{"event": "connected", ...}`` once every
stream has received each type it subscribes to. On stdin, commands: ``mark`` (forget the
responses recorded so far, answered by ``{"event": "marked"}``) and ``report`` (answered
by ``{"event": "report", "responses": [[proxy, type, monotonic time of the ACK, resources,
removed], ...]}`` with every response since the mark). End of stdin ends the process.
Timestamps are ``time.monotonic()``, one clock for every process on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from bench.fleet import FleetProxy
from mesh import xds

#: The order Envoy subscribes in.
ORDER = (xds.CLUSTER, xds.ENDPOINT, xds.LISTENER, xds.ROUTE, xds.SECRET)
#: Envoy's ADS retry back-off: jittered, base 500 ms, at most 30 s.
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0


@dataclass
class Recorder:
    """The responses seen since the last mark: (proxy, short type, ACK time, n, removed)."""

    responses: list[tuple[int, str, float, int, int]] = field(default_factory=list)
    failures: int = 0


class SyntheticStream:
    def __init__(
        self,
        proxy: FleetProxy,
        names: dict[str, list[str]],
        record: Recorder,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self.proxy = proxy
        self.backoff_max_s = backoff_max_s
        self.names = names
        self.record = record
        self.types = [t for t in ORDER if t in names]
        self.seen: set[str] = set()
        self.ready = asyncio.Event()
        #: SotW: type -> the last acknowledged version_info.
        self.versions: dict[str, str] = {}
        #: Delta: type -> name -> version held.
        self.held: dict[str, dict[str, str]] = {t: {} for t in self.types}

    def _node(self, request: Any) -> None:
        request.node.id = self.proxy.node_id
        request.node.user_agent_name = "envoy"
        request.node.metadata.update(self.proxy.metadata)

    def _sotw_subscriptions(self) -> list[discovery_pb2.DiscoveryRequest]:
        out = []
        for type_url in self.types:
            req = discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                resource_names=self.names[type_url],
                version_info=self.versions.get(type_url, ""),
            )
            out.append(req)
        self._node(out[0])
        return out

    def _delta_subscriptions(self) -> list[discovery_pb2.DeltaDiscoveryRequest]:
        out = []
        for type_url in self.types:
            req = discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url, resource_names_subscribe=self.names[type_url]
            )
            req.initial_resource_versions.update(self.held[type_url])
            out.append(req)
        self._node(out[0])
        return out

    async def run(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub) -> None:
        """Keep the stream open, reconnecting as Envoy does: full jitter, doubling."""
        attempt = 0
        while True:
            try:
                if self.proxy.delta:
                    call = stub.DeltaAggregatedResources()
                    got = await self._serve(call, self._delta_subscriptions())
                else:
                    call = stub.StreamAggregatedResources()
                    got = await self._serve(call, self._sotw_subscriptions())
            except grpc.aio.AioRpcError:
                got = False
                self.record.failures += 1
            attempt = 0 if got else attempt + 1
            cap = min(BACKOFF_BASE_S * 2**attempt, self.backoff_max_s)
            await asyncio.sleep(random.uniform(0, cap))

    def _saw(self, type_url: str, resources: int, removed: int) -> None:
        self.record.responses.append(
            (self.proxy.index, xds.short(type_url), time.monotonic(), resources, removed)
        )
        if type_url not in self.seen:
            self.seen.add(type_url)
            if len(self.seen) == len(self.types):
                self.ready.set()

    async def _serve(self, call: Any, subscriptions: list[Any]) -> bool:
        """Subscribe, then ACK every response; whether any response came."""
        for req in subscriptions:
            await call.write(req)
        got = False
        while (resp := await call.read()) is not grpc.aio.EOF:
            got = True
            await call.write(self._ack(resp))
        return got

    def _ack(self, resp: Any) -> Any:
        """The ACK of one response, after recording what it carried."""
        if self.proxy.delta:
            held = self.held.setdefault(resp.type_url, {})
            for res in resp.resources:
                held[res.name] = res.version
            for name in resp.removed_resources:
                held.pop(name, None)
            self._saw(resp.type_url, len(resp.resources), len(resp.removed_resources))
            return discovery_pb2.DeltaDiscoveryRequest(
                type_url=resp.type_url, response_nonce=resp.nonce
            )
        self.versions[resp.type_url] = resp.version_info
        self._saw(resp.type_url, len(resp.resources), 0)
        return discovery_pb2.DiscoveryRequest(
            type_url=resp.type_url,
            version_info=resp.version_info,
            response_nonce=resp.nonce,
            resource_names=self.names.get(resp.type_url, []),
        )


def load_plan(path: Path, part: int, parts: int) -> tuple[list[FleetProxy], dict[str, Any]]:
    plan = json.loads(path.read_text())
    proxies = [
        FleetProxy(i, p["node_id"], p["metadata"], p["role"], p["delta"], p["namespace"], p["pod"])
        for i, p in enumerate(plan["proxies"])
        if i % parts == part
    ]
    return proxies, plan["names"]


async def _commands(record: Recorder) -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        cmd = json.loads(line).get("cmd")
        if cmd == "mark":
            record.responses = []
            print(json.dumps({"event": "marked"}), flush=True)
        elif cmd == "report":
            reply = {"event": "report", "responses": record.responses, "failures": record.failures}
            print(json.dumps(reply), flush=True)


#: gRPC's own reconnect back-off, per connection, kept short. Envoy has none of its own
#: beyond the stream's (an ADS stream that fails is retried on a fresh connection after
#: the stream's back-off), but a gRPC channel adds one per connection: 1 s growing 1.6x to
#: 120 s, so after a control-plane restart of a few seconds the streams of a connection
#: would wait for its next attempt (tens of seconds), whatever their own back-off says.
CHANNEL_BACKOFF: list[tuple[str, object]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def _channel(target: str, tls: Path | None) -> grpc.aio.Channel:
    """A channel of its own (a connection per channel); over mutual TLS with the
    ``root.pem``, ``tls.crt`` and ``tls.key`` in ``tls``, checking the name ``inferlane``."""
    options: list[tuple[str, object]] = [("grpc.use_local_subchannel_pool", 1), *CHANNEL_BACKOFF]
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls / "root.pem").read_bytes(),
        private_key=(tls / "tls.key").read_bytes(),
        certificate_chain=(tls / "tls.crt").read_bytes(),
    )
    options.append(("grpc.ssl_target_name_override", "inferlane"))
    return grpc.aio.secure_channel(target, credentials, options=options)


async def run(args: argparse.Namespace) -> None:
    proxies, names = load_plan(args.plan, args.part, args.parts)
    record = Recorder()
    channels = [
        _channel(args.target, args.tls)
        for _ in range((len(proxies) + args.per_channel - 1) // args.per_channel)
    ]

    stubs = [ads_pb2_grpc.AggregatedDiscoveryServiceStub(c) for c in channels]
    streams = [SyntheticStream(p, names[p.role], record, args.reconnect_max) for p in proxies]
    tasks = []
    per_part_rate = args.rate / args.parts
    for i, s in enumerate(streams):
        tasks.append(asyncio.create_task(s.run(stubs[i // args.per_channel])))
        if per_part_rate > 0 and i % 50 == 49:
            await asyncio.sleep(50 / per_part_rate)
    waiting = asyncio.gather(*(s.ready.wait() for s in streams))
    while not waiting.done():
        await asyncio.wait([waiting], timeout=5)
        ready = sum(1 for s in streams if s.ready.is_set())
        print(
            f"synthetic {args.part}: {ready}/{len(streams)} ready, {record.failures} failures",
            file=sys.stderr,
        )
    print(json.dumps({"event": "connected", "streams": len(streams)}), flush=True)
    try:
        await _commands(record)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in channels:
            await c.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="HOST:PORT of the ADS server")
    p.add_argument("--plan", type=Path, required=True, help="JSON: proxies and names by role")
    p.add_argument("--part", type=int, default=0, help="this process takes every PARTS-th proxy")
    p.add_argument("--parts", type=int, default=1)
    p.add_argument("--per-channel", type=int, default=250, help="streams per HTTP/2 connection")
    p.add_argument("--rate", type=float, default=1000, help="streams opened per second, in all")
    p.add_argument(
        "--reconnect-max",
        type=float,
        default=BACKOFF_MAX_S,
        help="the reconnect back-off's cap in seconds (Envoy's: 30)",
    )
    p.add_argument(
        "--tls",
        type=Path,
        help="a directory with root.pem, tls.crt and tls.key: connect over mutual TLS",
    )
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
