"""Shared pieces of the rate-limit end-to-end tests: a control plane with rate-limit settings.

Pod IPs are loopback addresses of each module's own (``127.0.7N.x``), so modules never clash
with ``tests/e2e`` (127.0.3N.x), ``tests/e2e_mtls`` (127.0.5N.x) or the demo. Manifests,
sidecars and clients come from the mTLS harness: backends are reached through their own
sidecar over mTLS, as in a real mesh.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from google.protobuf import json_format

from bench.envoy import Envoy
from bench.gpu_sim import RunningSim, SimConfig, StepCost, start_sim
from mesh.manifests import ManifestSource
from mesh.model import PRIORITY_HEADER
from tests.e2e import harness as e2e
from tests.e2e_mtls.harness import (
    SERVICE_PORT,
    Sidecar,
    inference_service,
    running,
    workload_pod,
    write_manifests,
)
from tests.support.wait import eventually
from xds_server.ads.debounce import DebounceSettings
from xds_server.app import ControlPlane, ServeSettings
from xds_server.auth.settings import SecuritySettings
from xds_server.rls.runtime import RateLimitSettings

LOCAL_FILTER = "envoy.filters.http.local_ratelimit"
LLAMA = f"llama:{SERVICE_PORT}"


def serve_settings(ca_dir: Path, ratelimit: RateLimitSettings) -> ServeSettings:
    return ServeSettings(
        host="127.0.0.1",
        xds_port=0,
        admin_port=0,
        debounce=DebounceSettings(quiet=0.02, max_delay=0.2),
        shutdown_grace=0.2,
        security=SecuritySettings(ca_dir=ca_dir),
        ratelimit=ratelimit,
    )


def control_plane(
    manifest: Path, settings: ServeSettings
) -> contextlib.AbstractAsyncContextManager[ControlPlane]:
    """A ControlPlane on ``manifest``, in this event loop; yields once its world is loaded."""
    return e2e.control_plane(ManifestSource(manifest, poll_interval=0.05), settings)


admin_get = e2e.admin_text


def sample(metrics_text: str, name: str, **labels: str) -> float | None:
    """One sample of a Prometheus text page (None when the series is absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


async def inbound_bucket_ms(envoy: Envoy, priority: str) -> float | None:
    """Milliseconds per token of ``priority``'s bucket on Envoy's inbound route config, as
    Envoy holds it (None when it has none): fill interval over tokens per fill."""
    dump = await envoy.admin_json("/config_dump?resource=dynamic_route_configs")
    for entry in dump.get("configs", []):
        config = entry.get("route_config", {})
        if config.get("name") != "inbound":
            continue
        for vhost in config.get("virtual_hosts", []):
            packed = vhost.get("typed_per_filter_config", {}).get(LOCAL_FILTER)
            if packed is None:
                continue
            limit = local_rate_limit_pb2.LocalRateLimit()
            body = {k: v for k, v in packed.items() if k != "@type"}
            json_format.ParseDict(body, limit)
            for d in limit.descriptors:
                if d.entries[0].value == priority:
                    bucket = d.token_bucket
                    return float(
                        bucket.fill_interval.ToMilliseconds() / bucket.tokens_per_fill.value
                    )
    return None


async def inbound_cap(envoy: Envoy, priority: str) -> int | None:
    """The most requests of ``priority`` the sidecar's inbound cluster admits at once, as
    Envoy holds it (its DEFAULT circuit-breaker threshold); None without that cluster."""
    dump = await envoy.admin_json("/config_dump?resource=dynamic_active_clusters")
    for entry in dump.get("configs", []):
        cluster = entry.get("cluster", {})
        name = cluster.get("name", "")
        if name.startswith("inbound|") and name.split("|")[2] == priority:
            thresholds = cluster.get("circuit_breakers", {}).get("thresholds", [{}])
            return int(thresholds[0].get("max_requests", 1024))
    return None


async def rds_updates(envoy: Envoy, route_config: str = "inbound") -> int:
    """Updates of one route configuration Envoy accepted over its lifetime. (A SotW route
    response carries every route configuration, so each subscription counts each push.)"""
    stats = await envoy.stats("rds")
    return sum(v for k, v in stats.items() if k.endswith(f".rds.{route_config}.update_success"))


def statuses(results: list[tuple[int, Any]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for status, _ in results:
        out[status] = out.get(status, 0) + 1
    return out


# --- a mesh with a simulated model server and callers, for token budgets and refusals ---


@dataclass
class Caller:
    """A client pod's sidecar, started."""

    sidecar: Sidecar
    envoy: Envoy

    @property
    def url(self) -> str:
        return f"http://{self.sidecar.ip}:{self.sidecar.outbound_port}"

    def openai(self, host: str = LLAMA) -> openai.AsyncOpenAI:
        """The official OpenAI client, calling ``host`` through this sidecar."""
        return openai.AsyncOpenAI(
            base_url=self.url + "/v1",
            api_key="none",
            max_retries=0,
            timeout=30.0,
            default_headers={"Host": host},
        )


@dataclass
class ModelMesh:
    """Control plane replicas (each with its rate-limit service), simulated model pods and
    callers."""

    planes: list[ControlPlane]
    sims: dict[str, RunningSim]
    callers: dict[str, Caller]
    #: Each Service's pod's own sidecar, when asked for.
    backends: dict[str, Caller]

    @property
    def plane(self) -> ControlPlane:
        return self.planes[0]

    def sample(self, name: str, **labels: str) -> float:
        """One sample of the rate-limit metrics, summed over the replicas (0 when the
        series does not exist)."""
        values = (p.ratelimits.registry.get_sample_value(name, labels) for p in self.planes)
        return float(sum(v for v in values if v is not None))


@contextlib.asynccontextmanager
async def model_mesh(
    tmp_path: Path,
    services: Mapping[str, tuple[str, Mapping[str, str]]],
    callers: Mapping[str, str],
    *,
    limits: RateLimitSettings | None = None,
    replicas: int = 1,
    step_ms: float = 1.0,
    backend_sidecars: bool = False,
    delta: bool = False,
) -> AsyncIterator[ModelMesh]:
    """``services``: name -> (its pod's IP, annotations), each backed by one simulated
    GPU pod (``NAME-0``, serving model ``NAME``); ``callers``: pod name -> IP, each with a
    sidecar whose service account is the pod name without its ``-N`` suffix, connected
    to the control plane replicas in turn (they share one CA). With ``backend_sidecars``,
    each model pod has a sidecar too (service account: the Service's name), through which
    callers reach it over mTLS. Callers speak Delta ADS with ``delta``, else SotW. Yields
    once every caller is routed to every Service."""
    manifest = tmp_path / "mesh.yaml"
    async with contextlib.AsyncExitStack() as stack:
        sims: dict[str, RunningSim] = {}
        objects: list[dict[str, Any]] = []
        for name, (ip, annotations) in services.items():
            sim = await stack.enter_async_context(
                await start_sim(
                    SimConfig(name=f"{name}-0", host=ip, model=name, cost=StepCost.flat(step_ms))
                )
            )
            sims[name] = sim
            objects.append(inference_service(name, annotations))
            objects.append(
                workload_pod(f"{name}-0", ip=ip, service_account=name, app=name, port=sim.port)
            )
        for pod_name, ip in callers.items():
            objects.append(workload_pod(pod_name, ip=ip, service_account=_account(pod_name)))
        write_manifests(manifest, objects)
        settings = serve_settings(tmp_path / "ca", limits or RateLimitSettings(rls_port=0))
        planes = [
            await stack.enter_async_context(control_plane(manifest, settings))
            for _ in range(replicas)
        ]
        started: dict[str, Caller] = {}
        for i, (pod_name, ip) in enumerate(callers.items()):
            sidecar = Sidecar(ip, pod_name)
            xds_port = planes[i % replicas].ports["xds"]
            opts = sidecar.options(xds_port, service_account=_account(pod_name), delta=delta)
            started[pod_name] = Caller(sidecar, await stack.enter_async_context(running(opts)))
        backends: dict[str, Caller] = {}
        for name, (ip, _) in services.items() if backend_sidecars else ():
            sidecar = Sidecar(ip, f"{name}-0")
            opts = sidecar.options(planes[0].ports["xds"], service_account=name)
            backends[name] = Caller(sidecar, await stack.enter_async_context(running(opts)))
        async with aiohttp.ClientSession() as session:
            for caller in started.values():
                for name in services:

                    async def routed(caller: Caller = caller, name: str = name) -> bool:
                        return await _routed(session, caller, name)

                    await eventually(
                        routed, timeout=20, what=f"{caller.sidecar.pod_name} routed to {name}"
                    )
        yield ModelMesh(planes, sims, started, backends)


def _account(pod_name: str) -> str:
    return pod_name.rsplit("-", 1)[0]


async def _routed(session: aiohttp.ClientSession, caller: Caller, service: str) -> bool:
    """A GET of the model list (no body: no token is reserved or charged) reaches it."""
    headers = {"Host": f"{service}:{SERVICE_PORT}", PRIORITY_HEADER: "critical"}
    async with session.get(caller.url + "/v1/models", headers=headers) as resp:
        return resp.status == 200
