"""Small aiohttp backends for end-to-end tests."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Echo:
    """Answers every request with its name; counts requests and remembers headers."""

    name: str
    host: str = "127.0.0.1"
    port: int = 0
    requests: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)
    status: int = 200

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.headers.append(dict(request.headers))
        return web.Response(text=self.name, status=self.status, headers={"x-served-by": self.name})


@contextlib.asynccontextmanager
async def echo_server(name: str, host: str = "127.0.0.1") -> AsyncIterator[Echo]:
    echo = Echo(name=name, host=host)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo.handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    echo.port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    try:
        yield echo
    finally:
        await runner.cleanup()
