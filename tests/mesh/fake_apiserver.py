"""A fake Kubernetes API server for tests: aiohttp, in-process, on an ephemeral port.

It is a fake, not an emulator: it speaks just enough of the real list/watch wire protocol
for Services, EndpointSlices, Pods, Nodes and Events that an unmodified client (the
official ``kubernetes.aio`` client and its watch helper) works against it:

- lists carry ``metadata.resourceVersion``; ``limit`` and ``continue`` page through them
  (pages are cut from the current state, not a snapshot);
- ``?watch=1&resourceVersion=N`` replays every change after N, then streams new ones;
  without a resourceVersion (or with "0") it starts with ADDED for every object;
- a watch from before the compaction point gets an ERROR event with code 410 (Expired);
- ``timeoutSeconds`` ends a watch cleanly; ``allowWatchBookmarks`` adds BOOKMARK events;
- ``labelSelector`` in its equality forms (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``);
- POST creates an object (409 AlreadyExists if the name is taken);
- GET of one object by name (404 NotFound), and PUT replaces one: its
  ``metadata.resourceVersion`` must be the stored one (409 Conflict otherwise), as the
  real API server's optimistic concurrency requires.

ResourceVersions come from one counter, as etcd's revision does, so they rise
monotonically across all resources. Tests drive it with :meth:`put`, :meth:`delete`,
:meth:`compact`, :meth:`drop_watches` and :meth:`fail_next`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from kubernetes.aio import client

JsonObject = dict[str, Any]


@dataclass(frozen=True)
class _Kind:
    kind: str
    api_version: str
    prefix: str
    plural: str
    namespaced: bool = True


KINDS: tuple[_Kind, ...] = (
    _Kind("Service", "v1", "/api/v1", "services"),
    _Kind("Pod", "v1", "/api/v1", "pods"),
    _Kind("Node", "v1", "/api/v1", "nodes", namespaced=False),
    _Kind("Event", "v1", "/api/v1", "events"),
    _Kind("ConfigMap", "v1", "/api/v1", "configmaps"),
    _Kind("EndpointSlice", "discovery.k8s.io/v1", "/apis/discovery.k8s.io/v1", "endpointslices"),
)
_BY_KIND = {k.kind: k for k in KINDS}
_TYPE_FIELDS = ("kind", "apiVersion")


@dataclass(frozen=True)
class _Change:
    rv: int
    kind: str
    type: str
    obj: JsonObject


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: Mapping[str, str]

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch") in ("1", "true")


@dataclass(eq=False)
class _Watcher:
    request: web.Request
    closed: bool = False


class FakeApiServer:
    """Start with ``await server.start()``; ``server.url`` is then the API's base URL."""

    def __init__(self, bookmark_interval: float = 0.5) -> None:
        #: Seconds between BOOKMARK events on watches that asked for them.
        self.bookmark_interval = bookmark_interval
        #: Every request received, in order.
        self.requests: list[RequestRecord] = []
        self.url = ""
        self._rv = 0
        self._compacted = 0
        self._objects: dict[str, dict[tuple[str, str], JsonObject]] = {}
        self._log: list[_Change] = []
        self._changed = asyncio.Condition()
        self._watchers: set[_Watcher] = set()
        self._fail: list[int] = []
        #: (plural, resourceVersion) of every BOOKMARK event sent.
        self.bookmarks_sent: list[tuple[str, int]] = []
        self._runner: web.AppRunner | None = None

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(middlewares=[self._record])
        for kind in KINDS:
            base = f"{kind.prefix}/{kind.plural}"
            app.router.add_get(base, self._get)
            if kind.namespaced:
                namespaced = f"{kind.prefix}/namespaces/{{namespace}}/{kind.plural}"
                app.router.add_get(namespaced, self._get)
                app.router.add_post(namespaced, self._post)
                app.router.add_get(namespaced + "/{name}", self._get_one)
                app.router.add_put(namespaced + "/{name}", self._put)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        await self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- test controls --------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    async def put(self, obj: Mapping[str, Any]) -> JsonObject:
        """Create or replace an object (ADDED or MODIFIED); return it as stored."""
        kind = _BY_KIND[str(obj["kind"])]
        # Stored without kind and apiVersion, as list items come back from the real API.
        stored = {k: v for k, v in copy.deepcopy(dict(obj)).items() if k not in _TYPE_FIELDS}
        meta = stored.setdefault("metadata", {})
        if kind.namespaced:
            meta.setdefault("namespace", "default")
        key = (meta.get("namespace", ""), meta["name"])
        table = self._objects.setdefault(kind.kind, {})
        previous = table.get(key)
        if previous is not None:
            meta["uid"] = previous["metadata"]["uid"]
        else:
            meta.setdefault("uid", str(uuid.uuid4()))
        await self._record_change(kind, "MODIFIED" if previous else "ADDED", key, stored)
        return stored

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        table = self._objects.get(kind, {})
        key = (namespace if _BY_KIND[kind].namespaced else "", name)
        if key in table:
            await self._record_change(_BY_KIND[kind], "DELETED", key, table[key])

    def compact(self) -> None:
        """Forget history up to now: watches from an older resourceVersion get 410."""
        self._compacted = self._rv

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next ``count`` requests with ``status`` (a Status object)."""
        self._fail.extend([status] * count)

    async def drop_watches(self) -> int:
        """Cut every open watch connection, as a restarting API server would."""
        dropped = 0
        for watcher in list(self._watchers):
            if watcher.closed:
                continue
            watcher.closed = True
            dropped += 1
            transport = watcher.request.transport
            if transport is not None:
                transport.close()
        async with self._changed:
            self._changed.notify_all()
        return dropped

    @property
    def open_watches(self) -> int:
        """Watches being served and not yet cut."""
        return sum(1 for w in self._watchers if not w.closed)

    def objects(self, kind: str) -> list[JsonObject]:
        return [copy.deepcopy(o) for _, o in sorted(self._objects.get(kind, {}).items())]

    def watch_requests(self, plural: str) -> list[RequestRecord]:
        return [r for r in self.requests if r.is_watch and r.path.endswith("/" + plural)]

    def list_requests(self, plural: str) -> list[RequestRecord]:
        return [
            r
            for r in self.requests
            if r.method == "GET" and not r.is_watch and r.path.endswith("/" + plural)
        ]

    # --- internals ------------------------------------------------------------------

    async def _record_change(
        self, kind: _Kind, type_: str, key: tuple[str, str], obj: JsonObject
    ) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        table = self._objects.setdefault(kind.kind, {})
        if type_ == "DELETED":
            del table[key]
        else:
            table[key] = obj
        full = {"kind": kind.kind, "apiVersion": kind.api_version, **obj}
        self._log.append(_Change(self._rv, kind.kind, type_, copy.deepcopy(full)))
        async with self._changed:
            self._changed.notify_all()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(RequestRecord(request.method, request.path, dict(request.query)))
        if self._fail:
            status = self._fail.pop(0)
            return _status(status, "InternalError", "injected failure")
        response: web.StreamResponse = await handler(request)
        return response

    def _kind_of(self, request: web.Request) -> _Kind:
        parts = request.path.split("/")
        plural = parts[-2] if "name" in request.match_info else parts[-1]
        return next(k for k in KINDS if k.plural == plural and request.path.startswith(k.prefix))

    def _stored(self, request: web.Request) -> tuple[_Kind, tuple[str, str], JsonObject | None]:
        kind = self._kind_of(request)
        key = (request.match_info["namespace"], request.match_info["name"])
        return kind, key, self._objects.get(kind.kind, {}).get(key)

    async def _get_one(self, request: web.Request) -> web.Response:
        kind, key, obj = self._stored(request)
        if obj is None:
            return _status(404, "NotFound", f'{kind.plural} "{key[1]}" not found')
        return web.json_response({"kind": kind.kind, "apiVersion": kind.api_version, **obj})

    async def _put(self, request: web.Request) -> web.Response:
        kind, key, obj = self._stored(request)
        if obj is None:
            return _status(404, "NotFound", f'{kind.plural} "{key[1]}" not found')
        try:
            body = await request.json()
        except ValueError:
            return _status(400, "BadRequest", "body is not JSON")
        meta = body.get("metadata") if isinstance(body, dict) else None
        if not isinstance(meta, dict) or meta.get("name") != key[1]:
            return _status(400, "BadRequest", "metadata.name must match the URL")
        if meta.get("resourceVersion") != obj["metadata"]["resourceVersion"]:
            message = (
                f'Operation cannot be fulfilled on {kind.plural} "{key[1]}": the object has '
                "been modified; please apply your changes to the latest version and try again"
            )
            return _status(409, "Conflict", message)
        meta["namespace"] = key[0]
        body["kind"] = kind.kind
        stored = await self.put(body)
        return web.json_response({"kind": kind.kind, "apiVersion": kind.api_version, **stored})

    async def _get(self, request: web.Request) -> web.StreamResponse:
        kind = self._kind_of(request)
        try:
            selector = _Selector.parse(request.query.get("labelSelector", ""))
        except ValueError as exc:
            return _status(400, "BadRequest", str(exc))
        namespace = request.match_info.get("namespace")
        if request.query.get("watch") in ("1", "true"):
            return await self._watch(request, kind, namespace, selector)
        return self._list(request, kind, namespace, selector)

    def _matches(self, obj: Mapping[str, Any], namespace: str | None, selector: _Selector) -> bool:
        meta = obj.get("metadata", {})
        if namespace is not None and meta.get("namespace") != namespace:
            return False
        return selector.matches(meta.get("labels") or {})

    def _list(
        self, request: web.Request, kind: _Kind, namespace: str | None, selector: _Selector
    ) -> web.Response:
        items = [
            copy.deepcopy(obj)
            for _, obj in sorted(self._objects.get(kind.kind, {}).items())
            if self._matches(obj, namespace, selector)
        ]
        rv = self._rv
        offset = 0
        token = request.query.get("continue")
        if token:
            try:
                state = json.loads(base64.urlsafe_b64decode(token))
                rv, offset = int(state["rv"]), int(state["offset"])
            except (ValueError, KeyError, TypeError):
                return _status(400, "BadRequest", "invalid continue token")
            if rv < self._compacted:
                return _status(410, "Expired", "the continue token has expired")
        meta: JsonObject = {"resourceVersion": str(rv)}
        limit = int(request.query.get("limit") or 0)
        if limit > 0 and offset + limit < len(items):
            state_json = json.dumps({"rv": rv, "offset": offset + limit}).encode()
            meta["continue"] = base64.urlsafe_b64encode(state_json).decode()
            items = items[offset : offset + limit]
        else:
            items = items[offset:]
        body = {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": meta,
            "items": items,
        }
        return web.json_response(body)

    async def _watch(
        self, request: web.Request, kind: _Kind, namespace: str | None, selector: _Selector
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        raw_rv = request.query.get("resourceVersion", "")
        timeout = float(request.query.get("timeoutSeconds") or 0)
        bookmarks = request.query.get("allowWatchBookmarks") in ("1", "true")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        watcher = _Watcher(request)
        self._watchers.add(watcher)
        try:
            if raw_rv in ("", "0"):
                position = len(self._log)
                for _, obj in sorted(self._objects.get(kind.kind, {}).items()):
                    if self._matches(obj, namespace, selector):
                        full = {"kind": kind.kind, "apiVersion": kind.api_version, **obj}
                        await _send(response, {"type": "ADDED", "object": full})
            else:
                since = int(raw_rv)
                if since < self._compacted:
                    expired = _status_body(
                        410, "Expired", f"too old resource version: {since} ({self._compacted})"
                    )
                    await _send(response, {"type": "ERROR", "object": expired})
                    return response
                position = next(
                    (i for i, c in enumerate(self._log) if c.rv > since), len(self._log)
                )
            deadline = loop.time() + timeout if timeout > 0 else None
            next_bookmark = loop.time() + self.bookmark_interval
            while not watcher.closed:
                while position < len(self._log):
                    change = self._log[position]
                    position += 1
                    if change.kind == kind.kind and self._matches(change.obj, namespace, selector):
                        await _send(response, {"type": change.type, "object": change.obj})
                now = loop.time()
                if deadline is not None and now >= deadline:
                    break
                if bookmarks and now >= next_bookmark:
                    mark = {
                        "kind": kind.kind,
                        "apiVersion": kind.api_version,
                        "metadata": {"resourceVersion": str(self._rv)},
                    }
                    await _send(response, {"type": "BOOKMARK", "object": mark})
                    self.bookmarks_sent.append((kind.plural, self._rv))
                    next_bookmark = now + self.bookmark_interval
                wake = next_bookmark if bookmarks else None
                if deadline is not None:
                    wake = deadline if wake is None else min(wake, deadline)
                async with self._changed:
                    if position >= len(self._log) and not watcher.closed:
                        with contextlib.suppress(TimeoutError):
                            wait = None if wake is None else max(0.0, wake - loop.time())
                            await asyncio.wait_for(self._changed.wait(), wait)
            if not watcher.closed:
                await response.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away, or drop_watches() cut the connection
        finally:
            watcher.closed = True
            self._watchers.discard(watcher)
        return response

    async def _post(self, request: web.Request) -> web.Response:
        kind = self._kind_of(request)
        try:
            body = await request.json()
        except ValueError:
            return _status(400, "BadRequest", "body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
            return _status(400, "BadRequest", "body is not an object with metadata")
        meta = body["metadata"]
        meta["namespace"] = request.match_info["namespace"]
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            return _status(422, "Invalid", "metadata.name is required")
        if (meta["namespace"], meta["name"]) in self._objects.get(kind.kind, {}):
            message = f'{kind.plural} "{meta["name"]}" already exists'
            return _status(409, "AlreadyExists", message)
        body["kind"] = kind.kind
        stored = await self.put(body)
        return web.json_response(
            {"kind": kind.kind, "apiVersion": kind.api_version, **stored}, status=201
        )


async def _send(response: web.StreamResponse, event: Mapping[str, Any]) -> None:
    await response.write(json.dumps(event).encode() + b"\n")


def _status_body(code: int, reason: str, message: str) -> JsonObject:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(_status_body(code, reason, message), status=code)


@dataclass(frozen=True)
class _Selector:
    """An equality-based label selector."""

    requirements: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> _Selector:
        requirements: list[tuple[str, str, str]] = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            for op in ("!=", "==", "="):
                if op in part:
                    key, _, value = part.partition(op)
                    requirements.append((key.strip(), "!=" if op == "!=" else "=", value.strip()))
                    break
            else:
                if part.startswith("!"):
                    requirements.append((part[1:].strip(), "!exists", ""))
                else:
                    requirements.append((part, "exists", ""))
        if any(not key for key, _, _ in requirements):
            raise ValueError(f"invalid label selector {text!r}")
        return cls(tuple(requirements))

    def matches(self, labels: Mapping[str, Any]) -> bool:
        for key, op, value in self.requirements:
            present = key in labels
            if op == "exists" and not present:
                return False
            if op == "!exists" and present:
                return False
            if op == "=" and labels.get(key) != value:
                return False
            if op == "!=" and labels.get(key) == value:
                return False
        return True


@contextlib.asynccontextmanager
async def core_v1() -> AsyncIterator[tuple[FakeApiServer, Any]]:
    """A started fake and the official client's ``CoreV1Api`` on it; both closed on exit."""
    fake = FakeApiServer()
    url = await fake.start()
    api: Any = client.ApiClient(configuration=client.Configuration(host=url))
    try:
        yield fake, client.CoreV1Api(api)
    finally:
        await api.close()
        await fake.stop()
