"""``inferlane serve``: every part wired together and supervised in one place.

Data flows one way. A source publishes Worlds; each publish (and each sidecar connecting
or leaving, since endpoints address connected sidecars) triggers the debouncer; a flush
installs a new :class:`~xds_server.generator.MeshGenerator` in the cache and wakes every
stream, which pulls its snapshot when its push runs.

All long-running parts run as named tasks of one ``asyncio.TaskGroup``: the first failure
cancels the rest and is re-raised, and shutdown stops the gRPC server with a grace period
so open streams end cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from mesh.model import World
from mesh.sources import WorldSource
from xds_server.admin import Admin, serving_admin
from xds_server.cache import ConfigCache
from xds_server.debounce import Debouncer, DebounceSettings
from xds_server.generator import MeshGenerator
from xds_server.server import ServerSettings, XdsServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    manifests: Path | None = None
    kubernetes: bool = False
    host: str = "0.0.0.0"
    #: Istio's ports where one exists (SPEC.md); 0 means any free port.
    xds_port: int = 15010
    admin_port: int = 15014
    ports_file: Path | None = None
    debounce: DebounceSettings = field(default_factory=DebounceSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    #: Seconds open streams get to finish on shutdown.
    shutdown_grace: float = 2.0


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


class ControlPlane:
    """The running control plane: source -> world -> cache -> streams."""

    def __init__(self, settings: ServeSettings, source: WorldSource) -> None:
        self.settings = settings
        self.source = source
        self.cache = ConfigCache()
        self.xds = XdsServer(self.cache, settings=settings.server)
        self.world: World | None = None
        self.debouncer = Debouncer(settings.debounce, self._flush)
        self.xds.on_sidecars_changed = self.debouncer.trigger
        self.admin = Admin(self.xds, services=lambda: describe_world(self.world), ready=self._ready)
        self.ports: dict[str, int] = {}
        self.started = asyncio.Event()

    def _ready(self) -> bool:
        return self.world is not None

    def publish(self, world: World) -> None:
        first = self.world is None
        self.world = world
        for svc in world.services:
            for err in svc.errors:
                log.warning("Service %s/%s: %s", svc.namespace, svc.name, err)
        for src_err in world.source_errors:
            log.warning("input %s: %s", src_err.source, src_err.message)
        if first:
            log.info("first world loaded: %d inference services", len(world.services))
        self.debouncer.trigger()

    async def _flush(self, first_change: float) -> None:
        if self.world is None:
            return
        self.cache.update(MeshGenerator(self.world, self.xds.sidecars()), first_change)
        woken = self.xds.push_all()
        log.debug("generation %d: pushing to %d streams", self.cache.generation, woken)

    async def run(self, on_started: Callable[[dict[str, int]], None] | None = None) -> None:
        s = self.settings
        grpc_server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", s.server.max_request_bytes),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        )
        self.xds.add_to(grpc_server)
        xds_port = grpc_server.add_insecure_port(f"{_host(s.host)}:{s.xds_port}")
        await grpc_server.start()
        try:
            async with serving_admin(self.admin, s.host, s.admin_port) as admin_port:
                self.ports = {"xds": xds_port, "admin": admin_port}
                log.info("serving on %s: %s", s.host, json.dumps(self.ports))
                if s.ports_file is not None:
                    s.ports_file.write_text(json.dumps(self.ports))
                if on_started is not None:
                    on_started(self.ports)
                self.started.set()
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self.source.run(self.publish), name="world-source")
                    tasks.create_task(self.debouncer.run(), name="debouncer")
                    tasks.create_task(grpc_server.wait_for_termination(), name="grpc-server")
        finally:
            await grpc_server.stop(s.shutdown_grace)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def make_source(settings: ServeSettings) -> WorldSource:
    if settings.manifests is not None:
        from mesh.manifests import ManifestSource

        return ManifestSource(settings.manifests)
    if settings.kubernetes:
        from mesh.kube import KubernetesSource, new_api_client

        return KubernetesSource(new_api_client)
    raise ValueError("give --manifests PATH or --kubernetes")


async def serve(settings: ServeSettings) -> None:
    """Run until SIGINT or SIGTERM."""
    plane = ControlPlane(settings, make_source(settings))
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, lambda: task.cancel() if task else None)
    with contextlib.suppress(asyncio.CancelledError):
        await plane.run()
    log.info("stopped")
