"""A gateway (``router~``) routes every inference Service; a sidecar does so over Delta too.

Three Services in two namespaces, two of them opted in. The gateway (State of the World)
and a sidecar (Delta ADS) each reach both inference Services by their cluster names and
not the Service that did not opt in. A Service added to the manifests later is routed by
both without a restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh.manifests import ManifestSource
from routing.names import gateway_listener
from tests.e2e.harness import (
    Client,
    control_plane,
    free_port,
    http_session,
    inference_service,
    model_pod,
    service,
    sidecar,
    write_manifests,
)
from tests.support.backends import echo_server
from tests.support.envoy import require_envoy, running_envoy

pytestmark = pytest.mark.envoy

LLAMA_IP, EMBED_IP, PLAIN_IP, LATE_IP = "127.0.33.1", "127.0.33.2", "127.0.33.3", "127.0.33.4"
GATEWAY_IP, SIDECAR_IP = "127.0.33.10", "127.0.33.11"
GATEWAY_NODE = f"router~{GATEWAY_IP}~ingress-0.ingress~ingress.svc.cluster.local"


async def test_gateway_and_delta_sidecar_route_every_inference_service(tmp_path: Path) -> None:
    require_envoy()
    manifest = tmp_path / "cluster.yaml"
    async with (
        echo_server("llama", host=LLAMA_IP) as llama,
        echo_server("embedder", host=EMBED_IP) as embedder,
        echo_server("plain", host=PLAIN_IP) as plain,
        echo_server("late", host=LATE_IP) as late,
    ):
        objects: list[dict[str, Any]] = [
            inference_service("llama"),
            model_pod("llama-0", app="llama", ip=LLAMA_IP, port=llama.port, gpu=True),
            inference_service("embedder", namespace="ml", port=9000),
            model_pod("embedder-0", app="embedder", ip=EMBED_IP, port=embedder.port,
                      namespace="ml"),
            # A Service that did not opt in: no proxy gets routes for it.
            service("plain", annotations={}, ports=({"name": "http", "port": 8000,
                                                     "targetPort": "http"},)),
            model_pod("plain-0", app="plain", ip=PLAIN_IP, port=plain.port),
        ]  # fmt: skip
        write_manifests(manifest, objects)
        gateway_port = free_port(GATEWAY_IP)
        gateway_meta = {
            "NAMESPACE": "ingress",
            "SERVICE_ACCOUNT": "ingress-gateway",
            "INFERLANE_BIND_ADDRESS": GATEWAY_IP,
            "INFERLANE_GATEWAY_PORT": str(gateway_port),
        }
        sidecar_id, sidecar_meta, outbound = sidecar(SIDECAR_IP, "app-0", namespace="ml")
        async with (
            control_plane(ManifestSource(manifest)) as plane,
            running_envoy(GATEWAY_NODE, plane.ports["xds"], metadata=gateway_meta) as gateway,
            running_envoy(sidecar_id, plane.ports["xds"], delta=True, metadata=sidecar_meta),
            http_session() as session,
        ):
            assert await gateway.listener_port(gateway_listener(GATEWAY_IP, gateway_port))
            via_gateway = Client(session, GATEWAY_IP, gateway_port)
            via_sidecar = Client(session, SIDECAR_IP, outbound)
            routes = {
                via_gateway: {
                    "llama.default.svc.cluster.local:8000": "llama",
                    "llama.default": "llama",
                    "embedder.ml.svc.cluster.local:9000": "embedder",
                    "embedder.ml.svc:9000": "embedder",
                },
                via_sidecar: {
                    "llama.default.svc.cluster.local:8000": "llama",
                    "embedder:9000": "embedder",  # the short name, in the sidecar's namespace
                    "embedder.ml": "embedder",
                },
            }
            for client, table in routes.items():
                for authority, backend in table.items():
                    await client.wait_served_by(authority, [backend])
                # Every class of every Service, and nothing for the Service that opted out.
                for authority, backend in table.items():
                    for cls in ("critical", "standard", "sheddable", None):
                        assert await client.served(authority, cls, count=2) == [backend] * 2
                assert await client.served("plain.default.svc.cluster.local:8000") == ["<404>"] * 10
            assert plain.requests == 0

            # Both proxies are served by the same plane, one per mode.
            modes = {c.proxy.node_id: c.delta for c in plane.xds.connections.values()}
            assert modes == {GATEWAY_NODE: False, sidecar_id: True}

            # A Service added later is routed by both, over both protocols.
            objects += [
                inference_service("late"),
                model_pod("late-0", app="late", ip=LATE_IP, port=late.port),
            ]
            write_manifests(manifest, objects)
            for client in routes:
                await client.wait_served_by("late.default.svc.cluster.local:8000", ["late"])
            assert late.requests >= 12
