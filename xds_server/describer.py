"""``/debug/describe``: what inferlane gives one Service or one pod, as plain data.

``inferlane describe service NAME[.NS]`` and ``describe pod NAME[.NS]`` read this page (so
they work through a port-forward) and print it, as ``istioctl x describe`` does. The
translated part (classes, clusters, endpoints with their EDS priority and weight, the
rates each endpoint enforces, who may send ``critical``) comes from
:mod:`routing.explain`, read back from the config of the current generation. This module
adds what only the running control plane knows: the adaptive controller's state and
last reason per endpoint, and the sync state of the proxies involved.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mesh.model import InferenceService, World
from mesh.proxy import NodeIdError, parse_node_id
from routing import explain
from routing.generator import MeshGenerator
from xds_server.admin import PageError, sync_entry
from xds_server.ads.server import XdsServer

#: ``/debug/describe``'s description on the admin index.
DESCRIPTION = (
    "?service=NS/NAME or ?pod=NS/NAME: classes, clusters, endpoints (GPU or fallback, EDS "
    "priority, weight), limits with adaptive state, critical callers, proxies' sync"
)


class Describer:
    """Answers ``/debug/describe`` from the control plane's current state.

    ``generator`` is the current generation (None before the first push), and
    ``adaptive`` returns ``/debug/ratelimits``'s adaptive endpoints.
    """

    def __init__(
        self,
        xds_server: XdsServer,
        generator: Callable[[], MeshGenerator | None],
        adaptive: Callable[[], list[dict[str, Any]]],
        workers: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None,
    ) -> None:
        self.xds = xds_server
        self.generator = generator
        self.adaptive = adaptive
        #: The ``/debug/syncz`` entries of the streams worker processes serve, if any.
        self.workers = workers
        self._entries: list[dict[str, Any]] = []

    async def __call__(self, query: Mapping[str, str]) -> dict[str, Any]:
        entries = [sync_entry(c) for c in self.xds.connections.values()]
        if self.workers is not None:
            entries += await self.workers()
        self._entries = sorted(entries, key=lambda e: str(e["node_id"]))
        return self.answer(query)

    def answer(self, query: Mapping[str, str]) -> dict[str, Any]:
        generator = self.generator()
        if generator is None:
            raise PageError(503, "no world loaded yet")
        if "service" in query:
            namespace, name = _ref(query["service"])
            svc = generator.world.service(namespace, name)
            if svc is None:
                raise PageError(404, f"no inference Service {namespace}/{name}")
            return self.service(generator, svc)
        if "pod" in query:
            namespace, name = _ref(query["pod"])
            return self.pod(generator, namespace, name)
        raise PageError(400, "give ?service=NAMESPACE/NAME or ?pod=NAMESPACE/NAME")

    def service(self, generator: MeshGenerator, svc: InferenceService) -> dict[str, Any]:
        client = generator.generate(explain.describing_client(svc.namespace))
        view = explain.service_view(
            generator.world, svc, client, generator.sidecars, generator.limits
        )
        view["limits"]["adaptive_state"] = self._adaptive_of(f"{svc.namespace}/{svc.name}")
        pods = {e.pod_key for e in svc.endpoints if e.pod_key is not None}
        view["proxies"] = [e for e in self._entries if _pod_of(e) in pods]
        return view

    def pod(self, generator: MeshGenerator, namespace: str, name: str) -> dict[str, Any]:
        world: World = generator.world
        workload = world.workload(namespace, name)
        proxies = [e for e in self._entries if _pod_of(e) == (namespace, name)]
        if workload is None and not proxies:
            raise PageError(404, f"no pod {namespace}/{name} in the world or connected")
        backs = []
        for svc in explain.backed_services(world, namespace, name):
            client = generator.generate(explain.describing_client(svc.namespace))
            view = explain.service_view(world, svc, client, generator.sidecars, generator.limits)
            own = f"{namespace}/{name}"
            backs.append(
                {
                    "service": view["service"],
                    "ports": [
                        {
                            "port": port["port"],
                            "classes": [
                                {
                                    **cls,
                                    "endpoints": [e for e in cls["endpoints"] if e["pod"] == own],
                                }
                                for cls in port["classes"]
                            ],
                            "excluded": [e for e in port["excluded"] if e["pod"] == own],
                        }
                        for port in view["ports"]
                    ],
                    "limits": [e for e in view["limits"]["endpoints"] if e["pod"] == own],
                    "adaptive_state": [
                        e
                        for e in self._adaptive_of(view["service"])
                        if e["endpoint"].startswith(own + ":")
                    ],
                }
            )
        account = workload.service_account if workload is not None else None
        return {
            "pod": f"{namespace}/{name}",
            "in_world": workload is not None,
            "service_account": account,
            "ip": workload.ip if workload is not None else None,
            "node": workload.node_name if workload is not None else None,
            "gpu": workload.gpu if workload is not None else None,
            "ready": workload.ready if workload is not None else None,
            "sidecar_declared": workload.sidecar if workload is not None else None,
            "backs": backs,
            "critical": explain.may_send_critical(world, namespace, account)
            if account is not None
            else None,
            "proxies": proxies,
        }

    def _adaptive_of(self, service: str) -> list[dict[str, Any]]:
        return [e for e in self.adaptive() if e.get("service") == service]


def _pod_of(entry: Mapping[str, Any]) -> tuple[str, str] | None:
    """(namespace, pod) of a sync entry's proxy."""
    try:
        node = parse_node_id(str(entry["node_id"]))
    except NodeIdError:
        return None
    return node.namespace, node.pod_name


def _ref(text: str) -> tuple[str, str]:
    namespace, slash, name = text.partition("/")
    if not slash or not namespace or not name or "/" in name:
        raise PageError(400, f"{text!r} is not NAMESPACE/NAME")
    return namespace, name
