"""The primary's side of ``inferlane serve --workers N``: start the workers, ship them
snapshots, and see their streams as the control plane's own.

The hub reserves the xDS port (a socket bound with ``SO_REUSEPORT`` that never listens, so
the port stays this control plane's even while every worker restarts), starts N workers
that listen on it, and restarts any that dies; its streams reconnect to the others
meanwhile, which hold the same snapshots, so nothing is re-sent.

Shipping: every generation, each worker gets its streams' snapshots. Resources, per-type
groups of resources and snapshots are numbered once (:class:`Catalog`), and a worker is
sent only the numbers it does not hold yet, so a generation that changes one route sends
that route and small tables, not ten thousand snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mesh.proxy import Proxy, ProxyKind
from xds_server.ads.cache import ConfigCache, GenerationError
from xds_server.ads.server import Refusal, ServerSettings, StreamAuthorizer
from xds_server.ads.snapshot import Bucket, Resource, Snapshot
from xds_server.workers.aggregate import SummedMetrics, registry_of
from xds_server.workers.protocol import Channel, Shipment
from xds_server.workers.worker import peer_context

log = logging.getLogger(__name__)

#: Seconds before a worker that died is started again.
RESTART_DELAY_S = 0.5
#: Seconds a worker gets to answer a request from the admin.
REQUEST_TIMEOUT_S = 10.0


class Catalog:
    """Numbers for resources, per-type groups and snapshots, shared by every worker."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.resources: dict[int, Resource] = {}
        self._rid: dict[tuple[str, str, str], int] = {}
        self.groups: dict[int, tuple[str, tuple[int, ...]]] = {}
        self._gid: dict[tuple[str, tuple[int, ...]], int] = {}
        self.snapshots: dict[int, tuple[int, ...]] = {}
        self._sid: dict[tuple[int, ...], int] = {}
        #: This generation's snapshot objects -> their number (the objects are kept, so
        #: their ids stay theirs).
        self._of: dict[int, tuple[int, Snapshot]] = {}
        #: Buckets -> their group's number: snapshots share buckets (within a generation
        #: and across), so a group is numbered once, not once per snapshot.
        self._bucket_gids: dict[int, tuple[Bucket, int]] = {}
        self._generation = -1

    def sid(self, snapshot: Snapshot, generation: int) -> int:
        if generation != self._generation:
            self._of = {}
            self._generation = generation
        found = self._of.get(id(snapshot))
        if found is not None:
            return found[0]
        gids = [
            self._group(type_url, bucket) for type_url, bucket in sorted(snapshot.resources.items())
        ]
        key = tuple(gids)
        sid = self._sid.get(key)
        if sid is None:
            sid = self._sid[key] = next(self._ids)
            self.snapshots[sid] = key
        self._of[id(snapshot)] = (sid, snapshot)
        return sid

    def _group(self, type_url: str, bucket: Bucket) -> int:
        known = self._bucket_gids.get(id(bucket))
        if known is not None and known[0] is bucket:
            return known[1]
        rids = tuple(self._resource(r) for r in bucket.values())
        gid = self._gid.get((type_url, rids))
        if gid is None:
            gid = self._gid[(type_url, rids)] = next(self._ids)
            self.groups[gid] = (type_url, rids)
        self._bucket_gids[id(bucket)] = (bucket, gid)
        return gid

    def _resource(self, res: Resource) -> int:
        key = (res.type_url, res.name, res.version)
        rid = self._rid.get(key)
        if rid is None:
            rid = self._rid[key] = next(self._ids)
            self.resources[rid] = res
        return rid

    def keep_only(self, sids: set[int]) -> None:
        """Forget everything no worker holds."""
        gids = {g for s in sids for g in self.snapshots[s]}
        rids = {r for g in gids for r in self.groups[g][1]}
        self.snapshots = {s: v for s, v in self.snapshots.items() if s in sids}
        self._sid = {k: s for k, s in self._sid.items() if s in sids}
        self.groups = {g: v for g, v in self.groups.items() if g in gids}
        self._gid = {k: g for k, g in self._gid.items() if g in gids}
        self.resources = {r: v for r, v in self.resources.items() if r in rids}
        self._rid = {k: r for k, r in self._rid.items() if r in rids}
        self._of = {k: v for k, v in self._of.items() if v[0] in sids}
        self._bucket_gids = {k: v for k, v in self._bucket_gids.items() if v[1] in gids}


@dataclass(eq=False)
class _Worker:
    index: int
    proc: asyncio.subprocess.Process
    channel: Channel
    port: int = 0
    #: Stream id -> the proxy it serves.
    streams: dict[int, Proxy] = field(default_factory=dict)
    #: What the worker holds, as the catalog numbers it.
    snapshots: set[int] = field(default_factory=set)
    groups: set[int] = field(default_factory=set)
    resources: set[int] = field(default_factory=set)
    replies: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class WorkerHub:
    """N worker processes serving one port, seen by the primary as its own streams."""

    def __init__(
        self,
        count: int,
        cache: ConfigCache,
        *,
        settings: ServerSettings,
        authorizer: Callable[[], StreamAuthorizer],
        on_sidecars_changed: Callable[[], None],
        own_metrics: Any,
        gc_threshold: int = 0,
    ) -> None:
        self.count = count
        self.gc_threshold = gc_threshold
        self.cache = cache
        self.settings = settings
        self.authorizer = authorizer
        self.on_sidecars_changed = on_sidecars_changed
        self.catalog = Catalog()
        self.metrics = SummedMetrics(own_metrics)
        self.registry = registry_of(self.metrics)
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0
        self._host = ""
        self._port = 0
        self._reservation: socket.socket | None = None
        self._requests = itertools.count(1)
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Reserve ``host:port`` (0: any), start every worker on it; returns the port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        self._reservation = sock
        self._host, self._port = host, int(sock.getsockname()[1])
        await asyncio.gather(*(self._spawn(i) for i in range(self.count)))
        return self._port

    async def _spawn(self, index: int) -> _Worker:
        parent, child = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "xds_server.workers.worker",
                "--index",
                str(index),
                "--fd",
                str(child.fileno()),
                "--host",
                self._host if ":" not in self._host else f"[{self._host}]",
                "--port",
                str(self._port),
                "--max-concurrent-pushes",
                str(self.settings.max_concurrent_pushes),
                "--max-request-bytes",
                str(self.settings.max_request_bytes),
                "--gc-threshold",
                str(self.gc_threshold),
                "--log-level",
                logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child.close()
        reader, writer = await asyncio.open_connection(sock=parent)
        worker = _Worker(index, proc, Channel(reader, writer))
        self.workers[index] = worker
        task = asyncio.create_task(self._receive(worker), name=f"worker-{index}-receive")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        async with asyncio.timeout(60):
            await worker.ready.wait()
        log.info("worker %d (pid %d) serving on port %d", index, proc.pid, worker.port)
        return worker

    async def run(self) -> None:
        """Restart workers that die, until cancelled."""
        while True:
            waits = {asyncio.ensure_future(w.proc.wait()): w for w in list(self.workers.values())}
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for p in pending:
                p.cancel()
            for finished in done:
                worker = waits[finished]
                log.warning(
                    "worker %d (pid %d) exited with %s; its streams reconnect to the others",
                    worker.index,
                    worker.proc.pid,
                    worker.proc.returncode,
                )
                self._forget(worker)
                await asyncio.sleep(RESTART_DELAY_S)
                self.restarts += 1
                await self._spawn(worker.index)

    async def close(self) -> None:
        self._closing = True
        for worker in self.workers.values():
            worker.channel.close()
        for worker in self.workers.values():
            try:
                await asyncio.wait_for(worker.proc.wait(), timeout=3)
            except TimeoutError:
                worker.proc.kill()
                await worker.proc.wait()
        for task in list(self._tasks):
            task.cancel()
        if self._reservation is not None:
            self._reservation.close()

    def _forget(self, worker: _Worker) -> None:
        sidecars = any(_is_sidecar(p) for p in worker.streams.values())
        worker.streams.clear()
        worker.channel.close()
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        self.metrics.retire(worker.index)
        for future in worker.replies.values():
            if not future.done():
                future.cancel()
        if sidecars:
            self.on_sidecars_changed()

    # -- the workers' streams ---------------------------------------------------------

    def proxies(self) -> Iterator[Proxy]:
        for worker in self.workers.values():
            yield from worker.streams.values()

    def sidecars(self) -> dict[tuple[str, str], Proxy]:
        return {(p.namespace, p.pod_name): p for p in self.proxies() if _is_sidecar(p)}

    def find(self, node_id: str) -> Proxy | None:
        return next((p for p in self.proxies() if p.node_id == node_id), None)

    async def _receive(self, worker: _Worker) -> None:
        while (message := await worker.channel.receive()) is not None:
            kind = message[0]
            if kind == "ready":
                worker.port = message[1]
                worker.ready.set()
            elif kind == "admit":
                task = asyncio.create_task(self._admit(worker, message[1], message[2], message[3]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif kind == "opened":
                proxy: Proxy = message[2]
                worker.streams[message[1]] = proxy
                if self.cache.ready:
                    await self._ship(worker, {message[1]: proxy}, complete=False)
                if _is_sidecar(proxy):
                    self.on_sidecars_changed()
            elif kind == "closed":
                gone = worker.streams.pop(message[1], None)
                if gone is not None and _is_sidecar(gone):
                    self.on_sidecars_changed()
            elif kind == "log":
                record = logging.makeLogRecord(message[1])
                logging.getLogger(record.name).handle(record)
            elif kind == "reply":
                future = worker.replies.get(message[1])
                if future is not None and not future.done():
                    future.set_result(message[2])

    async def _admit(self, worker: _Worker, request: int, proxy: Proxy, peer: str) -> None:
        decided: Proxy | Refusal = await self.authorizer().admit(proxy, peer_context(peer))
        with contextlib.suppress(ConnectionError):
            await worker.channel.send(("admitted", request, decided))

    # -- pushes -----------------------------------------------------------------------

    async def push(self) -> None:
        """Ship the cache's current generation to every worker."""
        sent = await asyncio.gather(
            *(self._ship(w, dict(w.streams), complete=True) for w in list(self.workers.values())),
            return_exceptions=True,
        )
        for outcome in sent:
            if isinstance(outcome, BaseException):
                log.warning("a worker missed a generation: %r", outcome)
        self.catalog.keep_only({s for w in self.workers.values() for s in w.snapshots})

    async def _ship(self, worker: _Worker, streams: dict[int, Proxy], *, complete: bool) -> None:
        generation = self.cache.generation
        shipment = Shipment(generation, self.cache.change_ts, complete=complete)
        # What this shipment references; the worker holds exactly that after a generation.
        sids: set[int] = set()
        gids: set[int] = set()
        rids: set[int] = set()
        catalog = self.catalog
        for stream, proxy in streams.items():
            try:
                snapshot = await self.cache.snapshot_for(proxy)
            except GenerationError:
                continue  # the stream keeps its last config; the cache logged why
            sid = catalog.sid(snapshot, generation)
            shipment.assign[stream] = sid
            if sid in sids:
                continue
            sids.add(sid)
            if sid not in worker.snapshots:
                shipment.snapshots[sid] = catalog.snapshots[sid]
            for gid in catalog.snapshots[sid]:
                if gid in gids:
                    continue
                gids.add(gid)
                type_url, members = catalog.groups[gid]
                if gid not in worker.groups:
                    shipment.groups[gid] = (type_url, members)
                for rid in members:
                    if rid not in rids:
                        rids.add(rid)
                        if rid not in worker.resources:
                            shipment.resources[rid] = catalog.resources[rid]
        if complete:
            worker.snapshots, worker.groups, worker.resources = sids, gids, rids
        else:
            worker.snapshots |= sids
            worker.groups |= gids
            worker.resources |= rids
        await worker.channel.send(("push", shipment))

    # -- the admin --------------------------------------------------------------------

    async def _ask(self, worker: _Worker, what: str) -> Any:
        request = next(self._requests)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        worker.replies[request] = future
        try:
            await worker.channel.send(("request", request, what))
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                return await future
        finally:
            worker.replies.pop(request, None)

    async def gather(self, what: str) -> list[dict[str, Any]]:
        answers = await asyncio.gather(
            *(self._ask(w, what) for w in list(self.workers.values())), return_exceptions=True
        )
        return [entry for a in answers if isinstance(a, list) for entry in a]

    async def refresh_metrics(self) -> None:
        workers = list(self.workers.values())
        answers = await asyncio.gather(
            *(self._ask(w, "metrics") for w in workers), return_exceptions=True
        )
        for worker, answer in zip(workers, answers, strict=True):
            if isinstance(answer, list):
                self.metrics.update(worker.index, answer)


def _is_sidecar(proxy: Proxy) -> bool:
    return proxy.kind is ProxyKind.SIDECAR and not proxy.proxyless
