"""A bad annotation is reported and served at its default; no other Service changes.

``mistral`` starts with good annotations, then its manifest gets a bad default class and
a bad timeout. The errors show in ``/debug/services`` and the log; Envoy serves mistral
with those two annotations at their defaults; and every resource of ``llama`` keeps its
version, as the control plane's own config dump for the sidecar shows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.envoy import Envoy
from mesh.manifests import ManifestSource
from mesh.model import PRIORITY_HEADER
from tests.e2e.harness import (
    Client,
    control_plane,
    header,
    http_session,
    inference_service,
    model_pod,
    sidecar,
    write_manifests,
)
from tests.support.backends import echo_server
from tests.support.envoy import require_envoy, running_envoy
from tests.support.wait import eventually

pytestmark = pytest.mark.envoy

LLAMA_IP, MISTRAL_IP, CLIENT = "127.0.34.1", "127.0.34.2", "127.0.34.10"
LLAMA_HOST = "llama.default.svc.cluster.local"
MISTRAL_HOST = "mistral.default.svc.cluster.local"
GOOD = {"inferlane.io/default-priority": "sheddable", "inferlane.io/timeout": "critical=30s"}
BAD = {"inferlane.io/default-priority": "urgent", "inferlane.io/timeout": "critical=soon"}


def _objects(ports: dict[str, int], mistral: dict[str, str]) -> list[dict[str, Any]]:
    return [
        inference_service("llama", annotations={"inferlane.io/timeout": "critical=10s"}),
        model_pod("llama-0", app="llama", ip=LLAMA_IP, port=ports["llama"], gpu=True),
        inference_service("mistral", annotations=mistral),
        model_pod("mistral-0", app="mistral", ip=MISTRAL_IP, port=ports["mistral"], gpu=True),
    ]


async def _admin(session: aiohttp.ClientSession, port: int, path: str) -> Any:
    async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def _versions(dump: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {
        (kind, name): entry["version"]
        for kind, by_name in dump["resources"].items()
        for name, entry in by_name.items()
    }


def _vhost(dump: dict[str, Any], route: str, name: str) -> dict[str, Any]:
    config = dump["resources"]["RDS"][route]["resource"]
    (found,) = [v for v in config["virtual_hosts"] if v["name"] == name]
    return dict(found)


async def _envoy_route_timeout(envoy: Envoy, vhost: str, route: str) -> str | None:
    """The class timeout of one route as Envoy holds it: the route's idle timeout."""
    dump = await envoy.admin_json("/config_dump?resource=dynamic_route_configs")
    for config in dump["configs"]:
        for host in config["route_config"].get("virtual_hosts", []):
            if host["name"] == vhost:
                for entry in host["routes"]:
                    if entry["name"] == route:
                        return str(entry["route"]["idle_timeout"])
    return None


async def test_bad_annotation_is_reported_and_isolated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_envoy()
    caplog.set_level(logging.WARNING)
    manifest = tmp_path / "cluster.yaml"
    async with (
        echo_server("llama", host=LLAMA_IP) as llama,
        echo_server("mistral", host=MISTRAL_IP) as mistral,
    ):
        ports = {"llama": llama.port, "mistral": mistral.port}
        write_manifests(manifest, _objects(ports, GOOD))
        node_id, metadata, outbound = sidecar(CLIENT, "app-0")
        dump_path = f"/debug/config_dump?proxy={node_id}"
        async with (
            control_plane(ManifestSource(manifest)) as plane,
            running_envoy(node_id, plane.ports["xds"], metadata=metadata) as envoy,
            http_session() as session,
        ):
            admin = plane.ports["admin"]
            client = Client(session, CLIENT, outbound)
            await client.wait_served_by(f"{LLAMA_HOST}:8000", ["llama"])
            await client.wait_served_by(f"{MISTRAL_HOST}:8000", ["mistral"])
            mistral.headers.clear()
            await client.get(f"{MISTRAL_HOST}:8000")
            assert header(mistral.headers[-1], PRIORITY_HEADER) == "sheddable"
            assert await _envoy_route_timeout(envoy, f"{MISTRAL_HOST}:8000", "critical") == "30s"
            before = await _admin(session, admin, dump_path)
            assert not [r for r in caplog.records if "inferlane.io/" in r.getMessage()]

            write_manifests(manifest, _objects(ports, BAD))

            # Reported on /debug/services, mistral alone, each bad value with its reason.
            async def reported() -> dict[str, Any]:
                listing = await _admin(session, admin, "/debug/services")
                return {s["name"]: s for s in listing["services"] if s["errors"]}

            erring = await eventually(reported, timeout=5, what="the errors on /debug/services")
            assert list(erring) == ["mistral"]
            bad = {e["annotation"]: e for e in erring["mistral"]["errors"]}
            assert set(bad) == set(BAD)
            assert bad["inferlane.io/timeout"]["value"] == "critical=soon"
            assert bad["inferlane.io/default-priority"]["message"]
            assert erring["mistral"]["config"]["default_priority"] == "standard"
            assert erring["mistral"]["config"]["timeouts"] == {}

            # ...and in the log.
            logged = [r.getMessage() for r in caplog.records if "mistral" in r.getMessage()]
            for annotation in BAD:
                assert any(annotation in line for line in logged), logged

            # Served at the defaults: the default class, and 300 s for critical.
            async def defaults_live() -> bool:
                timeout = await _envoy_route_timeout(envoy, f"{MISTRAL_HOST}:8000", "critical")
                return timeout == "300s"

            await eventually(defaults_live, timeout=5, what="mistral at its default timeout")
            mistral.headers.clear()
            assert await client.served(f"{MISTRAL_HOST}:8000", count=3) == ["mistral"] * 3
            assert {header(h, PRIORITY_HEADER) for h in mistral.headers} == {"standard"}

            # No other Service changed: llama's clusters and endpoints keep their versions,
            # and its virtual host in the shared route configuration is byte-for-byte equal.
            after = await _admin(session, admin, dump_path)
            assert after["generation"] > before["generation"]
            old, new = _versions(before), _versions(after)
            assert old.keys() == new.keys()
            changed = {key for key in old if old[key] != new[key]}
            assert changed == {("RDS", "outbound")}
            llama_vhost = f"{LLAMA_HOST}:8000"
            assert _vhost(after, "outbound", llama_vhost) == _vhost(before, "outbound", llama_vhost)
            assert _vhost(after, "outbound", f"{MISTRAL_HOST}:8000") != _vhost(
                before, "outbound", f"{MISTRAL_HOST}:8000"
            )
            assert await client.served(f"{LLAMA_HOST}:8000", "critical", count=3) == ["llama"] * 3
