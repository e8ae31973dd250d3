"""Synthetic ADS clients: thousands of State-of-the-World streams that behave like Envoy.

Run as a separate process (``python -m bench.synthetic``) so the clients do not share the
control plane's event loop. Each stream subscribes to CDS and LDS by wildcard and to the
EDS and RDS names it is given, and ACKs every response at once, as Envoy does. Streams are
opened in a staggered way (FIELD-NOTES: opening thousands at once must be staggered).

Protocol on stdout, one JSON object per line: ``{"event": "connected", "streams": N,
"retried": K}`` once every stream has received its first response of each type (K streams
needed more than one attempt: under a 2-core overload grpcio's client fails some stream
starts, and they reconnect with backoff as Envoy would), then nothing until stdin closes,
which ends the process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from mesh import xds


def _node_id(i: int) -> str:
    ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
    return f"sidecar~{ip}~client-{i}.bench~bench.svc.cluster.local"


class SyntheticStream:
    def __init__(self, index: int, names: dict[str, list[str]]) -> None:
        self.index = index
        self.names = names
        self.seen: set[str] = set()
        self.ready = asyncio.Event()
        self.failures = 0

    def _subscriptions(self) -> list[discovery_pb2.DiscoveryRequest]:
        out = []
        for type_url in (xds.CLUSTER, xds.ENDPOINT, xds.LISTENER, xds.ROUTE):
            out.append(
                discovery_pb2.DiscoveryRequest(
                    type_url=type_url, resource_names=self.names.get(type_url, [])
                )
            )
        out[0].node.id = _node_id(self.index)
        out[0].node.user_agent_name = "envoy"
        out[0].node.metadata.update({"NAMESPACE": "bench", "SERVICE_ACCOUNT": "client"})
        return out

    async def run(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub) -> None:
        """Keep the stream open, reconnecting with jittered backoff as Envoy does."""
        delay = 0.1
        while True:
            try:
                await self._run(stub)
                return
            except grpc.aio.AioRpcError:
                self.failures += 1
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    async def _run(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub) -> None:
        call = stub.StreamAggregatedResources()
        for req in self._subscriptions():
            await call.write(req)
        while True:
            resp = await call.read()
            if resp is grpc.aio.EOF:
                return
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    type_url=resp.type_url,
                    version_info=resp.version_info,
                    response_nonce=resp.nonce,
                    resource_names=self.names.get(resp.type_url, []),
                )
            )
            self.seen.add(resp.type_url)
            if len(self.seen) == 4:
                self.ready.set()


def _channel(target: str, tls: Path | None) -> grpc.aio.Channel:
    """A channel of its own (a connection per channel); over mutual TLS with the
    ``root.pem``, ``tls.crt`` and ``tls.key`` in ``tls``, checking the name ``inferlane``."""
    options: list[tuple[str, object]] = [("grpc.use_local_subchannel_pool", 1)]
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls / "root.pem").read_bytes(),
        private_key=(tls / "tls.key").read_bytes(),
        certificate_chain=(tls / "tls.crt").read_bytes(),
    )
    options.append(("grpc.ssl_target_name_override", "inferlane"))
    return grpc.aio.secure_channel(target, credentials, options=options)


async def run(
    target: str,
    streams: int,
    per_channel: int,
    rate: float,
    names_file: str,
    *,
    tls: Path | None = None,
) -> None:
    names: dict[str, list[str]] = json.loads(Path(names_file).read_text())  # noqa: ASYNC240
    channels = [_channel(target, tls) for _ in range((streams + per_channel - 1) // per_channel)]
    stubs = [ads_pb2_grpc.AggregatedDiscoveryServiceStub(c) for c in channels]
    all_streams = [SyntheticStream(i, names) for i in range(streams)]
    tasks = []
    for i, s in enumerate(all_streams):
        tasks.append(asyncio.create_task(s.run(stubs[i // per_channel])))
        if rate > 0 and i % 100 == 99:
            await asyncio.sleep(100 / rate)
    waiting = asyncio.gather(*(s.ready.wait() for s in all_streams))
    while not waiting.done():
        await asyncio.wait([waiting], timeout=5)
        ready = sum(1 for s in all_streams if s.ready.is_set())
        failed = sum(s.failures for s in all_streams)
        print(f"synthetic: {ready}/{streams} ready, {failed} failed starts", file=sys.stderr)
        if ready > streams - 10:
            for s in all_streams:
                if not s.ready.is_set():
                    print(f"  stream {s.index} saw {sorted(s.seen)}", file=sys.stderr)
    retried = sum(1 for s in all_streams if s.failures)
    print(json.dumps({"event": "connected", "streams": streams, "retried": retried}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in channels:
        await c.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True, help="HOST:PORT of the ADS server")
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--per-channel", type=int, default=500, help="streams per HTTP/2 connection")
    p.add_argument("--rate", type=float, default=1000, help="streams opened per second")
    p.add_argument("--names", required=True, help="JSON file: type URL -> names to subscribe")
    p.add_argument(
        "--tls", type=Path, help="connect over mutual TLS with DIR's root.pem, tls.crt, tls.key"
    )
    a = p.parse_args()
    asyncio.run(run(a.target, a.streams, a.per_channel, a.rate, a.names, tls=a.tls))


if __name__ == "__main__":
    main()
