"""One worker of ``inferlane serve --workers N``: serves its share of the plaintext xDS
port's streams from snapshots its primary translated.

Started by the primary (``python -m xds_server.workers.worker``) with one end of a socket
pair. It binds the xDS port with ``SO_REUSEPORT`` (``grpc.so_reuseport``), so the kernel
hands it a share of new connections, and runs the ordinary ADS engine over a
:class:`ShippedSnapshots` source. It asks the primary whether to admit each stream, tells
it which streams are open, and answers its requests for the admin pages and metrics. When
the primary goes away, the worker stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
from typing import Any, cast

import grpc

from mesh.proxy import Proxy
from xds_server.ads import collector
from xds_server.ads.looplag import LoopLagProbe
from xds_server.ads.server import (
    SERVER_OPTIONS,
    Connection,
    Refusal,
    ServerSettings,
    StreamAuthorizer,
    XdsServer,
)
from xds_server.ads.snapshot import Bucket, Resource, Snapshot
from xds_server.workers.aggregate import families
from xds_server.workers.protocol import Channel, Shipment

log = logging.getLogger(__name__)


class ShippedSnapshots:
    """A :class:`~xds_server.ads.cache.SnapshotSource` fed by the primary's shipments.

    Streams are looked up by their proxy object (each stream's own), which the shipment
    names by stream id. Resources, groups and snapshots are kept exactly while a current
    assignment references them, as the primary's record of this worker assumes.
    """

    def __init__(self) -> None:
        self.generation = 0
        self.change_ts: float | None = None
        self._resources: dict[int, Resource] = {}
        self._groups: dict[int, tuple[str, Bucket]] = {}
        self._group_ids: dict[int, tuple[int, ...]] = {}
        self._snapshots: dict[int, Snapshot] = {}
        self._snapshot_groups: dict[int, tuple[int, ...]] = {}
        #: Stream id -> snapshot id; id(proxy) -> stream id.
        self._assign: dict[int, int] = {}
        self._streams: dict[int, int] = {}

    @property
    def ready(self) -> bool:
        return self.generation > 0

    async def snapshot_for(self, proxy: Proxy) -> Snapshot | None:
        stream = self._streams.get(id(proxy))
        sid = self._assign.get(stream) if stream is not None else None
        return self._snapshots.get(sid) if sid is not None else None

    def opened(self, conn: Connection) -> None:
        self._streams[id(conn.proxy)] = conn.id

    def closed(self, conn: Connection) -> None:
        # Its assignment stays until the next generation: the primary's record of what this
        # worker holds counts it until then.
        self._streams.pop(id(conn.proxy), None)

    def apply(self, shipment: Shipment) -> None:
        """Take in a shipment; after a generation, drop what no assignment references."""
        self._resources.update(shipment.resources)
        for gid, (type_url, rids) in shipment.groups.items():
            group = Bucket((self._resources[r].name, self._resources[r]) for r in rids)
            self._groups[gid] = (type_url, group)
            self._group_ids[gid] = rids
        for sid, gids in shipment.snapshots.items():
            resources = dict(self._groups[g] for g in gids)
            self._snapshots[sid] = Snapshot(resources, generation=shipment.generation)
            self._snapshot_groups[sid] = gids
        if shipment.complete:
            self._assign = {}
            self.generation = shipment.generation
            self.change_ts = shipment.change_ts
        elif not self.ready:
            self.generation = shipment.generation
            self.change_ts = shipment.change_ts
        self._assign.update(shipment.assign)
        if shipment.complete:
            self._prune()

    def _prune(self) -> None:
        sids = set(self._assign.values())
        gids = {g for s in sids for g in self._snapshot_groups[s]}
        rids = {r for g in gids for r in self._group_ids[g]}
        self._snapshots = {s: v for s, v in self._snapshots.items() if s in sids}
        self._snapshot_groups = {s: v for s, v in self._snapshot_groups.items() if s in sids}
        self._groups = {g: v for g, v in self._groups.items() if g in gids}
        self._group_ids = {g: v for g, v in self._group_ids.items() if g in gids}
        self._resources = {r: v for r, v in self._resources.items() if r in rids}


class _PeerContext:
    """What the primary's authorizer reads of a stream's gRPC context."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def auth_context(self) -> dict[str, list[bytes]]:
        """Workers serve the plaintext port only: no transport security."""
        return {}


def peer_context(peer: str) -> grpc.aio.ServicerContext:
    """A stand-in context for the primary's authorizer: the peer address of a plaintext
    stream, no metadata."""
    return cast(grpc.aio.ServicerContext, _PeerContext(peer))


class ForwardLogs(logging.Handler):
    """Sends this worker's log records to the primary, which writes them with its own
    handlers: one log, in the format the command was given, with each record's worker."""

    def __init__(self, index: int, outbox: asyncio.Queue[tuple[Any, ...]]) -> None:
        super().__init__()
        self.index = index
        self.outbox = outbox
        self.loop = asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        entry = {
            "name": record.name,
            "levelno": record.levelno,
            "levelname": record.levelname,
            "msg": f"[worker {self.index}] {record.getMessage()}",
            "exc_text": logging.Formatter().formatException(record.exc_info)
            if record.exc_info
            else None,
            "worker": self.index,
        }
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, ("log", entry))


class Worker:
    def __init__(self, index: int, channel: Channel, settings: ServerSettings) -> None:
        self.index = index
        self.channel = channel
        self.snapshots = ShippedSnapshots()
        self.xds = XdsServer(self.snapshots, settings=settings, authorizer=_AskPrimary(self))
        self.xds.on_stream_opened = self._opened
        self.xds.on_stream_closed = self._closed
        self.lag = LoopLagProbe(self.xds.metrics.registry, f"worker-{index}")
        self.outbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._answers: dict[int, asyncio.Future[Proxy | Refusal]] = {}
        self._requests = 0

    def _opened(self, conn: Connection) -> None:
        self.snapshots.opened(conn)
        self.outbox.put_nowait(("opened", conn.id, conn.proxy))

    def _closed(self, conn: Connection) -> None:
        self.snapshots.closed(conn)
        self.outbox.put_nowait(("closed", conn.id))

    async def admit(self, proxy: Proxy, peer: str) -> Proxy | Refusal:
        self._requests += 1
        request = self._requests
        answer: asyncio.Future[Proxy | Refusal] = asyncio.get_running_loop().create_future()
        self._answers[request] = answer
        self.outbox.put_nowait(("admit", request, proxy, peer))
        try:
            return await answer
        finally:
            self._answers.pop(request, None)

    async def _send_loop(self) -> None:
        while True:
            await self.channel.send(await self.outbox.get())

    def _answer(self, what: str) -> Any:
        conns = list(self.xds.connections.values())
        if what == "syncz":
            return [c.sync_entry() | {"worker": self.index} for c in conns]
        if what == "connections":
            return [c.describe() | {"worker": self.index} for c in conns]
        if what == "metrics":
            return families(self.xds.metrics.registry)
        raise ValueError(f"unknown request {what!r}")

    async def _receive_loop(self) -> None:
        while (message := await self.channel.receive()) is not None:
            kind = message[0]
            if kind == "push":
                shipment: Shipment = message[1]
                self.snapshots.apply(shipment)
                if shipment.complete:
                    self.xds.push_all()
                else:
                    for sid in shipment.assign:
                        conn = self.xds.connections.get(sid)
                        if conn is not None:
                            self.xds.pushes.enqueue(conn)
            elif kind == "admitted":
                future = self._answers.get(message[1])
                if future is not None and not future.done():
                    future.set_result(message[2])
            elif kind == "request":
                self.outbox.put_nowait(("reply", message[1], self._answer(message[2])))
        log.info("worker %d: the primary has gone; stopping", self.index)

    async def run(self, host: str, port: int) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", self.xds.settings.max_request_bytes),
                *SERVER_OPTIONS,
            ]
        )
        self.xds.add_to(server)
        bound = server.add_insecure_port(f"{host}:{port}")
        await server.start()
        try:
            await self.channel.send(("ready", bound))
            async with asyncio.TaskGroup() as tasks:
                sender = tasks.create_task(self._send_loop(), name="worker-send")
                lag = tasks.create_task(self.lag.run(), name="loop-lag")
                await self._receive_loop()
                sender.cancel()
                lag.cancel()
        finally:
            await server.stop(0.5)


class _AskPrimary(StreamAuthorizer):
    """Admission decided by the primary, which holds the world and the CA."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def admit(self, proxy: Proxy, context: grpc.aio.ServicerContext) -> Proxy | Refusal:
        return await self.worker.admit(proxy, context.peer())


async def _main(args: argparse.Namespace) -> None:
    sock = socket.socket(fileno=args.fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    settings = ServerSettings(
        max_concurrent_pushes=args.max_concurrent_pushes, max_request_bytes=args.max_request_bytes
    )
    worker = Worker(args.index, Channel(reader, writer), settings)
    root = logging.getLogger()
    root.handlers = [ForwardLogs(args.index, worker.outbox)]
    root.setLevel(args.log_level.upper())
    async with collector.tuned(args.gc_threshold):
        with contextlib.suppress(asyncio.CancelledError):
            await worker.run(args.host, args.port)


def main() -> None:
    p = argparse.ArgumentParser(description="a worker of inferlane serve --workers N")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--fd", type=int, required=True, help="this end of the socket pair")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--max-concurrent-pushes", type=int, default=ServerSettings.max_concurrent_pushes
    )
    p.add_argument("--max-request-bytes", type=int, default=ServerSettings.max_request_bytes)
    p.add_argument("--gc-threshold", type=int, default=0)
    p.add_argument("--log-level", default="info")
    asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    main()
