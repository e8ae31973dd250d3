"""Shared pieces of the admission, retry and streaming tests: a mesh of simulated GPU pods.

Each pod is a simulated vLLM server (``bench.gpu_sim``, fixed step cost, so a request's
length is exact) behind its own sidecar, reached over mTLS as in a real mesh; callers are
sidecars of client pods. Pod IPs are loopback addresses of each module's own
(``127.0.9N.x``), apart from ``tests/e2e`` (127.0.3N.x), ``tests/e2e_mtls`` (127.0.5N.x)
and ``tests/e2e_ratelimit`` (127.0.7N.x). What a pod holds is read from the pod itself
(``/sim/stats``), never from the proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.envoy import Envoy
from bench.gpu_sim import RunningSim, SimConfig, StepCost, start_sim
from bench.testbed import free_port
from mesh.model import PRIORITY_HEADER
from tests.e2e_mtls.harness import (
    SERVICE_PORT,
    Sidecar,
    inference_service,
    llama_pod,
    running,
    workload_pod,
    write_manifests,
)
from tests.e2e_ratelimit.harness import control_plane, serve_settings
from tests.support.wait import eventually
from xds_server.app import ControlPlane
from xds_server.rls.runtime import RateLimitSettings
from xds_server.sidecar.bootstrap import BootstrapOptions

LLAMA = f"llama:{SERVICE_PORT}"
GATEWAY_POD = "gateway-0"
INBOUND_CLUSTER = f"inbound|{SERVICE_PORT}|{{}}|llama.default.svc.cluster.local"
OUTBOUND_CLUSTER = f"outbound|{SERVICE_PORT}|{{}}|llama.default.svc.cluster.local"


def sim(name: str, ip: str, step_ms: float = 20.0, **config: Any) -> SimConfig:
    """A GPU pod whose every engine step (one token per sequence) takes ``step_ms``."""
    return SimConfig(name=name, host=ip, cost=StepCost.flat(step_ms), **config)


def sidecar_options(
    sidecar: Sidecar, xds_port: int, service_account: str, *, delta: bool = False
) -> BootstrapOptions:
    """The sidecar's bootstrap; its workload listens on the pod IP (pods share this host's
    loopback), so that is where the inbound side forwards."""
    opts = sidecar.options(xds_port, service_account=service_account, delta=delta)
    metadata = {**opts.metadata, "INFERLANE_WORKLOAD_ADDRESS": sidecar.ip}
    return dataclasses.replace(opts, metadata=metadata)


def gateway_options(ip: str, port: int, xds_port: int) -> BootstrapOptions:
    """A gateway (``router``) of the ``default`` namespace listening on ``ip:port``."""
    return BootstrapOptions(
        node_id=f"router~{ip}~{GATEWAY_POD}.default~default.svc.cluster.local",
        xds_port=xds_port,
        admin_port=0,
        metadata={
            "NAMESPACE": "default",
            "SERVICE_ACCOUNT": "gateway",
            "INFERLANE_BIND_ADDRESS": ip,
            "INFERLANE_GATEWAY_PORT": str(port),
        },
    )


@dataclass
class Mesh:
    """A running control plane, GPU pods with their sidecars, and caller sidecars."""

    plane: ControlPlane
    pods: dict[str, RunningSim]
    pod_sidecars: dict[str, Sidecar]
    pod_envoys: dict[str, Envoy]
    callers: list[Sidecar]
    caller_envoys: list[Envoy] = field(default_factory=list)
    #: The gateway's listener, when the mesh has one.
    gateway_url: str = ""

    def caller_url(self, index: int = 0) -> str:
        caller = self.callers[index]
        return f"http://{caller.ip}:{caller.outbound_port}"

    def inbound_url(self, pod: str) -> str:
        """A pod's sidecar, reached directly (its plaintext chain: llama is permissive)."""
        sidecar = self.pod_sidecars[pod]
        return f"http://{sidecar.ip}:{sidecar.inbound_port}"


@contextlib.asynccontextmanager
async def mesh(
    tmp_path: Path,
    annotations: Mapping[str, str],
    pods: Sequence[SimConfig],
    caller_ips: Sequence[str],
    *,
    gateway_ip: str = "",
    ratelimit: RateLimitSettings | None = None,
) -> AsyncIterator[Mesh]:
    """Start ``pods`` and their sidecars, a sidecar per caller IP (every other one on
    Delta ADS), a gateway on ``gateway_ip`` if given, and the control plane. Yields once
    every caller (and the gateway) gets an answer from llama."""
    manifest = tmp_path / "mesh.yaml"
    async with contextlib.AsyncExitStack() as stack:
        sims = {}
        for cfg in pods:
            sims[cfg.name] = await stack.enter_async_context(await start_sim(cfg))
        callers = [Sidecar(ip, f"client-{i}") for i, ip in enumerate(caller_ips)]
        write_manifests(
            manifest,
            [
                inference_service("llama", dict(annotations)),
                *(llama_pod(cfg.name, cfg.host, sims[cfg.name].port) for cfg in pods),
                *(workload_pod(c.pod_name, ip=c.ip, service_account="client") for c in callers),
                *(
                    [workload_pod(GATEWAY_POD, ip=gateway_ip, service_account="gateway")]
                    if gateway_ip
                    else []
                ),
            ],
        )
        settings = serve_settings(tmp_path / "ca", ratelimit or RateLimitSettings())
        plane = await stack.enter_async_context(control_plane(manifest, settings))
        xds = plane.ports["xds"]
        pod_sidecars = {cfg.name: Sidecar(cfg.host, cfg.name) for cfg in pods}
        pod_envoys = {
            name: await stack.enter_async_context(running(sidecar_options(s, xds, "llama")))
            for name, s in pod_sidecars.items()
        }
        caller_envoys = [
            await stack.enter_async_context(
                running(sidecar_options(c, xds, "client", delta=i % 2 == 1))
            )
            for i, c in enumerate(callers)
        ]
        gateway_url = ""
        if gateway_ip:
            port = free_port(gateway_ip)
            await stack.enter_async_context(running(gateway_options(gateway_ip, port, xds)))
            gateway_url = f"http://{gateway_ip}:{port}"
        built = Mesh(plane, sims, pod_sidecars, pod_envoys, callers, caller_envoys, gateway_url)
        await _reaches_llama(built)
        for pod in sims.values():
            pod.reset()
        yield built


async def _reaches_llama(built: Mesh) -> None:
    urls = [built.caller_url(i) for i in range(len(built.callers))]
    urls += [built.gateway_url] if built.gateway_url else []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

        async def answered() -> bool:
            results = await asyncio.gather(*(complete(session, u, "critical", 1) for u in urls))
            return all(status == 200 for status, _, _ in results)

        await eventually(answered, timeout=30, what="every caller answered by llama")


async def complete(
    session: aiohttp.ClientSession,
    url: str,
    priority: str | None,
    max_tokens: int,
    *,
    stream: bool = False,
) -> tuple[int, Mapping[str, str], bytes]:
    """One completion at ``url`` (a listener's base URL) for llama: status, headers, body."""
    headers = {"Host": LLAMA}
    if priority is not None:
        headers[PRIORITY_HEADER] = priority
    body = {"model": "llama", "prompt": "hello", "max_tokens": max_tokens, "stream": stream}
    async with session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
        return resp.status, resp.headers, await resp.read()


async def sim_stats(pod: RunningSim) -> dict[str, Any]:
    """The pod's own counters, over HTTP as any client would read them."""
    async with aiohttp.ClientSession() as session, session.get(f"{pod.url}/sim/stats") as r:
        data: dict[str, Any] = await r.json()
        return data


async def counter(envoy: Envoy, cluster: str, stat: str) -> int:
    """One cluster counter of ``envoy`` (0 when absent)."""
    return (await envoy.stats(stat)).get(f"cluster.{cluster}.{stat}", 0)
