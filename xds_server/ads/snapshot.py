"""Versioned, pre-serialized resources and the per-proxy snapshot they form.

A resource is serialized once, deterministically, and versioned by a hash of its bytes, so
the same input gives the same versions after a restart and a reconnecting proxy is sent
nothing new. Identical resources produced for different proxies are interned: one byte
string is shared by every stream that sends it.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import json_format

from mesh import xds
from xds_server.ads import wire

T = TypeVar("T")

#: Views one bucket of resources keeps (and shared decisions one snapshot keeps), least
#: recently used dropped first. All proxies of one config key share a snapshot and
#: subscribe alike, so a bucket serves a handful of subscription shapes (a few more while
#: clusters warm). The bound caps what a client that keeps changing its subscription adds
#: to a bucket shared with others: each view holds a mapping and, once sent, its encoded
#: response (up to the size of the whole type). A view dropped is computed again when
#: next asked for.
MAX_CACHED_VIEWS = 256

_HCM_TYPE = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name


class SnapshotError(ValueError):
    """A snapshot that would leave a proxy waiting: a reference to a missing resource."""


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


_TYPE_OF_CLASS: dict[Any, str] = {
    listener_pb2.Listener: xds.LISTENER,
    route_pb2.RouteConfiguration: xds.ROUTE,
    cluster_pb2.Cluster: xds.CLUSTER,
    endpoint_pb2.ClusterLoadAssignment: xds.ENDPOINT,
    secret_pb2.Secret: xds.SECRET,
}


def type_url_of(message: Any) -> str:
    try:
        return _TYPE_OF_CLASS[type(message)]
    except KeyError:
        raise SnapshotError(f"not an xDS resource inferlane serves: {type(message)!r}") from None


@dataclass(frozen=True, eq=False)
class Resource:
    """One serialized resource, ready to be joined into responses."""

    type_url: str
    name: str
    version: str
    body: bytes
    #: (type_url, name) of the resources this one needs: an EDS cluster's assignment,
    #: a listener's route configuration, a route configuration's clusters.
    refs: tuple[tuple[str, str], ...] = ()
    sotw_field: bytes = field(default=b"", repr=False)
    delta_field: bytes = field(default=b"", repr=False)


def _refs(type_url: str, message: Any) -> tuple[tuple[str, str], ...]:
    if type_url == xds.CLUSTER:
        if message.type == cluster_pb2.Cluster.EDS:
            return ((xds.ENDPOINT, message.eds_cluster_config.service_name or message.name),)
        return ()
    if type_url == xds.LISTENER:
        refs: list[tuple[str, str]] = []
        hcms: list[Any] = []
        if message.HasField("api_listener"):
            hcms.append(message.api_listener.api_listener)
        for chain in [*message.filter_chains, message.default_filter_chain]:
            hcms.extend(
                f.typed_config for f in chain.filters if f.typed_config.type_url == _HCM_TYPE
            )
        for packed in hcms:
            hcm = hcm_pb2.HttpConnectionManager()
            packed.Unpack(hcm)
            if hcm.HasField("rds"):
                refs.append((xds.ROUTE, hcm.rds.route_config_name))
        return tuple(dict.fromkeys(refs))
    if type_url == xds.ROUTE:
        clusters: list[str] = []
        for vhost in message.virtual_hosts:
            for route in vhost.routes:
                if not route.HasField("route"):
                    continue
                action = route.route
                if action.cluster:
                    clusters.append(action.cluster)
                clusters.extend(w.name for w in action.weighted_clusters.clusters)
        return tuple((xds.CLUSTER, c) for c in dict.fromkeys(clusters))
    return ()


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def lru_get(cache: dict[K, V], key: K) -> V | None:
    """``cache[key]``, now the most recently used, or None.

    A dict keeps its keys in insertion order, so one re-inserted is the newest and the
    first is the least recently used: two operations in C, where ``cachetools`` takes a
    dozen calls in Python (every stream looks up several of these at every push)."""
    found = cache.pop(key, None)
    if found is not None:
        cache[key] = found
    return found


def lru_put(cache: dict[K, V], key: K, value: V, bound: int) -> V:
    """Add ``value`` (its key absent), dropping the least recently used past ``bound``."""
    while len(cache) >= bound:
        del cache[next(iter(cache))]
    cache[key] = value
    return value


class Bucket(dict[str, Resource]):
    """A snapshot's resources of one type, by name.

    Shared by every snapshot built from the same tuple of messages (and, in a worker, from
    the same shipped group), so it is never modified once built, and what is computed
    from it is kept with it, for all of them: its views and the names it refers to.
    """

    __slots__ = ("_refs", "_views")

    def __init__(self, resources: Iterable[tuple[str, Resource]] = ()) -> None:
        super().__init__(resources)
        self._views: dict[frozenset[str] | None, View] | None = None
        self._refs: dict[str, frozenset[str]] | None = None

    def view(self, names: frozenset[str] | None) -> View:
        """The resources named in ``names`` (None: all of them), and their version."""
        if self._views is None:
            self._views = {}
        found = lru_get(self._views, names)
        if found is None:
            selected = dict(self) if names is None else {n: self[n] for n in names if n in self}
            found = View(selected, version_of(selected))
            lru_put(self._views, names, found, MAX_CACHED_VIEWS)
        return found

    def refs(self) -> Mapping[str, frozenset[str]]:
        """Type URL -> the names of that type these resources need."""
        if self._refs is None:
            found: dict[str, set[str]] = {}
            for res in self.values():
                for type_url, name in res.refs:
                    found.setdefault(type_url, set()).add(name)
            self._refs = {t: frozenset(n) for t, n in found.items()}
        return self._refs


#: A type the snapshot has nothing of.
_NOTHING = Bucket()


class ResourceInterner:
    """Builds :class:`Resource` objects, sharing one object per identical resource.

    By content: identical resources built for different proxies are one object, for as
    long as any snapshot holds it. By identity: a generator hands out the same message
    objects, in the same tuples, to every proxy (and every generation) that gets the same
    content (:class:`~xds_server.ads.cache.Generator`); a message or tuple seen before is
    not serialized again. Those are remembered by identity for the generation that last
    used them and the one after (:meth:`advance`), holding the objects so that their
    identities stay theirs; only messages handed in within tuples are, since a generator
    that builds fresh lists builds fresh messages.
    """

    def __init__(self) -> None:
        self._live: weakref.WeakValueDictionary[tuple[str, str, str], Resource] = (
            weakref.WeakValueDictionary()
        )
        self._generation = 0
        self._messages: dict[int, tuple[Any, Resource]] = {}
        self._messages_before: dict[int, tuple[Any, Resource]] = {}
        self._groups: dict[int, tuple[tuple[Any, ...], dict[str, Bucket]]] = {}
        self._groups_before: dict[int, tuple[tuple[Any, ...], dict[str, Bucket]]] = {}

    def advance(self, generation: int) -> None:
        """Start ``generation`` (a later one than any before): what was remembered by
        identity and not used since the generation before is forgotten."""
        if generation <= self._generation:
            return
        self._generation = generation
        self._messages_before, self._messages = self._messages, {}
        self._groups_before, self._groups = self._groups, {}

    def make(self, message: Any) -> Resource:
        type_url = type_url_of(message)
        body = message.SerializeToString(deterministic=True)
        name = xds.resource_name(message)
        version = digest(body)
        key = (type_url, name, version)
        found = self._live.get(key)
        if found is not None:
            return found
        any_bytes = wire.encode_any(type_url, body)
        res = Resource(
            type_url=type_url,
            name=name,
            version=version,
            body=body,
            refs=_refs(type_url, message),
            sotw_field=wire.field_bytes(2, any_bytes),
            delta_field=wire.field_bytes(2, wire.encode_delta_resource(name, version, any_bytes)),
        )
        self._live[key] = res
        return res

    def _made(self, message: Any) -> Resource:
        """:meth:`make`, once per message object (see the class docstring)."""
        key = id(message)
        found = self._messages.get(key)
        if found is None:
            found = self._messages_before.pop(key, None) or (message, self.make(message))
            self._messages[key] = found
        return found[1]

    def buckets(self, messages: Iterable[Any]) -> dict[str, Bucket]:
        """``messages`` as resources by type and name; SnapshotError for a name twice.

        A tuple's buckets are built once (see the class docstring) and shared: never
        modify them."""
        if not isinstance(messages, tuple):
            return _buckets(self.make(m) for m in messages)
        key = id(messages)
        found = self._groups.get(key)
        if found is None:
            found = self._groups_before.pop(key, None)
            if found is not None:  # its messages are used in this generation too
                for message in messages:
                    self._made(message)
            else:
                found = (messages, _buckets(self._made(m) for m in messages))
            self._groups[key] = found
        return found[1]


def _buckets(resources: Iterable[Resource]) -> dict[str, Bucket]:
    by_type: dict[str, Bucket] = {}
    for res in resources:
        bucket = by_type.setdefault(res.type_url, Bucket())
        if res.name in bucket:
            raise SnapshotError(f"two {xds.short(res.type_url)} resources named {res.name!r}")
        bucket[res.name] = res
    return by_type


#: Partial SotW responses one view keeps encoded, by the version the client held: clients
#: come from one or two versions back, so a handful.
MAX_ENCODED_CHANGES = 8

#: Whole responses one view keeps with their nonce, by the nonce and what they carry. A
#: stream's nonces count its responses, so alike streams, which were sent the same
#: responses, are at the same count: at a push they ask for the same few nonces, and
#: share one response object rather than each copying the encoded view to add its nonce
#: (a quarter of a push's evaluation at 10,000 proxies). A few counts at once, so a
#: handful.
MAX_FRAMED = 8


#: Decisions one view keeps (:meth:`View.memo`: the routes held back for clusters still
#: warming), by the versions the client acknowledged. Streams come from a few states at
#: once, so a handful.
MAX_VIEW_DECISIONS = 16


@dataclass(frozen=True)
class View:
    """The resources of one type a subscription selects, and their SotW version.

    Shared by every stream that selects the same: never modify ``resources``.
    """

    resources: dict[str, Resource]
    version: str
    _encoded: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)
    _changes: dict[tuple[str, str], tuple[bytes, int]] = field(
        default_factory=dict, compare=False, repr=False
    )
    _framed: dict[tuple[str, str | None, str], bytes] = field(
        default_factory=dict, compare=False, repr=False
    )
    _decisions: dict[tuple[str, ...], Any] = field(default_factory=dict, compare=False, repr=False)
    _delta_framed: dict[tuple[Hashable, ...], bytes] = field(
        default_factory=dict, compare=False, repr=False
    )

    def sotw_payload(self, type_url: str, nonce: str) -> bytes:
        """The DiscoveryResponse for this view: encoded once, the nonce appended per stream."""
        prefix = self._encoded.get(type_url)
        if prefix is None:
            ordered = (self.resources[n].sotw_field for n in sorted(self.resources))
            prefix = self._encoded[type_url] = wire.discovery_response(
                self.version, type_url, "", ordered
            )
        return self._with_nonce(type_url, None, prefix, nonce)

    def sotw_changes(
        self, type_url: str, nonce: str, held: Mapping[str, Resource], held_version: str
    ) -> tuple[bytes, int]:
        """A DiscoveryResponse at this view's version that carries only what differs from
        ``held`` (what the client holds, at SotW version ``held_version``), and how many
        resources it carries. Encoded once per version held, the nonce appended per
        stream."""
        found = lru_get(self._changes, (type_url, held_version))
        if found is None:
            changed = [
                res.sotw_field
                for name, res in sorted(self.resources.items())
                if (had := held.get(name)) is None or had.version != res.version
            ]
            prefix = wire.discovery_response(self.version, type_url, "", changed)
            found = (prefix, len(changed))
            lru_put(self._changes, (type_url, held_version), found, MAX_ENCODED_CHANGES)
        return self._with_nonce(type_url, held_version, found[0], nonce), found[1]

    def delta_payload(
        self,
        type_url: str,
        system_version: str,
        nonce: str,
        changed: Sequence[Resource],
        removed: Sequence[str],
    ) -> bytes:
        """A DeltaDiscoveryResponse carrying ``changed`` and ``removed``, one object for
        every stream sent the same at the same nonce (:data:`MAX_FRAMED`): alike Delta
        streams of this view are sent the same changes at the same push."""
        key = (type_url, system_version, nonce, tuple(changed), tuple(removed))
        found = lru_get(self._delta_framed, key)
        if found is None:
            payload = wire.delta_discovery_response(
                system_version, type_url, nonce, (r.delta_field for r in changed), removed
            )
            found = lru_put(self._delta_framed, key, payload, MAX_FRAMED)
        return found

    def memo(self, key: tuple[str, ...], compute: Callable[[], T]) -> T:
        """A decision shared by every stream that selects this view, computed once per key
        (:data:`MAX_VIEW_DECISIONS`). The key must name everything the decision depends
        on besides the view's resources."""
        found = lru_get(self._decisions, key)
        if found is None:
            found = lru_put(self._decisions, key, compute(), MAX_VIEW_DECISIONS)
        return cast(T, found)

    def _with_nonce(
        self, type_url: str, held_version: str | None, prefix: bytes, nonce: str
    ) -> bytes:
        """``prefix`` (all of the response but its nonce; ``held_version``: what the client
        holds, None for the whole view) with ``nonce`` appended, one object for every
        stream at that nonce (:data:`MAX_FRAMED`). By type too: a snapshot's empty views
        are one view for every type it lacks."""
        key = (type_url, held_version, nonce)
        framed = lru_get(self._framed, key)
        if framed is None:
            framed = lru_put(self._framed, key, prefix + wire.field_str(5, nonce), MAX_FRAMED)
        return framed


def version_of(resources: Mapping[str, Resource]) -> str:
    """A SotW ``version_info``: a hash of the names and versions of what is sent."""
    return digest("\n".join(f"{n}={resources[n].version}" for n in sorted(resources)).encode())


@dataclass(frozen=True)
class Snapshot:
    """Everything one proxy should have: type URL -> name -> resource."""

    resources: Mapping[str, Bucket]
    #: Identifies the world + generator generation this snapshot was computed from.
    generation: int = 0
    #: Decisions shared by every stream of this snapshot (:meth:`memo`), made on first use.
    _memo: dict[tuple[Hashable, ...], Any] = field(default_factory=dict, compare=False, repr=False)

    def of_type(self, type_url: str) -> Mapping[str, Resource]:
        return self.resources.get(type_url, _NOTHING)

    def memo(self, key: tuple[Hashable, ...], compute: Callable[[], T]) -> T:
        """A decision shared by every stream of this snapshot, computed once per key.

        The key must name everything the decision depends on besides the snapshot.
        """
        found = lru_get(self._memo, key)
        if found is None:
            found = lru_put(self._memo, key, compute(), MAX_CACHED_VIEWS)
        return cast(T, found)

    def view(self, type_url: str, names: frozenset[str] | None) -> View:
        """The resources of ``type_url`` named in ``names`` (None: all of them).

        Computed once per subscription shape for every snapshot that shares this type's
        resources (all proxies of one config key, and of other keys that get the same
        clusters, say): a push to ten thousand proxies selects and hashes a handful of
        times. The returned mapping is shared: callers must not modify it.
        """
        return self.resources.get(type_url, _NOTHING).view(names)

    def check_consistent(self) -> None:
        """Raise :class:`SnapshotError` naming every reference to a missing resource.

        Like go-control-plane's ``Snapshot.Consistent``: an EDS cluster without its
        assignment, or a listener without its route configuration, would leave the proxy
        warming until its initial fetch timeout.
        """
        if all(
            names <= self.of_type(t).keys()
            for bucket in self.resources.values()
            for t, names in bucket.refs().items()
        ):
            return
        missing = [
            f"{xds.short(res.type_url)} {res.name!r} needs {xds.short(t)} {n!r}"
            for by_name in self.resources.values()
            for res in by_name.values()
            for t, n in res.refs
            if n not in self.of_type(t)
        ]
        raise SnapshotError("inconsistent snapshot: " + "; ".join(sorted(missing)))


def build_snapshot(
    interner: ResourceInterner,
    generated: Mapping[str, Sequence[Any]] | Iterable[Any],
    generation: int = 0,
) -> Snapshot:
    """Serialize and version translator output (messages grouped by type URL, or a flat
    list), as resources of ``generation`` (:meth:`ResourceInterner.advance`)."""
    interner.advance(generation)
    groups = generated.values() if isinstance(generated, Mapping) else [generated]
    by_type: dict[str, Bucket] = {}
    for group in groups:
        for type_url, bucket in interner.buckets(group).items():
            have = by_type.get(type_url)
            if have is None:
                by_type[type_url] = bucket  # shared with other snapshots: not modified
                continue
            for name in bucket.keys() & have.keys():
                raise SnapshotError(f"two {xds.short(type_url)} resources named {name!r}")
            by_type[type_url] = Bucket((*have.items(), *bucket.items()))
    return Snapshot(resources=by_type, generation=generation)


_CLASS_OF_TYPE: dict[str, Any] = {t: c for c, t in _TYPE_OF_CLASS.items()}


REDACTED = "[redacted]"


def decode(res: Resource) -> dict[str, Any]:
    """The resource as JSON-ready data, for debug pages. Private keys are redacted."""
    message = _CLASS_OF_TYPE[res.type_url].FromString(res.body)
    if res.type_url == xds.SECRET and message.HasField("tls_certificate"):
        message.tls_certificate.ClearField("private_key")
    data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    if res.type_url == xds.SECRET and "tls_certificate" in data:
        data["tls_certificate"]["private_key"] = REDACTED
    return data
