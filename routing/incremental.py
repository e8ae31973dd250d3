"""Translation that scales: a change costs what it changes.

:func:`routing.generate` translates one proxy's whole config. A control plane serving
thousands of proxies must not do that per proxy: a fleet of 10,000 has about 3,000
distinct configs (identities differ, and every model pod has an inbound side of its own),
and each holds every Service's clusters, load assignments and routes. As Istio does (the
per-type caches of ``pilot/pkg/model/typed_xds_cache.go``, and the EDS cache of
``pilot/pkg/xds/eds.go``), :class:`Translation` translates each part once and shares it:

==========================  ====================================================
part                        depends on, besides its Service
==========================  ====================================================
a Service's clusters        proxyless or not; the proxy has an identity (mTLS)
its load assignments        nothing of the proxy
its virtual hosts           gateway or not; the viewer's namespace is the
                            Service's (the bare-name domain); the caller clamp's
                            outcome; the caller itself, when the Service has a
                            global rate limit (each caller's own descriptor)
a proxyless target          the viewer's namespace is the Service's; the clamp
outbound route config       its name and its virtual hosts
outbound listener           the proxy's ports and kind, its identity, the route
                            configuration (the rate-limit filter, the RLS cluster)
inbound side                the pod's own endpoints and their Services, the
                            sidecar's ports, its identity, the endpoints' adaptive
                            multipliers
==========================  ====================================================

A Service's inputs are the frozen object itself and where each of its endpoints is
reached (its target: through a sidecar, declared or connected, or not; its queue weight)
and by whom (the pod's identity, for the SPIFFE IDs its clusters accept). While they are
equal, the Service's parts are kept from one generation to the next; when they change,
its parts are translated again on demand and the old ones dropped, and so are the parts
of a Service that is gone. A part is made by the same functions :func:`routing.generate`
is made of, and each goes through the same passes (:func:`routing.passes`), with the
proxy that first needs it: the memo is around the passes, never inside them. A pass that
comes to read another trait of the proxy must add it to the part's key here
(``tests/routing/test_incremental.py`` compares this translation with
:func:`routing.generate` across random worlds and changes).

Parts are interned by content (a digest of their bytes): a Service whose endpoint turns
unready is translated again, and its clusters and routes come out byte for byte the same,
so they stay the very objects they were. Route configurations, listeners and the lists
handed to the cache are assembled from parts and memoized by the digests of what they
hold, so a change to one Service re-assembles the route configurations that hold it, and
a change to one Service's endpoints re-assembles nothing but the list of load
assignments. What the cache receives is therefore mostly the same objects, in the same
tuples, as the generation before: it serializes a message or a tuple once, by identity
(:class:`xds_server.ads.snapshot.ResourceInterner`).

Everything here is bounded: one entry per Service in the world, and least-recently-used
caches for the rest, past whose bounds parts are translated again.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from cachetools import LRUCache

import routing
from mesh import xds
from mesh.model import InferenceService, World
from mesh.proxy import Proxy, ProxyKind
from mtls.identity import workload_identity
from routing import endpoints, proxyless, routes
from routing.catalog import own_endpoints, served_services
from routing.clamp import may_request_critical
from routing.limits import RateLimitOptions
from routing.secure import SecurityOptions

T = TypeVar("T")

#: Parts one Service keeps, least recently used dropped first: its clusters and virtual
#: hosts per combination of the traits above. Only a Service with a global rate limit or
#: token budgets has parts per caller identity; the bound holds what a client claiming
#: ever new identities can add.
MAX_PARTS_PER_SERVICE: Final = 4096
#: Assembled route configurations, listeners, inbound sides and per-type lists, and
#: messages interned by content, kept per generation: several per distinct proxy config
#: (about 3,000 at 10,000 proxies). What a generation did not use is dropped at the next
#: (:class:`Recent`); past this bound, sooner.
MAX_SHARED: Final = 65_536


def digest(message: Any) -> bytes:
    """A message's content key: its type and its deterministic bytes, hashed."""
    h = hashlib.blake2b(message.DESCRIPTOR.full_name.encode(), digest_size=16)
    h.update(b"\0")
    h.update(message.SerializeToString(deterministic=True))
    return h.digest()


@dataclass(frozen=True)
class Part:
    """Messages, and a key that names their content (equal keys, equal bytes)."""

    key: Hashable
    messages: tuple[Any, ...]


EMPTY: Final = Part((), ())


@dataclass(eq=False)
class ServiceEntry:
    """One Service's inputs and the parts translated from them."""

    svc: InferenceService
    inputs: tuple[Hashable, ...]
    #: Never reused: names this entry in keys that outlive it.
    token: int
    #: Parts by what they depend on; the oldest dropped past :data:`MAX_PARTS_PER_SERVICE`.
    parts: dict[Hashable, Any] = field(default_factory=dict)

    def part(self, key: Hashable, build: Callable[[], T]) -> T:
        found: T | None = self.parts.get(key)
        if found is None:
            found = build()
            if len(self.parts) >= MAX_PARTS_PER_SERVICE:
                del self.parts[next(iter(self.parts))]
            self.parts[key] = found
        return found

    def matches(self, svc: InferenceService, inputs: tuple[Hashable, ...]) -> bool:
        return (self.svc is svc or self.svc == svc) and self.inputs == inputs


def service_inputs(
    svc: InferenceService,
    world: World,
    sidecars: Mapping[tuple[str, str], Proxy],
    weights: Mapping[str, int],
) -> tuple[Hashable, ...]:
    """What a Service's parts read of the world besides the Service: per endpoint, its
    target and its pod's identity."""
    found: list[Hashable] = []
    for endpoint in svc.endpoints:
        weight = weights.get(endpoints.endpoint_key(endpoint), endpoints.FULL_WEIGHT)
        target = endpoints.endpoint_target(endpoint, sidecars, world, weight)
        key = endpoint.pod_key
        workload = world.workloads.get(key) if key is not None else None
        identity = (workload.namespace, workload.service_account) if workload else None
        found.append((target, identity))
    return tuple(found)


class Recent:
    """A memo that keeps what the current and the previous generation used.

    :meth:`rotate` starts a generation: what the one before it did not use is dropped. A
    generation that adds more than ``maxsize`` entries rotates early, so at most twice
    that is held.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._current: dict[Hashable, Any] = {}
        self._previous: dict[Hashable, Any] = {}

    def rotate(self) -> None:
        self._previous, self._current = self._current, {}

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def get(self, key: Hashable) -> Any | None:
        found = self._current.get(key)
        if found is None:
            found = self._previous.pop(key, None)
            if found is not None:
                self.put(key, found)
        return found

    def put(self, key: Hashable, value: Any) -> None:
        if len(self._current) >= self.maxsize:
            self.rotate()
        self._current[key] = value


class Translation:
    """The parts of every Service and what is assembled from them, kept across
    generations. Not thread-safe: one translation at a time (the cache's worker thread).
    """

    def __init__(self, *, max_shared: int = MAX_SHARED) -> None:
        self.entries: dict[tuple[str, str], ServiceEntry] = {}
        self._tokens = itertools.count(1)
        self._options: tuple[Hashable, ...] | None = None
        #: Content digest -> the one message with that content.
        self._canonical = Recent(max_shared)
        #: Assembled parts, by the keys of what they are made of.
        self._shared = Recent(max_shared)
        #: Per kind of part and proxies alike: (the Service entries, their parts).
        self.vectors = Recent(max_shared)

    def view(
        self,
        world: World,
        sidecars: Mapping[tuple[str, str], Proxy],
        tls: SecurityOptions | None = None,
        limits: RateLimitOptions | None = None,
    ) -> TranslationView:
        """One generation's translation: ``world`` with ``sidecars`` connected.

        A generation in which some Service changed starts a new generation of the shared
        memos (:class:`Recent`); one in which none did (a sidecar reconnecting, a
        certificate renewed) leaves them as they are, since it uses what the last one did.
        """
        tls = tls or SecurityOptions()
        limits = limits or RateLimitOptions()
        options = (tls, limits.rls, limits.failure_mode_deny, limits.rls_timeout_s)
        if options != self._options:
            self.entries = {}
            self._shared = Recent(self._shared.maxsize)
            self.vectors = Recent(self.vectors.maxsize)
            self._options = options
        entries: dict[tuple[str, str], ServiceEntry] = {}
        for svc in served_services(world):
            inputs = service_inputs(svc, world, sidecars, limits.weights)
            entry = self.entries.get(svc.key)
            if entry is None or not entry.matches(svc, inputs):
                entry = ServiceEntry(svc, inputs, next(self._tokens))
            entries[svc.key] = entry
        if list(entries.values()) != list(self.entries.values()):
            self._shared.rotate()
            self._canonical.rotate()
            self.vectors.rotate()
        self.entries = entries
        return TranslationView(
            self,
            world=world,
            sidecars=sidecars,
            tls=tls,
            limits=limits,
            entries=tuple(entries.values()),
        )

    def canonical(self, messages: Iterable[Any]) -> Part:
        """``messages`` as a part: each replaced by the message already holding its
        content, if there is one."""
        keys = []
        found = []
        for message in messages:
            key = digest(message)
            same = self._canonical.get(key)
            if same is None:
                self._canonical.put(key, message)
                same = message
            keys.append(key)
            found.append(same)
        return Part(tuple(keys), tuple(found))

    def shared(self, key: Hashable, build: Callable[[], T]) -> T:
        """What ``build`` makes, once per ``key`` for as long as it is kept."""
        found: T | None = self._shared.get(key)
        if found is None:
            found = build()
            self._shared.put(key, found)
        return found

    def assemble(self, parts: Sequence[Part]) -> Part:
        """The messages of ``parts`` together, sorted by name (stably, in part order)."""
        kept = [p for p in parts if p.messages]
        if not kept:
            return EMPTY
        if len(kept) == 1:
            return kept[0]
        key = ("assembled", *(p.key for p in kept))
        return self.shared(
            key,
            lambda: Part(
                key,
                tuple(sorted((m for p in kept for m in p.messages), key=xds.resource_name)),
            ),
        )


class TranslationView:
    """One generation of a :class:`Translation`: every proxy's config, from shared parts."""

    def __init__(
        self,
        translation: Translation,
        *,
        world: World,
        sidecars: Mapping[tuple[str, str], Proxy],
        tls: SecurityOptions,
        limits: RateLimitOptions,
        entries: tuple[ServiceEntry, ...],
    ) -> None:
        self.translation = translation
        self.world = world
        self.sidecars = sidecars
        self.tls = tls
        self.limits = limits
        self.entries = entries
        self._by_key = {e.svc.key: e for e in entries}
        self._outbound: LRUCache[Hashable, dict[str, list[Part]]] = LRUCache(MAX_SHARED)
        self._joined_parts: dict[Hashable, Part] = {}

    def same_parts_as(self, other: TranslationView | None) -> bool:
        """Whether every proxy gets the same config from this view as from ``other``: the
        same Service entries (new options make new entries), so the same parts. The
        adaptive multipliers, which only a pod's own inbound side reads, are in the
        generator's routing key instead."""
        return (
            other is not None
            and other.translation is self.translation
            and other.entries == self.entries
        )

    # -- one proxy ------------------------------------------------------------------

    def generate(self, proxy: Proxy) -> dict[str, tuple[Any, ...]]:
        """What :func:`routing.generate` gives ``proxy``, as tuples of shared messages."""
        has_identity = workload_identity(self.world, proxy, self.tls.trust_domain) is not None
        parts = {t: list(p) for t, p in self._outbound_parts(proxy, has_identity).items()}
        if proxy.kind is ProxyKind.SIDECAR and not proxy.proxyless:
            for type_url, part in self._inbound_parts(proxy, has_identity).items():
                parts[type_url].append(part)
        t = self.translation
        return {type_url: t.assemble(found).messages for type_url, found in parts.items()}

    def _passes(self, resources: Mapping[str, Sequence[Any]], proxy: Proxy) -> dict[str, Any]:
        return routing.passes(
            resources, self.world, proxy, self.sidecars, tls=self.tls, limits=self.limits
        )

    def _outbound_parts(self, proxy: Proxy, has_identity: bool) -> dict[str, list[Part]]:
        key = (
            proxy.kind,
            proxy.proxyless,
            has_identity,
            proxy.namespace,
            proxy.service_account,
            proxy.outbound_port,
            proxy.gateway_port,
            proxy.bind_address,
        )
        found = self._outbound.get(key)
        if found is None:
            found = self._outbound[key] = self._translate_outbound(key, proxy, has_identity)
        return found

    def _translate_outbound(
        self, key: Hashable, proxy: Proxy, has_identity: bool
    ) -> dict[str, list[Part]]:
        t = self.translation
        out: dict[str, list[Part]] = {
            xds.CLUSTER: [self._every("clusters", (proxy.proxyless, has_identity),
                                      lambda e: self._clusters(e, proxy, has_identity))],
            xds.ENDPOINT: [self._every("assignments", (), self._assignments)],
        }  # fmt: skip
        if proxy.proxyless:
            targets = self._vector(("proxyless", key), lambda e: self._proxyless(e, proxy))
            out[xds.LISTENER] = [self._joined("listeners", [lst for lst, _r in targets])]
            out[xds.ROUTE] = [self._joined("routes", [rts for _l, rts in targets])]
            return out
        name = routing.outbound_route_name(proxy)
        vhosts = self._vector(("vhosts", key), lambda e: self._vhosts(e, proxy))
        rc_key = ("route", name, *(p.key for p in vhosts))
        route = t.shared(
            rc_key,
            lambda: Part(
                rc_key,
                (routes.route_configuration(name, [v for p in vhosts for v in p.messages]),),
            ),
        )
        listener, extra = t.shared(
            ("frame", proxy.kind, proxy.bind_address, proxy.outbound_port, proxy.gateway_port,
             has_identity, rc_key),
            lambda: self._frame(proxy, route),
        )  # fmt: skip
        out[xds.LISTENER] = [listener]
        out[xds.ROUTE] = [route]
        out[xds.CLUSTER].append(extra)
        return out

    def _vector(self, key: Hashable, part: Callable[[ServiceEntry], T]) -> list[T]:
        """``part`` of every Service, for proxies alike in ``key`` (everything ``part``
        reads of them): the previous generation's, but for the Services that changed."""
        t = self.translation
        before = t.vectors.get(key)
        if before is not None and before[0] == self.entries:
            found: list[T] = before[1]
        elif before is not None and len(before[0]) == len(self.entries):
            found = [
                kept if entry is was else part(entry)
                for entry, was, kept in zip(self.entries, before[0], before[1], strict=True)
            ]
        else:
            found = [part(entry) for entry in self.entries]
        t.vectors.put(key, (self.entries, found))
        return found

    def _every(self, kind: str, traits: Hashable, part: Callable[[ServiceEntry], Part]) -> Part:
        """One part of every Service's ``kind`` parts for proxies alike in ``traits``."""
        key = (kind, traits)
        found = self._joined_parts.get(key)
        if found is None:
            found = self._joined_parts[key] = self._joined(kind, self._vector(key, part))
        return found

    def _joined(self, kind: str, parts: list[Part]) -> Part:
        """The messages of ``parts`` sorted by name, as one part shared by content."""
        key = (kind, *(p.key for p in parts))
        return self.translation.shared(
            key,
            lambda: Part(
                key,
                tuple(sorted((m for p in parts for m in p.messages), key=xds.resource_name)),
            ),
        )

    def _frame(self, proxy: Proxy, route: Part) -> tuple[Part, Part]:
        """(the outbound listener, the clusters the passes add for it: the RLS cluster).

        What the passes add to the listener depends on the route configuration it serves
        (a global rate-limit filter when a route is limited), so they are given it; its
        virtual hosts went through the passes already, and the passes leave what they
        added alone when run again. Only the listener and the clusters are kept."""
        out = self._passes(
            {
                xds.LISTENER: [routing.frame(proxy)],
                xds.ROUTE: list(route.messages),
                xds.CLUSTER: [],
            },
            proxy,
        )
        t = self.translation
        return t.canonical(out[xds.LISTENER]), t.canonical(out.get(xds.CLUSTER, ()))

    # -- one Service's parts ---------------------------------------------------------

    def _clusters(self, entry: ServiceEntry, proxy: Proxy, has_identity: bool) -> Part:
        def build() -> Part:
            cluster_list, assignments = routing.service_clusters(
                entry.svc, self.world, self.sidecars, self.limits.weights, proxyless=proxy.proxyless
            )
            entry.part(("assignments",), lambda: self.translation.canonical(assignments))
            return self.translation.canonical(
                self._passes({xds.CLUSTER: cluster_list}, proxy)[xds.CLUSTER]
            )

        return entry.part(("clusters", proxy.proxyless, has_identity), build)

    def _assignments(self, entry: ServiceEntry) -> Part:
        """A Service's load assignments, the same for every proxy (made with its clusters,
        which are always made first)."""

        def build() -> Part:
            _, assignments = routing.service_clusters(
                entry.svc, self.world, self.sidecars, self.limits.weights, proxyless=False
            )
            return self.translation.canonical(assignments)

        return entry.part(("assignments",), build)

    def _viewer(self, entry: ServiceEntry, proxy: Proxy) -> tuple[Hashable, ...]:
        """What a Service's routes read of the proxy that calls it."""
        svc = entry.svc
        clamp = entry.part(
            ("clamp", proxy.namespace, proxy.service_account),
            lambda: may_request_critical(svc.config, proxy),
        )
        caller = proxy.identity if svc.config.counted_per_caller and self.limits.rls else None
        return (svc.namespace == proxy.namespace, clamp, caller)

    def _vhosts(self, entry: ServiceEntry, proxy: Proxy) -> Part:
        def build() -> Part:
            name = routing.outbound_route_name(proxy)
            alone = routes.route_configuration(name, routing.service_vhosts(entry.svc, proxy))
            (route,) = self._passes({xds.ROUTE: [alone]}, proxy)[xds.ROUTE]
            return self.translation.canonical(route.virtual_hosts)

        return entry.part(("vhosts", proxy.is_gateway, *self._viewer(entry, proxy)), build)

    def _proxyless(self, entry: ServiceEntry, proxy: Proxy) -> tuple[Part, Part]:
        def build() -> tuple[Part, Part]:
            listener_list, route_list = proxyless.service_resources(entry.svc, proxy)
            out = self._passes({xds.LISTENER: listener_list, xds.ROUTE: route_list}, proxy)
            t = self.translation
            return t.canonical(out[xds.LISTENER]), t.canonical(out[xds.ROUTE])

        return entry.part(("proxyless", *self._viewer(entry, proxy)), build)

    # -- a sidecar's inbound side ------------------------------------------------------

    def _inbound_parts(self, proxy: Proxy, has_identity: bool) -> dict[str, Part]:
        own = []
        for svc, port, endpoint in own_endpoints(self.world, proxy):
            entry = self._by_key[svc.key]
            multipliers = self.limits.multipliers.get(endpoints.endpoint_key(endpoint))
            own.append(
                (entry.token, port.port, endpoint, tuple(sorted((multipliers or {}).items())))
            )
        key = (
            "inbound",
            proxy.inbound_port,
            proxy.bind_address,
            proxy.workload_address,
            proxy.namespace,
            has_identity,
            *own,
        )

        def build() -> dict[str, Part]:
            resources = routing.inbound(self.world, proxy, self.limits)
            out = self._passes(resources, proxy)
            return {t: self.translation.canonical(messages) for t, messages in out.items()}

        found: dict[str, Part] = self.translation.shared(key, build)
        return found
