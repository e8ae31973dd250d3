"""``inferlane describe`` against a running control plane with real sidecars connected.

``llama`` has a GPU pod (its sidecar connected, so it is reached through the sidecar) and a
CPU pod (no sidecar: reached directly), names ``default/chat-frontend`` as its critical
caller and is adaptive with a rate limit. The command reads ``/debug/describe`` over HTTP,
as it would through a port-forward.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from mesh.manifests import ManifestSource
from mesh.model import Priority
from routing.names import outbound_cluster
from tests.e2e.harness import (
    control_plane,
    inference_service,
    model_pod,
    pod,
    sidecar,
    write_manifests,
)
from tests.support.backends import echo_server
from tests.support.envoy import Envoy, require_envoy, running_envoy
from tests.support.wait import eventually
from xds_server.cli import main

pytestmark = pytest.mark.envoy

GPU, CPU, CHAT = "127.0.61.1", "127.0.61.2", "127.0.61.10"
HOST = "llama.default.svc.cluster.local"


async def envoy_clusters(
    envoy: Envoy,
) -> dict[str, tuple[dict[str, int], dict[str, tuple[int, int]]]]:
    """Per llama cluster in Envoy: max_requests per routing priority, and each host's
    (EDS priority, weight), from Envoy's own admin pages."""
    dump = await envoy.admin_json("/config_dump?resource=dynamic_active_clusters")
    breakers: dict[str, dict[str, int]] = {}
    for entry in dump.get("configs", []):
        cluster = entry["cluster"]
        thresholds = cluster.get("circuit_breakers", {}).get("thresholds", [])
        breakers[cluster["name"]] = {
            t.get("priority", "DEFAULT"): int(t["max_requests"]) for t in thresholds
        }
    status = await envoy.admin_json("/clusters?format=json")
    out = {}
    for cluster in status["cluster_statuses"]:
        if HOST not in cluster["name"] or cluster["name"] not in breakers:
            continue
        hosts = {
            f"{h['address']['socket_address']['address']}:"
            f"{h['address']['socket_address']['port_value']}": (
                int(h.get("priority", 0)),
                int(h.get("weight", 1)),
            )
            for h in cluster.get("host_statuses", [])
        }
        out[cluster["name"]] = (breakers[cluster["name"]], hosts)
    return out


def describe(admin: str, *argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["describe", *argv, "--admin", admin])
    out, err = capsys.readouterr()
    return code, out, err


async def test_describe_service_and_pods(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_envoy()
    manifest = tmp_path / "cluster.yaml"
    annotations = {
        "inferlane.io/critical-callers": "default/chat-frontend",
        "inferlane.io/rate-limit": "sheddable=5",
        "inferlane.io/adaptive": "true",
        "inferlane.io/max-concurrency": "4",
        "inferlane.io/timeout": "critical=30s",
        "inferlane.io/token-budget": "*=20000/m",
    }
    async with echo_server("gpu-0", host=GPU) as gpu, echo_server("cpu-0", host=CPU) as cpu:
        chat = pod("chat-0", labels={"app": "chat"}, ip=CHAT, service_account="chat-frontend")
        write_manifests(
            manifest,
            [
                inference_service("llama", annotations=annotations),
                model_pod("gpu-0", app="llama", ip=GPU, port=gpu.port, gpu=True),
                model_pod("cpu-0", app="llama", ip=CPU, port=cpu.port),
                chat,
            ],
        )
        gpu_id, gpu_meta, _ = sidecar(GPU, "gpu-0", service_account="llama")
        chat_id, chat_meta, _ = sidecar(CHAT, "chat-0", service_account="chat-frontend")
        async with (
            control_plane(ManifestSource(manifest)) as plane,
            running_envoy(gpu_id, plane.ports["xds"], metadata=gpu_meta),
            running_envoy(chat_id, plane.ports["xds"], metadata=chat_meta) as client,
        ):
            admin = f"http://127.0.0.1:{plane.ports['admin']}"

            async def service_json() -> dict[str, Any]:
                code, out, _ = await asyncio.to_thread(
                    describe, admin, "service", "llama.default", "-o", "json", capsys=capsys
                )
                assert code == 0
                view: dict[str, Any] = json.loads(out)
                return view

            async def settled() -> bool:
                view = await service_json()
                endpoints = view["ports"][0]["classes"][0]["endpoints"]
                via = {e["pod"]: e["via_sidecar"] for e in endpoints}
                acked = [p for p in view["proxies"] if p["types"].get("LDS", {}).get("status")]
                return via == {"default/gpu-0": True, "default/cpu-0": False} and bool(acked)

            await eventually(settled, timeout=20, what="the GPU pod's sidecar in the config")
            view = await service_json()

            # Classes and clusters, with their timeouts and circuit breakers.
            (port,) = view["ports"]
            assert [c["class"] for c in port["classes"]] == ["critical", "standard", "sheddable"]
            critical = port["classes"][0]
            assert critical["cluster"] == outbound_cluster(8000, Priority.CRITICAL, HOST)
            assert critical["timeout_s"] == 30
            # GPU first at EDS priority 0 through its sidecar; the CPU pod is the fallback.
            tiers = {(e["pod"], e["tier"], e["eds_priority"]) for e in critical["endpoints"]}
            assert tiers == {("default/gpu-0", "gpu", 0), ("default/cpu-0", "fallback", 1)}
            assert port["excluded"] == []
            # What the page says is what the client's Envoy runs: thresholds, hosts, their
            # priorities and weights, per class.
            expected = {
                cls["cluster"]: (
                    {p: t["max_requests"] for p, t in cls["circuit_breakers"].items()},
                    {e["address"]: (e["eds_priority"], e["weight"]) for e in cls["endpoints"]},
                )
                for cls in port["classes"]
            }

            async def envoy_runs_the_page() -> bool:
                # The client may still be warming the clusters the page already shows.
                envoy_view = await envoy_clusters(client)
                return {name: envoy_view.get(name) for name in expected} == expected

            await eventually(envoy_runs_the_page, timeout=20, what="the client Envoy's clusters")

            limits = view["limits"]
            assert limits["rate_limit"] == {"sheddable": 5.0}
            assert limits["max_concurrency"] == 4
            assert limits["token_budgets"] == [{"budget": "*", "tokens": 20000, "window_s": 60}]
            assert {e["pod"]: e["rates"] for e in limits["endpoints"]} == {
                "default/gpu-0": {"sheddable": 5.0},
                "default/cpu-0": {"sheddable": 5.0},
            }

            # The adaptive loop scrapes the pods; echo servers have no vLLM metrics, so the
            # controller's state says so.
            async def adaptive_state() -> list[dict[str, Any]]:
                states: list[dict[str, Any]] = (await service_json())["limits"]["adaptive_state"]
                return [s for s in states if s.get("last_error")]

            states = await eventually(adaptive_state, timeout=20, what="adaptive state")
            assert {s["endpoint"] for s in states} <= {
                f"default/gpu-0:{gpu.port}",
                f"default/cpu-0:{cpu.port}",
            }

            callers = view["critical_callers"]
            assert callers["entries"] == ["default/chat-frontend"]
            assert callers["pods"] == ["default/chat-0"]
            assert [p["node_id"] for p in view["proxies"]] == [gpu_id]

            # The text form names the same things, for people.
            code, text, _ = await asyncio.to_thread(
                describe, admin, "service", "llama", capsys=capsys
            )
            assert code == 0
            assert "Service: default/llama" in text
            assert outbound_cluster(8000, Priority.CRITICAL, HOST) in text
            assert "sidecar (mTLS)" in text and "fallback" in text
            assert "default/chat-frontend; pods: default/chat-0" in text
            assert "token budgets per caller: *=20000/m" in text
            assert gpu_id in text

            # A backend pod: where it sits in each class, and its proxy.
            code, out, _ = await asyncio.to_thread(
                describe, admin, "pod", "gpu-0.default", "-o", "json", capsys=capsys
            )
            gpu_view = json.loads(out)
            (backed,) = gpu_view["backs"]
            assert backed["service"] == "default/llama"
            cls = backed["ports"][0]["classes"][0]
            assert [(e["tier"], e["eds_priority"]) for e in cls["endpoints"]] == [("gpu", 0)]
            assert gpu_view["sidecar_declared"] is False  # the manifest does not inject it
            assert [p["node_id"] for p in gpu_view["proxies"]] == [gpu_id]

            # A caller: which Services it may send critical to.
            code, out, _ = await asyncio.to_thread(
                describe, admin, "pod", "chat-0", "-o", "json", capsys=capsys
            )
            chat_view = json.loads(out)
            assert chat_view["critical"] == {
                "allowed": ["default/llama"],
                "lowered_to_standard": [],
            }
            assert chat_view["backs"] == []

            # Unknown objects and a bad query are refused with a reason.
            code, _, err = await asyncio.to_thread(
                describe, admin, "service", "nope.default", capsys=capsys
            )
            assert code == 1
            assert "no inference Service default/nope" in err
