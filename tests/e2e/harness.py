"""Shared pieces of the end-to-end tests: manifests on disk, a control plane, sidecars.

Each test module uses loopback addresses of its own (``127.0.3N.x``) as pod IPs, so
modules never clash with each other or with the benchmark mesh (127.0.10.x to 127.0.12.x).
Backends listen on an ephemeral port of their pod IP; the manifests name that port as the
Pod's container port ``http``, and the Service's ``targetPort`` is the name, as it is for a
Deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.envoy import Envoy
from bench.testbed import free_port, free_ports
from bench.wait import eventually
from mesh.model import PRIORITY_HEADER, World
from mesh.sources import Publish, WorldSource
from tests.mesh.objects import gpu_limits, node, pod, service
from xds_server.app import ControlPlane, ServeSettings

__all__ = [
    "Client",
    "CountingSource",
    "control_plane",
    "envoy_versions",
    "free_port",
    "free_ports",
    "gpu_limits",
    "header",
    "http_session",
    "inference_service",
    "metric",
    "model_pod",
    "node",
    "pod",
    "pushes",
    "service",
    "sidecar",
    "write_manifests",
]

SERVICE_PORT = 8000
#: The named container port every model pod serves on.
PORT_NAME = "http"


# --- manifests ---------------------------------------------------------------------------


def inference_service(
    name: str,
    *,
    namespace: str = "default",
    annotations: Mapping[str, str] | None = None,
    port: int = SERVICE_PORT,
) -> dict[str, Any]:
    """An enabled Service selecting ``app: NAME``, its port targeting the named pod port."""
    return service(
        name,
        namespace=namespace,
        annotations={"inferlane.io/enabled": "true", **(annotations or {})},
        ports=({"name": PORT_NAME, "port": port, "targetPort": PORT_NAME},),
    )


def model_pod(
    name: str,
    *,
    app: str,
    ip: str,
    port: int,
    gpu: bool = False,
    ready: bool = True,
    namespace: str = "default",
    node_name: str = "",
) -> dict[str, Any]:
    """A model server Pod at ``ip:port``; ``gpu`` makes it request ``nvidia.com/gpu``."""
    return pod(
        name,
        namespace=namespace,
        labels={"app": app},
        ip=ip,
        ready=ready,
        node=node_name,
        service_account=app,
        resources=gpu_limits() if gpu else {"requests": {"cpu": "4"}},
        ports=({"name": PORT_NAME, "containerPort": port, "protocol": "TCP"},),
    )


def write_manifests(path: Path, objects: Iterable[Mapping[str, Any]]) -> None:
    """Write ``objects`` as one ``kind: List`` document, as ``kubectl get -o yaml`` does.

    Written to a temporary file and renamed into place, so the source never reads half a
    file (a replace changes the inode, which the source notices).
    """
    document = {"apiVersion": "v1", "kind": "List", "items": [dict(o) for o in objects]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(document, sort_keys=False))
    os.replace(tmp, path)


# --- the control plane -------------------------------------------------------------------


def loopback_settings() -> ServeSettings:
    """Plaintext xDS and admin on ephemeral loopback ports; no TLS port, no RLS port."""
    return ServeSettings(host="127.0.0.1", xds_port=0, admin_port=0, shutdown_grace=0.2)


@contextlib.asynccontextmanager
async def control_plane(
    source: WorldSource, settings: ServeSettings | None = None, **kwargs: Any
) -> AsyncIterator[ControlPlane]:
    """A ControlPlane serving ``source``, in this event loop (``kwargs`` go to it).

    Yields once the first World is loaded; cancels and awaits the plane on exit.
    """
    plane = ControlPlane(settings or loopback_settings(), source, **kwargs)
    task = asyncio.create_task(plane.run(), name="test-control-plane")

    async def loaded() -> bool:
        if task.done():
            task.result()  # re-raise the plane's failure
            raise AssertionError("the control plane stopped")
        return plane.started.is_set() and plane.world is not None

    try:
        await eventually(loaded, timeout=20, what="the control plane's first world")
        yield plane
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def admin_text(plane: ControlPlane, path: str) -> str:
    """GET an admin page of ``plane``; it must answer 200."""
    url = f"http://127.0.0.1:{plane.ports['admin']}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200, resp.status
        return await resp.text()


def metric(plane: ControlPlane, name: str, **labels: str) -> float:
    """One sample of the plane's xDS metrics (0 when the labelled series does not exist)."""
    value = plane.xds.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def pushes(plane: ControlPlane) -> dict[str, float]:
    """``inferlane_xds_pushes_total`` per type (types never pushed are left out)."""
    out: dict[str, float] = {}
    for family in plane.xds.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "inferlane_xds_pushes_total":
                out[sample.labels["type"]] = sample.value
    return out


# --- sidecars ----------------------------------------------------------------------------


def sidecar(
    ip: str, pod_name: str, *, namespace: str = "default", service_account: str = "default"
) -> tuple[str, dict[str, str], int]:
    """(node ID, node metadata, outbound port) of a sidecar bound to ``ip``."""
    node_id = f"sidecar~{ip}~{pod_name}.{namespace}~{namespace}.svc.cluster.local"
    outbound, inbound = free_ports(ip, 2)
    metadata = {
        "NAMESPACE": namespace,
        "SERVICE_ACCOUNT": service_account,
        "INFERLANE_BIND_ADDRESS": ip,
        # Pods share this host's loopback: each workload listens on its own pod IP.
        "INFERLANE_WORKLOAD_ADDRESS": ip,
        "INFERLANE_OUTBOUND_PORT": str(outbound),
        "INFERLANE_INBOUND_PORT": str(inbound),
    }
    return node_id, metadata, outbound


class Client:
    """HTTP requests into one proxy listener, over one kept-alive session."""

    def __init__(self, session: aiohttp.ClientSession, host: str, port: int) -> None:
        self.session = session
        self.url = f"http://{host}:{port}"

    async def get(
        self, authority: str, priority: str | None = None, path: str = "/v1/completions"
    ) -> tuple[int, str]:
        """(status, backend name) of one request; the name is the body of a 200."""
        headers = {"Host": authority}
        if priority is not None:
            headers[PRIORITY_HEADER] = priority
        async with self.session.get(self.url + path, headers=headers) as resp:
            body = await resp.text()
            return resp.status, body if resp.status == 200 else ""

    async def served(
        self, authority: str, priority: str | None = None, count: int = 10
    ) -> list[str]:
        """The backend of each of ``count`` requests (``"<status>"`` for a failure)."""
        out = []
        for _ in range(count):
            status, body = await self.get(authority, priority)
            out.append(body if status == 200 else f"<{status}>")
        return out

    async def wait_served_by(
        self,
        authority: str,
        expected: Sequence[str],
        *,
        priority: str | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline
    ) -> None:
        """Poll until every request of a batch lands on one of ``expected``."""

        async def only_expected() -> bool:
            seen = await self.served(authority, priority, count=20)
            return set(seen) <= set(expected)

        await eventually(
            only_expected, timeout=timeout, what=f"{authority} {priority} served by {expected}"
        )


@contextlib.asynccontextmanager
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, its name matched without case."""
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


async def envoy_versions(envoy: Envoy) -> dict[tuple[str, str], str]:
    """``version_info`` of every dynamic resource Envoy holds, by (kind, name)."""
    dump = await envoy.admin_json("/config_dump?include_eds")
    out: dict[tuple[str, str], str] = {}
    for config in dump["configs"]:
        for entry in config.get("dynamic_listeners", []):
            out[("listener", entry["name"])] = entry["active_state"]["version_info"]
        for entry in config.get("dynamic_active_clusters", []):
            out[("cluster", entry["cluster"]["name"])] = entry["version_info"]
        for entry in config.get("dynamic_route_configs", []):
            out[("route", entry["route_config"]["name"])] = entry["version_info"]
        for entry in config.get("dynamic_endpoint_configs", []):
            name = entry["endpoint_config"]["cluster_name"]
            out[("endpoints", name)] = entry.get("version_info", "")
        for entry in config.get("dynamic_active_secrets", []):
            out[("secret", entry["name"])] = entry["version_info"]
    return out


class CountingSource:
    """Wraps a WorldSource and counts the Worlds it publishes (each one is a change)."""

    def __init__(self, inner: WorldSource) -> None:
        self.inner = inner
        self.published = 0

    async def run(self, publish: Publish) -> None:
        def counted(world: World) -> None:
            self.published += 1
            publish(world)

        await self.inner.run(counted)
