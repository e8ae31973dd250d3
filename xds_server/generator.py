"""The generator ``inferlane serve`` installs: the world, translated per proxy.

This is where the translators meet: ``routing`` composes listeners, routes, clusters and
endpoints (with ``mtls`` and ``ratelimit`` building blocks). The streaming layer only sees
the :class:`~xds_server.cache.Generator` protocol.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import routing
from mesh.model import World
from mesh.proxy import Proxy


class MeshGenerator:
    """One generation: a frozen world plus the sidecars connected when it was built."""

    def __init__(self, world: World, sidecars: Mapping[tuple[str, str], Proxy]) -> None:
        self.world = world
        self.sidecars = dict(sidecars)
        self._backend_pods = {
            e.pod_key for svc in world.services for e in svc.endpoints if e.pod_key is not None
        }
        self._backend_ips = {e.address for svc in world.services for e in svc.endpoints}

    def key(self, proxy: Proxy) -> Hashable:
        """Everything the translators read of a proxy; equal keys get identical config.

        Outbound config depends on the proxy's kind, identity (the caller clamp) and
        ports; only a proxy whose pod backs a Service gets an inbound listener of its
        own, so pod and IP enter the key only for those. This is what lets ten thousand
        client sidecars share one generated snapshot.
        """
        backs = (proxy.namespace, proxy.pod_name) in self._backend_pods or (
            proxy.ip in self._backend_ips
        )
        return (
            proxy.kind,
            proxy.proxyless,
            proxy.namespace,
            proxy.service_account,
            proxy.outbound_port,
            proxy.inbound_port,
            proxy.gateway_port,
            proxy.bind_address,
            (proxy.pod_name, proxy.ip) if backs else None,
        )

    def generate(self, proxy: Proxy) -> Mapping[str, Sequence[Any]]:
        return routing.generate(self.world, proxy, self.sidecars)
