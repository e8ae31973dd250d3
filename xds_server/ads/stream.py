"""The xDS protocol state of one ADS stream, State-of-the-World or Delta. No I/O here.

The server feeds a :class:`StreamState` the requests it reads (``on_request``) and the
snapshots the cache computes for its proxy (``set_snapshot``), and asks it what to send
(``responses``). Keeping the protocol rules in one small, synchronous class makes them
testable without sockets (``tests/ads/test_stream.py``) and keeps every stream's state
in one place.

The rules, each from a failure seen with a real Envoy:

* Stale nonces are dropped. A request whose ``response_nonce`` is not the latest sent on
  this stream for its type is an answer to something superseded. Under Delta every
  response carries only its own changes, so each one still unanswered is remembered
  and its answer applied to exactly its resources: a NACK of an older response leaves
  them un-acknowledged even when a later response is ACKed.
* The first request for a type subscribes, whatever nonce it carries (a client may keep
  the nonce of its previous stream across a reconnect).
* A NACK keeps the last accepted version: what was recorded as sent rolls back to what
  was acknowledged, and the rejected version is not sent again (no resend loop) until
  the desired version changes.
* SotW: a second request carrying an already-acknowledged nonce is a re-request (Envoy
  re-warming an updated cluster asks again with the same nonce and names) and is
  answered, or the cluster stalls for the 15 s initial fetch timeout.
* Whenever a cluster is sent, its ClusterLoadAssignment follows, even if unchanged
  (under Delta, Envoy does not ask again after a cluster update).
* SotW responses of routes, endpoints and secrets carry only what changed since what the
  client acknowledged, as the xDS protocol allows for every type but listeners and
  clusters (the client keeps what a response leaves out): an endpoint turning unready is
  one assignment per proxy, not all of them. Everything is sent when it is not known
  what the client holds (a response unanswered) and when the client asks for everything
  (a first request, a re-request, a cluster re-sent before its endpoints).
* Make-before-break: types go out in ``xds.PUSH_ORDER``, and a resource is only
  removed from a type once every later type has been acknowledged at its new state.
  Until then the proxy keeps the old cluster that old routes may still point at. A
  route configuration that names a new cluster waits until the proxy has acknowledged
  that cluster and its endpoints, so no request meets a cluster that is still warming.
* A reconnecting proxy that already holds the current versions is sent nothing. A Delta
  proxy that holds resources which no longer exist (deleted while it was connected to
  another replica, or while the control plane was down) is sent their removal.
* Delta: a subscription to a name that does not exist is answered in
  ``removed_resources``, as the xDS protocol says, so the client stops waiting for it.
* Everything a client can make a stream hold is bounded (:class:`StreamLimits`); a
  request past a bound closes that stream alone, with a message naming the bound.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mesh import xds
from xds_server.ads.snapshot import Resource, Snapshot, View, version_of

SERVED_TYPES = frozenset(xds.PUSH_ORDER)

#: In ``TypeState.rejected``: the client rejected the removal of that name.
REMOVAL = ""


@dataclass(frozen=True)
class StreamLimits:
    """What one client may make its stream hold. Past a bound, the request is refused and
    that stream alone is closed, with a message naming the bound (the proxy reconnects;
    a real one never gets near these)."""

    #: Resource names one request may carry, and one Delta subscription may hold, per
    #: type. SotW sends its whole subscription in every request, so both bounds are one:
    #: a Delta stream may not hold more than a SotW request may name. 10,000 is several
    #: times the clusters of the largest meshes Envoy is run in; each name costs a few
    #: hundred bytes of stream state.
    max_names: int = 10_000
    #: Longest resource name, and longest version a client says it holds, in characters.
    #: inferlane's names are Istio-style cluster names (under 300) and its versions 16 hex
    #: digits.
    max_name_length: int = 1024
    #: Delta responses of one type sent and not yet answered. Each is remembered until its
    #: ACK or NACK, so that an answer applies to exactly its resources. Envoy answers each
    #: within milliseconds; a client that stops answering is sent nothing more of that type
    #: until it does (SotW needs no bound: a response replaces the previous one).
    max_unanswered: int = 16


class ProtocolError(Exception):
    """A request this stream cannot serve. The stream is closed with this message.

    ``reason`` labels ``inferlane_xds_rejected_streams_total``: ``protocol`` for a request
    that breaks the protocol, ``over_limit`` for one past a :class:`StreamLimits` bound.
    """

    def __init__(self, message: str, reason: str = "protocol") -> None:
        super().__init__(message)
        self.reason = reason


class Outcome(enum.Enum):
    SUBSCRIBE = "subscribe"
    ACK = "ack"
    NACK = "nack"
    STALE = "stale"
    REREQUEST = "rerequest"


class SyncStatus(enum.StrEnum):
    SYNCED = "SYNCED"
    STALE = "STALE"
    NACKED = "NACKED"
    NOT_SENT = "NOT SENT"


@dataclass(frozen=True)
class Outgoing:
    """One response to write."""

    type_url: str
    nonce: str
    version: str
    payload: bytes
    resources: int
    removed: int = 0


@dataclass(frozen=True)
class RequestResult:
    type_url: str
    outcome: Outcome
    nonce: str = ""
    error: str = ""
    #: Seconds from the change to this ACK, when it acknowledges a push.
    convergence: float | None = None


@dataclass(frozen=True)
class DeltaSent:
    """One Delta response not yet answered: exactly the changes it carries."""

    changed: dict[str, Resource]
    removed: tuple[str, ...]
    #: Monotonic time of the change it carries.
    change_ts: float | None


@dataclass
class TypeState:
    """Per type URL: subscription, what was sent and acknowledged, the last NACK."""

    type_url: str
    subscribed: bool = False
    wildcard: bool = False
    #: Subscribed names (besides a wildcard). Replaced, never mutated, so it can key views.
    names: frozenset[str] = frozenset()
    #: What the proxy was sent / acknowledged. Under SotW these mappings are shared with
    #: snapshot views and replaced whole; under Delta they are private and edited, and
    #: ``sent`` is ``acked`` with every unanswered response applied in order.
    sent: dict[str, Resource] = field(default_factory=dict)
    sent_version: str = ""
    acked: dict[str, Resource] = field(default_factory=dict)
    acked_version: str = ""
    #: The latest nonce sent.
    nonce: str = ""
    pending: bool = False
    nacked: bool = False
    last_error: str = ""
    #: SotW: the version_info the client NACKed; Delta: name -> version it NACKed
    #: (:data:`REMOVAL` for a removal it rejected).
    rejected_version: str = ""
    rejected: dict[str, str] = field(default_factory=dict)
    #: Respond even if nothing changed (a first request, a re-request).
    force: bool = False
    #: Delta: names to re-send even if unchanged (an EDS assignment after its cluster).
    force_names: set[str] = field(default_factory=set)
    #: SotW reconnect: the version the client says it holds, until compared once.
    client_version: str = ""
    #: Delta reconnect: name -> version the client says it holds, until compared once.
    client_versions: dict[str, str] = field(default_factory=dict)
    #: Delta: the responses not yet answered, by nonce, oldest first.
    unanswered: dict[str, DeltaSent] = field(default_factory=dict)
    #: Delta: subscribed names the client was told do not exist.
    absent: set[str] = field(default_factory=set)
    #: SotW: monotonic time of the change the latest response carries.
    change_ts: float | None = None
    responses_sent: int = 0

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def status(self) -> SyncStatus:
        if self.nacked:
            return SyncStatus.NACKED
        if not self.nonce and not self.acked_version:
            return SyncStatus.NOT_SENT
        if self.pending:
            return SyncStatus.STALE
        return SyncStatus.SYNCED


@dataclass(frozen=True)
class _SotwSend:
    """A SotW response decided, but for its nonce: all of ``view``, or (``held`` given)
    what differs from what the client holds, at SotW version ``held_version``."""

    view: View
    held: dict[str, Resource] | None
    held_version: str


@dataclass(frozen=True)
class _Decided:
    """One type's state after a SotW evaluation, and the response it decided."""

    sent: dict[str, Resource]
    sent_version: str
    acked: dict[str, Resource]
    acked_version: str
    client_version: str
    force: bool
    nacked: bool
    send: _SotwSend | None


@dataclass(frozen=True)
class _SotwDecision:
    """A SotW evaluation's outcome, per subscribed type in push order, for every stream
    of one snapshot in the state it was made in."""

    types: tuple[_Decided, ...]
    holding: bool
    #: What the key names by identity.
    kept: tuple[object, ...]


def _state_key(st: TypeState, view: View) -> tuple[Hashable, ...]:
    """Everything a SotW evaluation reads of one type, besides the snapshot.

    The view stands for the names subscribed (a bucket keeps one view per subscription,
    and the decision keeps it) but a wildcard's names, which only the endpoints that
    follow a cluster read. Sent and acknowledged mappings are named by identity, even
    empty ones: the evaluation reads their content and the identity of their resources,
    and a replay hands the stream the objects the evaluation left it with, so that
    which of them are one object stays as an evaluation would leave it. Their versions
    go with them (SotW sets a mapping and its version together).
    """
    return (
        st.type_url,
        id(view),
        st.names if st.wildcard else None,
        id(st.sent),
        id(st.acked),
        st.pending,
        st.nacked,
        st.force,
        st.rejected_version,
        st.client_version,
    )


def _name(res: Resource) -> str:
    return res.name


def _held_elsewhere(type_url: str, name: str, version: str) -> Resource:
    """A resource a reconnecting client says it holds at a version this server does not
    have: only its name and version are known."""
    return Resource(type_url=type_url, name=name, version=version, body=b"")


class StreamState:
    """One ADS stream's protocol state. ``delta`` picks Delta or State-of-the-World rules."""

    def __init__(
        self,
        *,
        delta: bool,
        clock: Callable[[], float] = time.monotonic,
        limits: StreamLimits | None = None,
        share_decisions: bool = True,
    ) -> None:
        self.delta = delta
        self.clock = clock
        self.limits = limits or StreamLimits()
        #: Decide once for every stream alike: SotW streams per snapshot and state
        #: (:meth:`_sotw_shared`), and routes held back per view and versions held
        #: (:meth:`_held_routes_cached`); off, every evaluation is this stream's own (the
        #: tests hold one against the other).
        self.share_decisions = share_decisions
        self.types: dict[str, TypeState] = {}
        self.snapshot: Snapshot | None = None
        self.change_ts: float | None = None
        self._nonce = 0
        #: Something may be due: a new snapshot, a subscription change, a re-request, or
        #: an ACK while something is held back. Most ACKs change nothing to send, and
        #: skipping their evaluation halves a large push's cost.
        self._dirty = True
        #: The last evaluation held something back (a deferred removal, a cold route, a
        #: type with too many responses unanswered).
        self._holding = False
        self._names_changed = False

    # -- inputs -----------------------------------------------------------------

    def set_snapshot(self, snapshot: Snapshot, change_ts: float | None = None) -> None:
        self.snapshot = snapshot
        self.change_ts = change_ts
        self._dirty = True

    def on_request(self, req: Any) -> RequestResult:
        """Apply one DiscoveryRequest or DeltaDiscoveryRequest. Raise ProtocolError if bad."""
        self._names_changed = False
        result = self._on_request(req)
        if self._may_be_due(result, req):
            self._dirty = True
        return result

    def _may_be_due(self, result: RequestResult, req: Any) -> bool:
        """Whether this request can make anything due. A plain ACK cannot, unless the last
        evaluation held something back waiting for exactly such an ACK."""
        if result.outcome in (Outcome.SUBSCRIBE, Outcome.REREQUEST) or self._holding:
            return True
        if self.delta:
            return bool(req.resource_names_subscribe or req.resource_names_unsubscribe)
        return self._names_changed

    def _on_request(self, req: Any) -> RequestResult:
        type_url: str = req.type_url
        if type_url not in SERVED_TYPES:
            raise ProtocolError(
                f"unknown type URL {type_url!r}; served: {', '.join(sorted(SERVED_TYPES))}"
            )
        if self.delta:
            names_in: Iterable[str] = (
                *req.resource_names_subscribe,
                *req.resource_names_unsubscribe,
                *req.initial_resource_versions,
            )
            versions: Iterable[str] = req.initial_resource_versions.values()
        else:
            names_in, versions = req.resource_names, (req.version_info,)
        self._check_names(type_url, names_in, versions)
        st = self.types.get(type_url)
        if st is None:
            st = self.types[type_url] = TypeState(type_url)
        first = not st.subscribed
        nonce: str = req.response_nonce
        if self.delta:
            # The answer first: the client processed that response before it changed its
            # subscription. Then the change, which is never dropped with a stale nonce
            # (Delta subscriptions are incremental).
            result = (
                RequestResult(type_url, Outcome.SUBSCRIBE)
                if first or not nonce
                else self._delta_answer(st, nonce, req)
            )
            self._delta_subscription(st, req)
            return result
        stale = bool(nonce) and not first and nonce != st.nonce
        if not stale:
            self._sotw_subscription(st, req)
        if first or not nonce:
            return RequestResult(type_url, Outcome.SUBSCRIBE)
        if stale:
            return RequestResult(type_url, Outcome.STALE, nonce=nonce)
        if not st.pending:
            # The latest response was answered already: this repeats that answer.
            if req.HasField("error_detail") or st.nacked:
                return RequestResult(type_url, Outcome.STALE, nonce=nonce)
            st.force = True
            return RequestResult(type_url, Outcome.REREQUEST, nonce=nonce)
        if req.HasField("error_detail"):
            return self._nack(st, nonce, _error_message(req))
        return self._ack(st, nonce)

    def _check_names(self, type_url: str, names: Iterable[str], versions: Iterable[str]) -> None:
        limits = self.limits
        for count, name in enumerate(names, start=1):
            if count > limits.max_names:
                raise ProtocolError(
                    f"{xds.short(type_url)} request names over {limits.max_names} resources",
                    "over_limit",
                )
            if len(name) > limits.max_name_length:
                raise ProtocolError(
                    f"{xds.short(type_url)} resource name of {len(name)} characters, "
                    f"over {limits.max_name_length}",
                    "over_limit",
                )
        for version in versions:
            if len(version) > limits.max_name_length:
                raise ProtocolError(
                    f"{xds.short(type_url)} version of {len(version)} characters, "
                    f"over {limits.max_name_length}",
                    "over_limit",
                )

    def _sotw_subscription(self, st: TypeState, req: Any) -> None:
        names = set(req.resource_names)
        first = not st.subscribed
        if "*" in names:
            names.discard("*")
            wildcard = True
        else:
            wildcard = not names and st.type_url in xds.WILDCARD_TYPES and (first or st.wildcard)
        self._names_changed = names != st.names or wildcard != st.wildcard
        if names != st.names:
            st.names = frozenset(names)
        st.wildcard = wildcard
        if first:
            st.subscribed = True
            if req.version_info:
                st.client_version = req.version_info
            else:
                st.force = True

    def _delta_subscription(self, st: TypeState, req: Any) -> None:
        sub = set(req.resource_names_subscribe)
        unsub = set(req.resource_names_unsubscribe)
        first = not st.subscribed
        if first and not sub and st.type_url in xds.WILDCARD_TYPES:
            st.wildcard = True
        if "*" in sub:
            st.wildcard = True
            sub.discard("*")
        if "*" in unsub:
            st.wildcard = False
            unsub.discard("*")
        if sub or unsub:
            names = (st.names | sub) - unsub
            if len(names) > self.limits.max_names:
                raise ProtocolError(
                    f"{xds.short(st.type_url)} subscription of {len(names)} names, over the "
                    f"limit of {self.limits.max_names}",
                    "over_limit",
                )
            st.names = frozenset(names)
        for name in unsub:
            st.sent.pop(name, None)
            st.acked.pop(name, None)
            st.absent.discard(name)
        if first:
            st.subscribed = True
            st.client_versions = dict(req.initial_resource_versions)
            if not st.client_versions:
                st.force = True

    def _adopt_client_versions(self, st: TypeState) -> None:
        """A reconnecting Delta client lists what it holds: record all of it as sent and
        acknowledged (once a snapshot exists to compare with). What it holds at another
        version is then sent, and what no longer exists is removed."""
        assert self.snapshot is not None
        have = self.snapshot.of_type(st.type_url)
        for name, version in st.client_versions.items():
            if not st.wants(name):
                continue
            res = have.get(name)
            if res is None or res.version != version:
                res = _held_elsewhere(st.type_url, name, version)
            st.sent[name] = st.acked[name] = res
        st.client_versions = {}
        st.sent_version = st.acked_version = version_of(st.sent)

    def _ack(self, st: TypeState, nonce: str) -> RequestResult:
        st.acked = st.sent  # SotW replaces ``sent`` whole, so it can be shared
        st.acked_version = st.sent_version
        st.pending = False
        st.nacked = False
        st.rejected_version = ""
        took = None if st.change_ts is None else self.clock() - st.change_ts
        st.change_ts = None
        return RequestResult(st.type_url, Outcome.ACK, nonce=nonce, convergence=took)

    def _nack(self, st: TypeState, nonce: str, message: str) -> RequestResult:
        st.rejected_version = st.sent_version
        st.sent = st.acked
        st.sent_version = st.acked_version
        st.pending = False
        st.nacked = True
        st.last_error = message
        st.change_ts = None
        return RequestResult(st.type_url, Outcome.NACK, nonce=nonce, error=message)

    def _delta_answer(self, st: TypeState, nonce: str, req: Any) -> RequestResult:
        """An ACK or NACK of one of the responses still unanswered.

        A client answers responses in the order it got them, so the responses before this
        one that got no answer were applied (a client that answers only the latest).
        """
        if nonce not in st.unanswered:
            if nonce == st.nonce and not req.HasField("error_detail"):
                # The latest response was answered already: a subscription change that
                # carries its nonce.
                return RequestResult(st.type_url, Outcome.REREQUEST, nonce=nonce)
            return RequestResult(st.type_url, Outcome.STALE, nonce=nonce)
        error = _error_message(req) if req.HasField("error_detail") else None
        for answered in list(st.unanswered):
            sent = st.unanswered.pop(answered)
            if answered != nonce:
                self._delta_apply(st, sent)
                continue
            st.pending = bool(st.unanswered)
            if error is None:
                self._delta_apply(st, sent)
                st.acked_version = version_of(st.acked)
                st.nacked = bool(st.rejected)
                took = None if sent.change_ts is None else self.clock() - sent.change_ts
                return RequestResult(st.type_url, Outcome.ACK, nonce=nonce, convergence=took)
            for name, res in sent.changed.items():
                st.rejected[name] = res.version
            for name in sent.removed:
                st.rejected[name] = REMOVAL
            # What the client will hold: what it holds, with the later responses applied.
            st.sent = dict(st.acked)
            for later in st.unanswered.values():
                for name, res in later.changed.items():
                    if st.wants(name):
                        st.sent[name] = res
                for name in later.removed:
                    st.sent.pop(name, None)
            st.sent_version = version_of(st.sent)
            st.acked_version = version_of(st.acked)
            st.nacked = True
            st.last_error = error
            return RequestResult(st.type_url, Outcome.NACK, nonce=nonce, error=error)
        raise AssertionError("unreachable: the nonce is unanswered")

    @staticmethod
    def _delta_apply(st: TypeState, sent: DeltaSent) -> None:
        """Record one response as held by the client (names unsubscribed since are not)."""
        for name, res in sent.changed.items():
            if st.wants(name):
                st.acked[name] = res
            st.rejected.pop(name, None)
        for name in sent.removed:
            st.acked.pop(name, None)
            st.rejected.pop(name, None)

    # -- outputs ----------------------------------------------------------------

    def _plain(self, st: TypeState) -> View:
        if self.snapshot is None:
            return View({}, version_of({}))
        return self.snapshot.view(st.type_url, None if st.wildcard else st.names)

    def _converged(self, st: TypeState, plain: View) -> bool:
        """Whether the proxy has acknowledged exactly what the snapshot has for it."""
        if not self.delta:
            return st.acked_version == plain.version
        if st.acked == plain.resources:
            return True  # the same resources (they compare by identity): no name to visit
        if plain.resources.keys() != st.acked.keys():
            return False
        return all(st.acked[n].version == r.version for n, r in plain.resources.items())

    def _desired(
        self, index: int, st: TypeState, view: View, unconverged: set[str]
    ) -> tuple[dict[str, Resource], View]:
        """What to hold for this type now, as a view (shared when nothing is held back)."""
        desired: dict[str, Resource] = view.resources
        if unconverged and not unconverged.isdisjoint(xds.PUSH_ORDER[index + 1 :]):
            # Defer removals not sent yet; one already on its way is not taken back.
            kept = {
                n: r
                for n, r in st.sent.items()
                if n not in desired and n in st.acked and st.wants(n)
            }
            if kept:
                desired = {**desired, **kept}
        if st.type_url == xds.ROUTE:
            if desired is view.resources and not self.delta and self.share_decisions:
                desired = self._held_routes_cached(st, view)
            else:
                desired = self._hold_routes_until_clusters_warm(st, desired)
        if desired is view.resources:
            return desired, view
        return desired, View(desired, version_of(desired))

    def _held_routes_cached(self, st: TypeState, view: View) -> dict[str, Resource]:
        """The route hold for SotW streams, shared through the view: streams in the same
        acknowledged state decide once, whichever snapshot they hold (the route
        configurations of every proxy of one kind are one view, whatever its identity).

        Not for Delta: a reconnected Delta client may hold a cluster at a version its
        snapshot lacks, known by name and version alone (so without the endpoints it
        refers to), and an acknowledged version cannot tell it from the cluster itself."""
        cds = self.types.get(xds.CLUSTER)
        eds = self.types.get(xds.ENDPOINT)
        # Whether clusters are subscribed by wildcard is a key of its own: a client that
        # has acknowledged none holds version "" either way, and is held back only then.
        wildcard = cds is not None and cds.wildcard
        key = (
            st.acked_version,
            str(wildcard),
            cds.acked_version if cds is not None and wildcard else "",
            eds.acked_version if eds is not None else "",
        )
        return view.memo(key, lambda: self._hold_routes_until_clusters_warm(st, view.resources))

    def _hold_routes_until_clusters_warm(
        self, st: TypeState, desired: dict[str, Resource]
    ) -> dict[str, Resource]:
        """Keep the proxy's current version of a route configuration that names a cluster
        the proxy has not yet acknowledged with its endpoints.

        Envoy warms a new cluster until its endpoints arrive, but routes are not warmed:
        a route to a still-warming cluster answers 503. Only for wildcard CDS (Envoy);
        gRPC subscribes to clusters by name after it has the routes, so it must get them.
        """
        cds = self.types.get(xds.CLUSTER)
        if cds is None or not cds.wildcard:
            return desired
        eds = self.types.get(xds.ENDPOINT)
        eds_acked = eds.acked if eds is not None else {}

        def warm(cluster: str) -> bool:
            res = cds.acked.get(cluster)
            return res is not None and all(n in eds_acked for t, n in res.refs if t == xds.ENDPOINT)

        cold = [
            name
            for name, res in desired.items()
            if not all(warm(n) for t, n in res.refs if t == xds.CLUSTER)
        ]
        if not cold:
            return desired
        held = dict(desired)
        for name in cold:
            previous = st.acked.get(name)
            if previous is None:
                del held[name]
            else:
                held[name] = previous
        return held

    def responses(self) -> list[Outgoing]:
        """Everything to send now, in push order, with the state recorded as sent.

        SotW streams in the same state, holding the same snapshot, decide once
        (:meth:`_sotw_shared`)."""
        if self.snapshot is None or not self._dirty:
            return []
        self._dirty = False
        self._holding = False
        subscribed = [
            (index, st)
            for index, type_url in enumerate(xds.PUSH_ORDER)
            if (st := self.types.get(type_url)) is not None and st.subscribed
        ]
        for _, st in subscribed:
            if st.client_versions:
                self._adopt_client_versions(st)
        plain = {st.type_url: self._plain(st) for _, st in subscribed}
        if not self.delta and self.share_decisions:
            return self._sotw_shared(subscribed, plain)
        return self._evaluate(subscribed, plain)[0]

    def _evaluate(
        self, subscribed: list[tuple[int, TypeState]], plain: dict[str, View]
    ) -> tuple[list[Outgoing], list[_SotwSend | None]]:
        """Apply the protocol rules to this stream: the responses, and (SotW) what each
        type's response was decided to be before its nonce."""
        unconverged = {
            st.type_url for _, st in subscribed if not self._converged(st, plain[st.type_url])
        }
        out: list[Outgoing] = []
        sends: list[_SotwSend | None] = []
        for index, st in subscribed:
            type_url = st.type_url
            desired, view = self._desired(index, st, plain[type_url], unconverged)
            if desired is not plain[type_url].resources:
                self._holding = True
            # What was sent, to see which clusters are sent new (Delta edits it in place).
            before = st.sent if not self.delta or type_url != xds.CLUSTER else dict(st.sent)
            msg: Outgoing | None
            if self.delta:
                msg = self._delta_response(st, desired, plain[type_url])
            else:
                send = self._sotw_decide(st, view)
                sends.append(send)
                msg = None if send is None else self._sotw_send(st, send)
            if msg is not None:
                out.append(msg)
                if type_url == xds.CLUSTER:
                    changed = [r for n, r in st.sent.items() if before.get(n) is not r]
                    self._follow_with_endpoints(changed)
        return out, sends

    def _sotw_shared(
        self, subscribed: list[tuple[int, TypeState]], plain: dict[str, View]
    ) -> list[Outgoing]:
        """:meth:`_evaluate` once per snapshot and stream state, its outcome replayed on
        every other stream of the snapshot in that state.

        Most streams of one config key are alike (subscribed alike, sent and acknowledged
        the same), and a push evaluates each. A SotW evaluation reads only the snapshot's
        views and the state the key names, and writes the state the decision records; the
        nonce, the time of the change and the count of responses are each stream's own,
        and :meth:`_sotw_send` adds them in the same order an evaluation would. The key
        names mappings by identity (SotW replaces them whole, so alike streams share them),
        and the decision keeps them, so that no other object takes their ids.
        """
        assert self.snapshot is not None
        key = tuple(_state_key(st, plain[st.type_url]) for _, st in subscribed)
        evaluated: list[Outgoing] | None = None

        def evaluate() -> _SotwDecision:
            nonlocal evaluated
            kept = tuple((st.sent, st.acked, plain[st.type_url]) for _, st in subscribed)
            evaluated, sends = self._evaluate(subscribed, plain)
            decided = tuple(
                _Decided(
                    st.sent,
                    st.sent_version,
                    st.acked,
                    st.acked_version,
                    st.client_version,
                    st.force,
                    st.nacked,
                    send,
                )
                for (_, st), send in zip(subscribed, sends, strict=True)
            )
            return _SotwDecision(decided, self._holding, kept)

        decision = self.snapshot.memo(("sotw-decision", *key), evaluate)
        if evaluated is not None:
            return evaluated
        out: list[Outgoing] = []
        for (_, st), d in zip(subscribed, decision.types, strict=True):
            if d.send is not None:
                out.append(self._sotw_send(st, d.send))
            st.sent, st.sent_version = d.sent, d.sent_version
            st.acked, st.acked_version = d.acked, d.acked_version
            st.client_version, st.force, st.nacked = d.client_version, d.force, d.nacked
        self._holding = decision.holding
        return out

    def _follow_with_endpoints(self, clusters: list[Resource]) -> None:
        """Re-send the assignments of clusters just sent new or changed (Envoy re-warms
        them and, under Delta, does not ask again)."""
        eds = self.types.get(xds.ENDPOINT)
        if eds is None or not eds.subscribed:
            return
        refs = {n for res in clusters for t, n in res.refs if t == xds.ENDPOINT}
        if self.delta:
            eds.force_names |= refs & eds.names
        elif refs & eds.names:
            eds.force = True

    def _next_nonce(self) -> str:
        self._nonce += 1
        return str(self._nonce)

    def _record_sent(self, st: TypeState, nonce: str) -> None:
        st.nonce = nonce
        st.pending = True
        st.force = False
        st.change_ts = self.change_ts
        st.responses_sent += 1

    def _sotw_decide(self, st: TypeState, view: View) -> _SotwSend | None:
        """Whether to send ``view`` to a SotW client, and how much of it; the state is
        recorded as sent but for the nonce (:meth:`_sotw_send`)."""
        desired, version = view.resources, view.version
        if st.client_version:
            holds, st.client_version = st.client_version == version, ""
            if holds:
                st.sent, st.acked = desired, desired
                st.sent_version = st.acked_version = version
                return None
            st.force = True
        if not st.force and version == st.sent_version:
            if not st.pending:
                st.nacked = False  # the proxy holds what is desired: the NACK is behind it
            return None
        if version == st.rejected_version:
            # Never again, forced or not (a cluster re-sent asks for its endpoints), until
            # the desired version moves past it: as Delta's per-name rejections.
            return None
        held = st.acked if self._changes_only(st) else None
        st.sent, st.sent_version = desired, version
        return _SotwSend(view, held, st.acked_version)

    def _sotw_send(self, st: TypeState, send: _SotwSend) -> Outgoing:
        """The response decided, with this stream's next nonce."""
        nonce = self._next_nonce()
        view = send.view
        if send.held is None:
            payload, count = view.sotw_payload(st.type_url, nonce), len(view.resources)
        else:
            payload, count = view.sotw_changes(st.type_url, nonce, send.held, send.held_version)
        self._record_sent(st, nonce)
        return Outgoing(st.type_url, nonce, view.version, payload, count)

    @staticmethod
    def _changes_only(st: TypeState) -> bool:
        """Whether this SotW response may carry only what changed since what the client
        holds: a type the client keeps whatever a response leaves out (all but listeners
        and clusters, per the xDS protocol), when it is known what the client holds (it
        has answered every response, and accepted one) and nothing asks for everything (a
        first request, a re-request, a cluster re-sent before its endpoints)."""
        return (
            st.type_url not in xds.FULL_STATE_TYPES
            and not st.force
            and bool(st.acked_version)
            and st.sent is st.acked
        )

    def _delta_response(
        self, st: TypeState, desired: dict[str, Resource], plain: View
    ) -> Outgoing | None:
        """``plain`` is the view the subscription selects: alike streams share it, and the
        response they are sent alike (:meth:`View.delta_payload`)."""
        if len(st.unanswered) >= self.limits.max_unanswered:
            self._holding = True  # until the client answers
            return None
        # A rejected version stays unsent until the desired version moves past it.
        superseded = [
            n
            for n, v in st.rejected.items()
            if (n in desired and desired[n].version != v) or (n not in desired and v != REMOVAL)
        ]
        for name in superseded:
            del st.rejected[name]
        if st.sent == desired and not st.force_names:
            # The same resources (they compare by identity): nothing changed or removed.
            changed: list[Resource] = []
            removed: list[str] = []
        else:
            changed = [
                r
                for n, r in desired.items()
                if (n in st.force_names or n not in st.sent or st.sent[n].version != r.version)
                and st.rejected.get(n) != r.version
            ]
            changed.sort(key=_name)
            removed = [n for n in st.sent if n not in desired and st.rejected.get(n) != REMOVAL]
        # Subscribed names that do not exist: the client stops waiting for them.
        exists = self.snapshot.of_type(st.type_url) if self.snapshot is not None else {}
        missing = (
            []
            if st.names <= exists.keys()
            else [
                n for n in st.names if n not in exists and n not in st.sent and n not in st.absent
            ]
        )
        st.force_names.clear()
        if not changed and not removed and not missing and not st.force:
            if not st.pending and not st.rejected:
                st.nacked = False  # the proxy holds what is desired: the NACK is behind it
            return None
        for res in changed:
            st.sent[res.name] = res
            st.absent.discard(res.name)
        for name in removed:
            del st.sent[name]
        removed.extend(missing)
        removed.sort()
        st.absent.update(n for n in removed if n in st.names)
        st.sent_version = version_of(st.sent)
        nonce = self._next_nonce()
        st.unanswered[nonce] = DeltaSent(
            {r.name: r for r in changed}, tuple(removed), self.change_ts
        )
        payload = plain.delta_payload(st.type_url, st.sent_version, nonce, changed, removed)
        self._record_sent(st, nonce)
        return Outgoing(st.type_url, nonce, st.sent_version, payload, len(changed), len(removed))

    # -- introspection ----------------------------------------------------------

    def sync_status(self) -> dict[str, dict[str, str]]:
        """Per type URL: versions sent and acknowledged, status, the last NACK's error."""
        return {
            t: {
                "status": st.status().value,
                "version_sent": st.sent_version,
                "version_acked": st.acked_version,
                "nonce": st.nonce,
                "last_nack": st.last_error,
            }
            for t, st in sorted(self.types.items())
        }


def _error_message(req: Any) -> str:
    return str(req.error_detail.message) or "(no message)"
