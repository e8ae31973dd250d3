"""The ADS server: State-of-the-World and Delta streams on grpc.aio.

One coroutine serves each stream. A reader task puts every request it reads in the
stream's inbox; the push queue wakes the inbox when the config changes. The stream loop
takes everything there, handles all requests first (ACKs and NACKs before pushes), then
writes whatever :class:`~xds_server.ads.stream.StreamState` says is due. A proxy has at most
one pending push: a wake-up is a flag, and the snapshot is taken when the push runs, so
it is always the newest. The push queue caps how many streams build and write a push at
once.

Every client may be hostile, so everything a stream holds is bounded: the inbox holds a
bounded number of requests (past it the reader stops reading, and HTTP/2 flow control
holds the client back), a write that the client does not read within
``write_timeout`` closes the stream (or it would hold a push slot forever), and
:class:`~xds_server.ads.stream.StreamLimits` bounds the protocol state. A stream whose
setup fails leaves nothing behind.

Requests and responses are bytes on the wire: requests are parsed here (so garbage gets
a clear INVALID_ARGUMENT for that stream only) and responses are the pre-encoded bytes
from ``wire.py``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from mesh import xds
from mesh.proxy import NodeIdError, Proxy, ProxyKind, proxy_from_node
from xds_server.ads.cache import GenerationError, SnapshotSource
from xds_server.ads.debounce import PushRequest
from xds_server.ads.metrics import XdsMetrics
from xds_server.ads.pushqueue import PushQueue
from xds_server.ads.stream import Outcome, Outgoing, ProtocolError, StreamLimits, StreamState

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

#: grpc.aio server options for an ADS server. grpc-core cancels new calls once more than
#: ``max_pending_requests`` wait for the application to accept them (default 1000), which
#: a busy event loop hits when thousands of proxies (re)connect at once; a control plane
#: must accept them all. Keepalive pings find dead peers whose streams would linger.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.server.max_pending_requests", 50_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.max_pings_without_data", 0),
)


@dataclass
class _Arrived:
    """What one take from a stream's inbox found."""

    requests: list[bytes] = field(default_factory=list)
    #: The push queue woke the stream: a new generation may be due.
    woken: bool = False
    #: The client closed its side (or the read failed).
    closed: bool = False


@dataclass(frozen=True)
class ServerSettings:
    #: Streams that may build and write a push at the same time. grpc.aio writes are cheap
    #: (1,000 streams fan out in about 60 ms, measured); the cap bounds memory for queued
    #: response bytes and keeps the event loop responsive to ACKs during a large push.
    #: Istio's PILOT_PUSH_THROTTLE is 100 per core.
    max_concurrent_pushes: int = 512
    #: Largest request accepted, in bytes. Real requests are a few KB.
    max_request_bytes: int = 4 * 1024 * 1024
    #: Requests one stream may have read and not yet applied. Past it the stream stops
    #: reading, and HTTP/2 flow control holds the client back. Envoy has at most a few in
    #: flight (an ACK per type, a subscription change); a client that sends and never
    #: reads its responses reaches the bound while the stream waits to write.
    max_queued_requests: int = 64
    #: The same bound in bytes (a request larger than this is still taken, alone).
    max_queued_request_bytes: int = 4 * 1024 * 1024
    #: Seconds the responses due at once (a push) may take to be written, that is, for the
    #: client to read them. Past it the stream is closed (the proxy reconnects), since a
    #: client that stops reading would otherwise hold one of the push slots forever. Envoy
    #: reads a large push in well under a second; 30 s leaves room for a busy proxy on a
    #: slow link.
    write_timeout: float = 30.0
    #: What one client may make its stream's protocol state hold.
    limits: StreamLimits = field(default_factory=StreamLimits)


class _StreamEnded(Exception):
    """The stream ends here; its status is already set on the context."""


class _Inbox:
    """One stream's inbox: the requests its reader read, the push queue's wake-up, and
    the end of the stream. The stream loop takes everything at once.

    Requests are bounded in number and bytes: :meth:`put` waits for room, so the reader
    stops reading and the client is held back by flow control rather than by memory.
    """

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._requests: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._woken = False
        self._closed = False
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._requests)

    def full(self, size: int) -> bool:
        """Whether a request of ``size`` bytes must wait for room."""
        return bool(self._requests) and (
            len(self._requests) >= self._max_requests or self._bytes + size > self._max_bytes
        )

    async def put(self, raw: bytes) -> None:
        """Queue a request once there is room."""
        while self.full(len(raw)):
            self._room.clear()
            await self._room.wait()
        self._requests.append(raw)
        self._bytes += len(raw)
        self._ready.set()

    def wake(self) -> None:
        self._woken = True
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def take(self) -> _Arrived:
        """Wait for something, then take everything there is."""
        await self._ready.wait()
        self._ready.clear()
        arrived = _Arrived(list(self._requests), self._woken, self._closed)
        self._requests.clear()
        self._bytes = 0
        self._woken = False
        self._room.set()
        return arrived


@dataclass(frozen=True)
class Refusal:
    """Why a stream is not served, and the gRPC status it is closed with."""

    message: str
    code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED


class StreamAuthorizer:
    """Decides whether a stream may be served as the proxy it claims to be, and as what.

    This default accepts every stream as it claims. ``xds_server.auth.authorizer.MeshAuthorizer``
    authenticates streams on the TLS port against the node ID, and keeps secrets from
    plaintext peers outside an allowlist.
    """

    async def admit(self, proxy: Proxy, context: grpc.aio.ServicerContext) -> Proxy | Refusal:
        """The proxy to serve (possibly narrowed, e.g. to receive no secrets), or why not."""
        return proxy


@dataclass(eq=False)
class Connection:
    """A connected proxy: its identity, stream state and inbox."""

    id: int
    proxy: Proxy
    delta: bool
    peer: str
    state: StreamState
    inbox: _Inbox
    opened_at: float = field(default_factory=time.time)

    def wake(self) -> None:
        self.inbox.wake()

    def sync_entry(self) -> dict[str, Any]:
        """This stream's line of ``/debug/syncz``."""
        status = self.state.sync_status()
        return {
            "node_id": self.proxy.node_id,
            "mode": "delta" if self.delta else "sotw",
            "types": {xds.short(t): v | {"type_url": t} for t, v in status.items()},
        }

    def describe(self) -> dict[str, Any]:
        return {
            "node_id": self.proxy.node_id,
            "stream": self.id,
            "mode": "delta" if self.delta else "sotw",
            "peer": self.peer,
            "proxyless": self.proxy.proxyless,
            "connected_at": self.opened_at,
            "types": self.state.sync_status(),
        }


def _is_proxyless(node: Any, metadata: Mapping[str, Any]) -> bool:
    agent = str(node.user_agent_name).lower()
    return agent.startswith("grpc") or str(metadata.get("GENERATOR", "")).lower() == "grpc"


class XdsServer:
    """Serves ADS from a :class:`ConfigCache` to every connected proxy."""

    def __init__(
        self,
        cache: SnapshotSource,
        metrics: XdsMetrics | None = None,
        settings: ServerSettings | None = None,
        authorizer: StreamAuthorizer | None = None,
    ) -> None:
        self.cache = cache
        self.metrics = metrics or XdsMetrics()
        self.settings = settings or ServerSettings()
        self.authorizer = authorizer or StreamAuthorizer()
        self.connections: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self.pushes = PushQueue(self.settings.max_concurrent_pushes)
        #: Called when the set of connected sidecars changes (endpoints address them).
        self.on_sidecars_changed: Callable[[], None] = lambda: None
        #: Called when a stream is admitted and when it ends (a worker tells its primary).
        self.on_stream_opened: Callable[[Connection], None] = lambda c: None
        self.on_stream_closed: Callable[[Connection], None] = lambda c: None
        #: Called on every ACK with (connection, type_url, seconds from change to ACK).
        self.on_ack: Callable[[Connection, str, float | None], None] = lambda c, t, s: None

    # -- gRPC wiring --------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        def method(delta: bool) -> grpc.RpcMethodHandler:
            async def serve(_requests: Any, context: grpc.aio.ServicerContext) -> None:
                await self._serve(context, delta=delta)

            return grpc.stream_stream_rpc_method_handler(serve)

        return grpc.method_handlers_generic_handler(
            ADS_SERVICE,
            {
                "StreamAggregatedResources": method(False),
                "DeltaAggregatedResources": method(True),
            },
        )

    def add_to(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((self.handler(),))

    # -- pushes ---------------------------------------------------------------------

    def push_all(self, request: PushRequest | None = None) -> int:
        """Wake every stream to pick up the cache's current generation; ``request`` says
        why (its reasons are counted in ``inferlane_xds_push_triggers_total``)."""
        self.metrics.generation.set(self.cache.generation)
        if request is not None:
            for reason in request.reasons:
                self.metrics.push_triggers.labels(reason).inc()
            log.debug(
                "generation %d for %s: waking %d streams",
                self.cache.generation,
                request.describe(),
                len(self.connections),
            )
        for conn in self.connections.values():
            self.pushes.enqueue(conn)
        return len(self.connections)

    def sidecars(self) -> dict[tuple[str, str], Proxy]:
        """Connected Envoy sidecars by (namespace, pod)."""
        return {
            (c.proxy.namespace, c.proxy.pod_name): c.proxy
            for c in self.connections.values()
            if c.proxy.kind is ProxyKind.SIDECAR and not c.proxy.proxyless
        }

    def find(self, node_id: str) -> Connection | None:
        for conn in self.connections.values():
            if conn.proxy.node_id == node_id:
                return conn
        return None

    # -- one stream -----------------------------------------------------------------

    async def _serve(self, context: grpc.aio.ServicerContext, *, delta: bool) -> None:
        """One stream: take what arrived, apply the requests in order, then push what is
        due. The first request opens the connection; from then on ``conn`` is closed
        however the stream ends, so a stream that fails anywhere leaves nothing behind."""
        inbox = _Inbox(self.settings.max_queued_requests, self.settings.max_queued_request_bytes)
        reader = asyncio.create_task(self._read(context, inbox), name="xds-reader")
        conn: Connection | None = None
        try:
            while True:
                arrived = await inbox.take()
                for raw in arrived.requests:
                    req = await self._parse(context, conn, raw, delta)
                    if conn is None:
                        conn = await self._open(context, req, delta, inbox)
                    await self._handle(context, conn, req)
                if arrived.closed:
                    return
                if conn is not None:
                    await self._push(context, conn, woken=arrived.woken)
        except _StreamEnded:
            return
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            if conn is not None:
                self._close(conn)

    async def _parse(
        self, context: grpc.aio.ServicerContext, conn: Connection | None, raw: bytes, delta: bool
    ) -> Any:
        """One request, decoded; a malformed one, or one naming another node, is refused."""
        parse = discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest
        try:
            req = parse.FromString(raw)
        except DecodeError as exc:
            await self._refuse(context, conn, "malformed", f"malformed request: {exc}")
        if conn is not None and req.node.id not in ("", conn.proxy.node_id):
            await self._refuse(
                context,
                conn,
                "node_changed",
                f"node ID changed mid-stream from {conn.proxy.node_id!r} to {req.node.id!r}",
            )
        return req

    async def _push(
        self, context: grpc.aio.ServicerContext, conn: Connection, *, woken: bool
    ) -> None:
        """Write what is due. A wake-up from the push queue first takes the newest
        snapshot, and hands the queue slot on when done."""
        if not woken:
            await self._write(context, conn)
            return
        try:
            await self._refresh(conn)
            await self._write(context, conn)
        finally:
            self.pushes.done(conn)

    async def _read(self, context: grpc.aio.ServicerContext, inbox: _Inbox) -> None:
        try:
            while True:
                raw = await context.read()
                if raw is grpc.aio.EOF:
                    break
                if inbox.full(len(raw)):
                    self.metrics.throttled_reads.inc()
                await inbox.put(raw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer went away mid-read
            log.debug("stream read ended: %r", exc)
        finally:
            inbox.close()

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        conn: Connection | None,
        reason: str,
        message: str,
        code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
    ) -> NoReturn:
        """Close this stream alone with a status saying what was wrong."""
        self.metrics.rejected_streams.labels(reason).inc()
        who = conn.proxy.node_id if conn else context.peer()
        log.warning("refusing stream from %s: %s", who, message)
        await context.abort(code, message)
        raise AssertionError("context.abort returned")

    def _end_stalled(self, context: grpc.aio.ServicerContext, conn: Connection) -> NoReturn:
        """End a stream whose client stopped reading. Not with ``abort``: its status
        would wait behind the unread responses, and the handler with it."""
        message = f"the client read no response for {self.settings.write_timeout:g} s"
        self.metrics.rejected_streams.labels("write_timeout").inc()
        log.warning("closing stream %d from %s: %s", conn.id, conn.proxy.node_id, message)
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details(message)
        raise _StreamEnded

    async def _open(
        self,
        context: grpc.aio.ServicerContext,
        req: Any,
        delta: bool,
        inbox: _Inbox,
    ) -> Connection:
        if not req.HasField("node") or not req.node.id:
            await self._refuse(
                context, None, "no_node", "the first request on a stream must carry the node"
            )
        metadata = json_format.MessageToDict(req.node.metadata)
        try:
            proxy = proxy_from_node(
                req.node.id, metadata, proxyless=_is_proxyless(req.node, metadata)
            )
        except NodeIdError as exc:
            await self._refuse(context, None, "bad_node", str(exc))
        admitted = await self.authorizer.admit(proxy, context)
        if isinstance(admitted, Refusal):
            reason = (
                "unauthenticated"
                if admitted.code is grpc.StatusCode.UNAUTHENTICATED
                else "unauthorized"
            )
            await self._refuse(context, None, reason, admitted.message, admitted.code)
        proxy = admitted
        conn = Connection(
            id=next(self._ids),
            proxy=proxy,
            delta=delta,
            peer=context.peer(),
            state=StreamState(delta=delta, limits=self.settings.limits),
            inbox=inbox,
        )
        self.connections[conn.id] = conn
        self.metrics.connected.labels("delta" if delta else "sotw").inc()
        log.info(
            "stream %d opened: %s (%s%s) from %s",
            conn.id,
            proxy.node_id,
            "delta" if delta else "sotw",
            ", proxyless" if proxy.proxyless else "",
            conn.peer,
        )
        self.on_stream_opened(conn)
        try:
            await self._refresh(conn)
        except BaseException:
            self._close(conn)  # whatever failed, the stream leaves nothing behind
            raise
        if proxy.kind is ProxyKind.SIDECAR and not proxy.proxyless:
            self.on_sidecars_changed()
        return conn

    def _close(self, conn: Connection) -> None:
        if self.connections.pop(conn.id, None) is None:
            return
        self.pushes.forget(conn)
        self.metrics.connected.labels("delta" if conn.delta else "sotw").dec()
        log.info("stream %d closed: %s", conn.id, conn.proxy.node_id)
        self.on_stream_closed(conn)
        if conn.proxy.kind is ProxyKind.SIDECAR and not conn.proxy.proxyless:
            self.on_sidecars_changed()

    async def _refresh(self, conn: Connection) -> None:
        """Give the stream the current generation's snapshot; keep the old one on failure."""
        current = conn.state.snapshot
        if not self.cache.ready:
            return  # no world yet: an empty snapshot would wipe a reconnecting proxy's config
        if current is not None and current.generation == self.cache.generation:
            return
        change_ts = self.cache.change_ts
        try:
            snapshot = await self.cache.snapshot_for(conn.proxy)
        except GenerationError as exc:
            self.metrics.generation_failures.inc()
            log.error("stream %d keeps its last config: %s", conn.id, exc)
            return
        if snapshot is None:
            return  # not known yet: a worker's primary has not sent it
        conn.state.set_snapshot(snapshot, change_ts)

    async def _handle(self, context: grpc.aio.ServicerContext, conn: Connection, req: Any) -> None:
        try:
            result = conn.state.on_request(req)
        except ProtocolError as exc:
            await self._refuse(context, conn, exc.reason, str(exc))
        m = self.metrics.of(result.type_url)
        if result.outcome is Outcome.ACK:
            m.acks.inc()
            if result.convergence is not None:
                m.convergence.observe(result.convergence)
            self.on_ack(conn, result.type_url, result.convergence)
        elif result.outcome is Outcome.NACK:
            m.nacks.inc()
            log.warning(
                "stream %d (%s) NACKed %s nonce %s: %s",
                conn.id,
                conn.proxy.node_id,
                xds.short(result.type_url),
                result.nonce,
                result.error,
            )
        elif result.outcome is Outcome.STALE:
            m.stale.inc()

    async def _write(self, context: grpc.aio.ServicerContext, conn: Connection) -> None:
        responses = conn.state.responses()
        if not responses:
            return
        try:
            # One deadline for what is due now (a timer per response costs a 10,000-stream
            # push a tenth of a second).
            async with asyncio.timeout(self.settings.write_timeout):
                for out in responses:
                    await context.write(out.payload)
                    self._count_sent(conn, out)
        except TimeoutError:
            self._end_stalled(context, conn)

    def _count_sent(self, conn: Connection, out: Outgoing) -> None:
        m = self.metrics.of(out.type_url)
        m.pushes.inc()
        m.push_bytes.inc(len(out.payload))
        m.resources_sent.inc(out.resources)
        log.debug(
            "stream %d (%s): sent %s version %s nonce %s (%d resources, %d removed)",
            conn.id,
            conn.proxy.node_id,
            xds.short(out.type_url),
            out.version,
            out.nonce,
            out.resources,
            out.removed,
        )
