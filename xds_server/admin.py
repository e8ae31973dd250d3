"""The admin HTTP surface: health, readiness, Prometheus metrics and debug pages.

The admin renders every page. Other parts of inferlane hand it plain data: a runtime
registers a JSON page with :meth:`Admin.add_json_page` and a function returning
JSON-ready data, and never touches HTTP itself. Every page is listed, with what it
shows, at ``/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import inspect
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mesh import xds
from mesh.model import World
from mesh.proxy import Proxy
from xds_server.ads.cache import GenerationError
from xds_server.ads.server import Connection, XdsServer
from xds_server.ads.snapshot import decode

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Page:
    path: str
    description: str


class PageError(Exception):
    """Raised by a query page's data function: answered as ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps)


def _dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)


class WorkerStreams(Protocol):
    """The streams other processes serve (``inferlane serve --workers N``), shown with this
    process's own as one control plane."""

    #: Every process's metrics, summed.
    registry: CollectorRegistry

    async def gather(self, what: str) -> list[dict[str, Any]]:
        """Every worker's entries of ``/debug/syncz`` (``syncz``) or ``/debug/connections``."""
        ...

    def find(self, node_id: str) -> Proxy | None: ...

    async def refresh_metrics(self) -> None:
        """Fetch every worker's samples into ``registry``."""
        ...


class Admin:
    """Builds the aiohttp application. ``services`` and ``ready`` come from the wiring."""

    def __init__(
        self,
        xds: XdsServer,
        *,
        world: Callable[[], World | None] = lambda: None,
        ready: Callable[[], bool] = lambda: True,
        registries: tuple[CollectorRegistry, ...] = (),
        workers: WorkerStreams | None = None,
    ) -> None:
        self.xds = xds
        self.world = world
        self.ready = ready
        self.workers = workers
        streams = workers.registry if workers is not None else xds.metrics.registry
        self.registries = (streams, *registries)
        self.pages: list[Page] = []
        self.app = web.Application()
        self.add_page("/", "this index", self._index)
        self.add_page("/healthz", "200 while the process serves", self._healthz)
        self.add_page("/readyz", "200 once the first world is loaded, else 503", self._readyz)
        self.add_page("/metrics", "Prometheus metrics", self._metrics)
        self.add_page(
            "/debug/syncz",
            "per connected proxy and type: versions sent and acknowledged, status, last NACK",
            self._syncz,
        )
        self.add_page(
            "/debug/config_dump",
            "?proxy=NODE_ID: the resources that proxy should have, decoded",
            self._config_dump,
        )
        self.add_page(
            "/debug/services",
            "inference Services as parsed, with their annotation errors",
            self._services,
        )
        self.add_page("/debug/connections", "open ADS streams and their peers", self._connections)

    def add_page(self, path: str, description: str, handler: Handler) -> None:
        self.pages.append(Page(path, description))
        self.app.router.add_get(path, handler)

    def add_json_page(self, path: str, description: str, data: Callable[[], Any]) -> None:
        """A page showing ``data()``, which returns JSON-ready data (dicts, lists, scalars)."""

        async def render(request: web.Request) -> web.Response:
            return _json(data())

        self.add_page(path, description, render)

    def add_query_page(
        self,
        path: str,
        description: str,
        data: Callable[[Mapping[str, str]], Any | Awaitable[Any]],
    ) -> None:
        """A page showing ``data(query)`` (awaited if it is a coroutine); ``data`` raises
        :class:`PageError` for a query it cannot answer (400 for a bad one, 404 for an
        unknown object)."""

        async def render(request: web.Request) -> web.Response:
            try:
                result = data(request.query)
                if inspect.isawaitable(result):
                    result = await result
                return _json(result)
            except PageError as exc:
                return _json({"error": exc.message}, exc.status)

        self.add_page(path, description, render)

    async def _index(self, request: web.Request) -> web.Response:
        pages = [{"path": p.path, "description": p.description} for p in self.pages]
        return _json({"pages": pages})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.ready():
            return web.Response(text="ready\n")
        return web.Response(text="not ready: no world loaded yet\n", status=503)

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.workers is not None:
            await self.workers.refresh_metrics()
        body = b"".join(generate_latest(r) for r in self.registries)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _syncz(self, request: web.Request) -> web.Response:
        out = [sync_entry(c) for c in self.xds.connections.values()]
        if self.workers is not None:
            out += await self.workers.gather("syncz")
        return _json(sorted(out, key=lambda e: str(e["node_id"])))

    async def _config_dump(self, request: web.Request) -> web.Response:
        node_id = request.query.get("proxy", "")
        if not node_id:
            return _json({"error": "give ?proxy=NODE_ID; /debug/syncz lists them"}, 400)
        conn = self.xds.find(node_id)
        remote = self.workers.find(node_id) if conn is None and self.workers else None
        if conn is not None:
            snapshot = conn.state.snapshot
        elif remote is not None:
            try:
                snapshot = await self.xds.cache.snapshot_for(remote)
            except GenerationError as exc:
                return _json({"error": str(exc)}, 500)
        else:
            return _json({"error": f"no connected proxy {node_id!r}"}, 404)
        resources = snapshot.resources if snapshot is not None else {}
        return _json(
            {
                "node_id": node_id,
                "generation": snapshot.generation if snapshot else None,
                "resources": {
                    xds.short(t): {
                        name: {"version": r.version, "resource": decode(r)}
                        for name, r in sorted(by_name.items())
                    }
                    for t, by_name in sorted(resources.items())
                },
            }
        )

    async def _services(self, request: web.Request) -> web.Response:
        return _json(describe_world(self.world()))

    async def _connections(self, request: web.Request) -> web.Response:
        out = [c.describe() for c in self.xds.connections.values()]
        if self.workers is not None:
            out += await self.workers.gather("connections")
        return _json(out)


def sync_entry(conn: Connection) -> dict[str, Any]:
    """One proxy's ``/debug/syncz`` entry: per type, versions sent and acked, status, NACK."""
    return conn.sync_entry()


def plain(value: Any) -> Any:
    """Frozen model values as JSON-ready data (mappings, lists, enum values)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(plain(k)): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    return value


def describe_world(world: World | None) -> dict[str, Any]:
    """``/debug/services``: every inference Service as parsed, with its errors."""
    if world is None:
        return {"loaded": False, "services": [], "source_errors": []}
    return {
        "loaded": True,
        "services": [
            {
                "namespace": svc.namespace,
                "name": svc.name,
                "hostname": svc.hostname,
                "ports": plain(svc.ports),
                "config": plain(svc.config),
                "errors": [
                    {"annotation": e.annotation, "value": e.value, "message": e.message}
                    for e in svc.errors
                ],
                "endpoints": plain(svc.endpoints),
            }
            for svc in world.services
        ],
        "source_errors": plain(world.source_errors),
    }


@contextlib.asynccontextmanager
async def serving_admin(admin: Admin, host: str, port: int) -> AsyncIterator[int]:
    """Serve ``admin`` on host:port (0 = any free port); yield the bound port."""
    runner = web.AppRunner(admin.app, handle_signals=False, access_log=None)
    await runner.setup()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = int(sock.getsockname()[1])
    try:
        await web.SockSite(runner, sock).start()
        yield bound
    finally:
        await runner.cleanup()
