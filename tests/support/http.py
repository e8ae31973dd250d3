"""Plain HTTP requests through a proxy under test."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp


async def get(
    port: int,
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    timeout: float = 5.0,  # noqa: ASYNC109 - passed to aiohttp as a request timeout
) -> tuple[int, str, dict[str, str]]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.get(f"http://{host}:{port}{path}", headers=dict(headers or {})) as resp,
    ):
        return resp.status, await resp.text(), dict(resp.headers)
