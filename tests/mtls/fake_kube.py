"""A fake Kubernetes API server for Secrets: just enough for the CA store.

It speaks the real wire format (JSON Secrets with base64 ``data``, ``Status`` errors) on
``/api/v1/namespaces/{ns}/secrets[/{name}]``: GET, POST (409 AlreadyExists when the name
is taken). ``hold_missing_reads(n)`` parks reads of absent Secrets until ``n`` of them have
arrived, so tests can make replicas race deterministically.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from kubernetes.aio.client import ApiClient, Configuration, CoreV1Api


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


@dataclass
class FakeSecretsServer:
    secrets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    creates: int = 0
    conflicts: int = 0
    reads: int = 0
    #: Answer reads with this HTTP status instead (e.g. 403), when set.
    fail_reads_with: int | None = None
    _resource_version: int = 0
    _hold_until: int = 0
    _missing_reads: int = 0
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    def hold_missing_reads(self, count: int) -> None:
        self._hold_until = count
        self._released.clear()

    def put(self, namespace: str, name: str, data: dict[str, str]) -> None:
        """Store a Secret directly (``data`` values already base64)."""
        self._resource_version += 1
        self.secrets[(namespace, name)] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "resourceVersion": str(self._resource_version),
            },
            "data": data,
        }

    async def _get(self, request: web.Request) -> web.StreamResponse:
        namespace, name = request.match_info["ns"], request.match_info["name"]
        self.reads += 1
        if self.fail_reads_with is not None:
            return _status(self.fail_reads_with, "Forbidden", "secrets is forbidden")
        secret = self.secrets.get((namespace, name))
        if secret is None and self._hold_until:
            self._missing_reads += 1
            if self._missing_reads >= self._hold_until:
                self._released.set()
            await self._released.wait()
            secret = self.secrets.get((namespace, name))
        if secret is None:
            return _status(404, "NotFound", f'secrets "{name}" not found')
        return web.json_response(secret)

    async def _post(self, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info["ns"]
        body = json.loads(await request.read())
        name = body["metadata"]["name"]
        self.creates += 1
        if (namespace, name) in self.secrets:
            self.conflicts += 1
            return _status(409, "AlreadyExists", f'secrets "{name}" already exists')
        self.put(namespace, name, body.get("data") or {})
        stored = self.secrets[(namespace, name)]
        stored["type"] = body.get("type", "Opaque")
        stored["metadata"]["labels"] = body["metadata"].get("labels", {})
        return web.json_response(stored, status=201)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/secrets/{name}", self._get)
        app.router.add_post("/api/v1/namespaces/{ns}/secrets", self._post)
        return app


@asynccontextmanager
async def serve(fake: FakeSecretsServer) -> AsyncIterator[str]:
    """Run ``fake`` on an ephemeral loopback port; yield its base URL."""
    runner = web.AppRunner(fake.app(), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    try:
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def core_api(url: str) -> AsyncIterator[CoreV1Api]:
    """A real ``kubernetes.aio`` client pointed at ``url``."""
    client = ApiClient(Configuration(host=url))
    try:
        yield CoreV1Api(client)
    finally:
        await client.close()  # type: ignore[no-untyped-call]
