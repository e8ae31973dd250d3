"""The generator ``inferlane serve`` installs: the world, translated per proxy.

This is where the translators meet: ``routing`` composes listeners, routes, clusters and
endpoints (with ``mtls`` and ``ratelimit`` building blocks), and the proxy's own SDS
secrets are added from the :class:`Secrets` store. The streaming layer only sees the
:class:`~xds_server.ads.cache.Generator` protocol.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol

from cachetools import LRUCache

from mesh import xds
from mesh.model import World
from mesh.proxy import Proxy
from mtls.identity import Identity, workload_identity
from mtls.secrets import SecretBundle
from routing.endpoints import endpoint_target
from routing.incremental import Translation, TranslationView
from routing.limits import RateLimitOptions, limit_key
from routing.secure import SecurityOptions

#: Translations the routing memo keeps, least recently used dropped first. One entry per
#: distinct routing key among the proxies asking: about one per identity and port variant
#: for client sidecars, one per backend pod. The key is made of what a client sends (its
#: namespace, service account, ports, bind address), so without a bound a client that
#: reconnects with ever new metadata would add a full translation each time, kept across
#: generations. Past the bound, a dropped entry is translated again when next asked.
MAX_MEMOIZED_TRANSLATIONS = 4096


class Secrets(Protocol):
    """Where workload secrets come from (:class:`mtls.secrets.SecretStore`)."""

    def bundle(self, identity: Identity) -> SecretBundle: ...


class MeshGenerator:
    """One generation: a frozen world plus the sidecars connected when it was built.

    Each identity's secrets are looked up once per generation, by :meth:`generate`, so
    every proxy of one generation sees the same certificate; :meth:`key` never looks them
    up, so the event loop never waits for a certificate to be signed (the cache runs
    ``generate`` on its worker thread).

    Translation is incremental (:mod:`routing.incremental`): the :class:`Translation`
    passes from each generation to the next, keeping every Service's parts while its
    inputs are unchanged, so a change costs what it changes. On top of it, each routing
    key's whole output is memoized, and shared with the next generation when no Service's
    inputs changed (a renewal, a sidecar reconnecting): that costs the secrets alone. The
    memo is bounded (:data:`MAX_MEMOIZED_TRANSLATIONS`).
    """

    def __init__(
        self,
        world: World,
        sidecars: Mapping[tuple[str, str], Proxy],
        secrets: Secrets | None = None,
        *,
        tls: SecurityOptions | None = None,
        limits: RateLimitOptions | None = None,
        previous: MeshGenerator | None = None,
        memo_size: int = MAX_MEMOIZED_TRANSLATIONS,
    ) -> None:
        self.world = world
        self.sidecars = dict(sidecars)
        self.secrets = secrets
        self.tls = tls or SecurityOptions()
        self.limits = limits or RateLimitOptions()
        self._bundles: dict[Identity, SecretBundle] = {}
        self._memo_size = memo_size
        self.translation: Translation = (
            previous.translation if previous is not None else Translation()
        )
        # Set by the first translation, on the cache's worker thread. Until then the
        # generation before (or the last one that translated) is kept to inherit from; not
        # the whole chain, should several generations never translate.
        self._view: TranslationView | None = None
        self._routing: LRUCache[Hashable, Mapping[str, Sequence[Any]]] | None = None
        self._inherit: tuple[TranslationView | None, LRUCache[Hashable, Any] | None] = (
            (None, None) if previous is None else previous._inheritance()
        )

    def _inheritance(self) -> tuple[TranslationView | None, LRUCache[Hashable, Any] | None]:
        view, routing_memo = self._view, self._routing
        if view is None or routing_memo is None:
            return self._inherit
        return view, routing_memo

    def _translated(self) -> tuple[TranslationView, LRUCache[Hashable, Any]]:
        """This generation's translation, made on first use (on the worker thread)."""
        view, memo = self._view, self._routing
        if view is None or memo is None:
            previous_view, previous_memo = self._inherit
            view = self.translation.view(self.world, self.sidecars, self.tls, self.limits)
            same = previous_memo is not None and view.same_parts_as(previous_view)
            memo = (
                previous_memo if same and previous_memo is not None else LRUCache(self._memo_size)
            )
            self._routing = memo
            self._view = view
            self._inherit = (None, None)
        return view, memo

    def same_routing_as(self, other: MeshGenerator | None) -> bool:
        """Whether every proxy gets the same listeners, routes, clusters and endpoints from
        this generation as from ``other`` (secrets aside: the store renews them in place).

        True when only the connected sidecars differ, and none of those that connected or
        left changes how an endpoint is reached: a client's sidecar, or the sidecar a pod
        declares connecting with the ports it was expected to have. Cheap (it looks at
        those sidecars' endpoints only), so a connection storm need not make a generation
        per debounce for nothing.
        """
        if (
            other is None
            or other.world is not self.world
            or other.secrets is not self.secrets
            or other.tls != self.tls
            or other.limits != self.limits
        ):
            return False
        moved = {
            key
            for key in self.sidecars.keys() | other.sidecars.keys()
            if self.sidecars.get(key) != other.sidecars.get(key)
        }
        return all(
            endpoint_target(endpoint, self.sidecars, self.world)
            == endpoint_target(endpoint, other.sidecars, self.world)
            for key in moved
            for _svc, _index, endpoint in self.world.endpoints_of(key)
        )

    def identity(self, proxy: Proxy) -> Identity | None:
        """The identity whose secrets ``proxy`` gets (from its pod in the world), or None."""
        if self.secrets is None:
            return None
        return workload_identity(self.world, proxy, self.tls.trust_domain)

    def _bundle(self, identity: Identity) -> SecretBundle:
        found = self._bundles.get(identity)
        if found is None:
            assert self.secrets is not None
            found = self._bundles[identity] = self.secrets.bundle(identity)
        return found

    def _routing_key(self, proxy: Proxy, has_identity: bool) -> Hashable:
        """Everything the translators read of a proxy; equal keys get identical config.

        Outbound config depends on the proxy's kind, identity (the caller clamp), ports, and
        whether it can present a certificate (mTLS); only a proxy whose pod backs a Service
        gets an inbound listener of its own, so pod and IP enter the key only for those.
        This is what lets ten thousand client sidecars share one generated snapshot. The
        rate-limit pass adds the adaptive multipliers of the proxy's own endpoints.
        """
        backs = bool(self.world.endpoints_of((proxy.namespace, proxy.pod_name), proxy.ip))
        return (
            proxy.kind,
            proxy.proxyless,
            proxy.namespace,
            proxy.service_account,
            proxy.outbound_port,
            proxy.inbound_port,
            proxy.gateway_port,
            proxy.bind_address,
            (proxy.pod_name, proxy.ip, proxy.workload_address) if backs else None,
            has_identity,
            limit_key(self.world, proxy, self.limits) if backs else (),
        )

    def key(self, proxy: Proxy) -> Hashable:
        """The routing key, plus the identity whose secrets the proxy gets (one certificate
        per identity per generation, so the identity stands for its certificate)."""
        identity = self.identity(proxy)
        return (self._routing_key(proxy, identity is not None), identity)

    def generate(self, proxy: Proxy) -> Mapping[str, Sequence[Any]]:
        """The proxy's resources, as tuples of messages shared with every proxy (and every
        generation) that gets the same: the cache serializes each once."""
        identity = self.identity(proxy)
        view, memo = self._translated()
        routing_key = self._routing_key(proxy, identity is not None)
        resources = memo.get(routing_key)
        if resources is None:
            # Without secrets to send, the proxy must not be given config that waits for them.
            subject = (
                proxy if identity is not None else dataclasses.replace(proxy, secrets_allowed=False)
            )
            resources = memo[routing_key] = view.generate(subject)
        if identity is None:
            return resources
        return {**resources, xds.SECRET: self._bundle(identity).secrets}
