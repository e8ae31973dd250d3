"""Test worlds and proxies, built straight from the mesh dataclasses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from mesh.model import (
    Endpoint,
    InferenceService,
    MtlsMode,
    Priority,
    ServiceConfig,
    ServicePort,
    World,
)
from mesh.proxy import Proxy, ProxyKind
from routing import generate

HOST = "llama.default.svc.cluster.local"


def config(
    *,
    default: Priority = Priority.STANDARD,
    callers: Iterable[str] = (),
    max_concurrency: int | None = None,
    mtls: MtlsMode = MtlsMode.PERMISSIVE,
    timeouts: Mapping[Priority, float] | None = None,
) -> ServiceConfig:
    return ServiceConfig(
        enabled=True,
        default_priority=default,
        critical_callers=tuple(callers),
        max_concurrency=max_concurrency,
        mtls=mtls,
        timeouts=MappingProxyType(dict(timeouts or {})),
    )


def endpoint(
    address: str,
    *,
    port: int = 9000,
    service_port: int = 8000,
    gpu: bool = False,
    ready: bool = True,
    pod: str | None = None,
    namespace: str = "default",
) -> Endpoint:
    return Endpoint(
        address=address,
        port=port,
        service_port=service_port,
        ready=ready,
        gpu=gpu,
        pod_namespace=namespace if pod else "",
        pod_name=pod or "",
    )


def service(
    name: str = "llama",
    namespace: str = "default",
    *,
    ports: Iterable[int] = (8000,),
    endpoints: Iterable[Endpoint] = (),
    cfg: ServiceConfig | None = None,
) -> InferenceService:
    return InferenceService(
        namespace=namespace,
        name=name,
        ports=tuple(ServicePort(port=p, name=f"http-{p}", target_port=9000) for p in ports),
        config=cfg or config(),
        endpoints=tuple(endpoints),
    )


def world(*services: InferenceService) -> World:
    return World(services=tuple(services))


def proxy(
    *,
    kind: ProxyKind = ProxyKind.SIDECAR,
    ip: str = "10.1.0.1",
    pod: str = "client-0",
    namespace: str = "default",
    service_account: str = "client",
    proxyless: bool = False,
    **ports: Any,
) -> Proxy:
    return Proxy(
        node_id=f"{kind.value}~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local",
        kind=kind,
        ip=ip,
        pod_name=pod,
        namespace=namespace,
        dns_domain=f"{namespace}.svc.cluster.local",
        service_account=service_account,
        proxyless=proxyless,
        **ports,
    )


def gateway(**kwargs: Any) -> Proxy:
    return proxy(kind=ProxyKind.ROUTER, pod="gateway-0", service_account="gateway", **kwargs)


def llama_world(cfg: ServiceConfig | None = None) -> World:
    """llama: two GPU-backed pods, one CPU fallback pod, one unready GPU pod."""
    return world(
        service(
            cfg=cfg,
            endpoints=[
                endpoint("10.0.0.1", gpu=True, pod="gpu-0"),
                endpoint("10.0.0.2", gpu=True, pod="gpu-1"),
                endpoint("10.0.0.3", gpu=False, pod="cpu-0"),
                endpoint("10.0.0.4", gpu=True, ready=False, pod="gpu-2"),
            ],
        )
    )


def cluster_name(priority: Priority, port: int = 8000, host: str = HOST) -> str:
    return f"outbound|{port}|{priority.value}|{host}"


def build(
    the_world: World, who: Proxy, sidecars: Mapping[tuple[str, str], Proxy] | None = None
) -> dict[str, list[Any]]:
    """:func:`routing.generate`, typed loosely so tests can read the Envoy messages."""
    return dict(generate(the_world, who, sidecars or {}))
