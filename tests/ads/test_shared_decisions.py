"""SotW streams of one snapshot decide once per state: a stream that shares decisions
behaves exactly as one that evaluates alone, and streams in different states get their
own answers however many alike streams decided before them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mesh import xds
from tests.ads.helpers import delta, sotw
from xds_server.ads.snapshot import ResourceInterner, Snapshot, build_snapshot
from xds_server.ads.stream import Outgoing, StreamState

C, E, R = xds.CLUSTER, xds.ENDPOINT, xds.ROUTE
STREAMS = 3


def mesh_snapshot(
    interner: ResourceInterner,
    endpoints: Mapping[str, int],
    routed: Sequence[str],
    generation: int,
    timeout: int = 1,
) -> Snapshot:
    """An EDS cluster per name in ``endpoints`` (each cluster's content is ``timeout``),
    its assignment (whose content is the number), and one route configuration ``r`` with
    a route to each cluster in ``routed`` that exists."""
    ads = config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )
    messages: list[Any] = []
    for name, weight in endpoints.items():
        cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
        cluster.eds_cluster_config.eds_config.CopyFrom(ads)
        cluster.connect_timeout.seconds = timeout
        cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
        cla.policy.overprovisioning_factor.value = weight
        messages += [cluster, cla]
    rc = route_pb2.RouteConfiguration(name="r")
    vhost = rc.virtual_hosts.add(name="all", domains=["*"])
    for name in routed:
        if name in endpoints:
            route = vhost.routes.add()
            route.match.prefix = f"/{name}"
            route.route.cluster = name
    messages.append(rc)
    return build_snapshot(interner, messages, generation)


def observable(s: StreamState) -> dict[str, tuple[object, ...]]:
    """Everything a stream's later behaviour depends on, by type: what it believes was
    sent and acknowledged, name by name, and every flag."""
    return {
        t: (
            {n: r.version for n, r in ts.sent.items()},
            ts.sent_version,
            {n: r.version for n, r in ts.acked.items()},
            ts.acked_version,
            ts.sent is ts.acked,
            ts.nonce,
            ts.pending,
            ts.nacked,
            ts.last_error,
            ts.rejected_version,
            ts.force,
            ts.client_version,
            ts.change_ts,
            ts.responses_sent,
            ts.wildcard,
            ts.names,
            {
                n: ({r: v.version for r, v in d.changed.items()}, d.removed)
                for n, d in ts.unanswered.items()
            },
            dict(ts.rejected),
            frozenset(ts.absent),
            frozenset(ts.force_names),
        )
        for t, ts in s.types.items()
    }


def sent(out: list[Outgoing]) -> list[tuple[object, ...]]:
    return [(o.type_url, o.nonce, o.version, o.payload, o.resources, o.removed) for o in out]


CLUSTERS = st.dictionaries(st.sampled_from("abc"), st.integers(1, 3))
ROUTED = st.lists(st.sampled_from("abc"), max_size=3)
#: Which streams a request goes to: all of them (they stay alike) or one.
TARGETS = st.one_of(st.just(tuple(range(STREAMS))), st.tuples(st.integers(0, STREAMS - 1)))
REQUEST = st.tuples(
    TARGETS,
    st.sampled_from([C, E, R]),
    st.lists(st.sampled_from("abcr"), max_size=3),
    st.sampled_from(["", "latest", "old"]),
    st.booleans(),
    st.booleans(),
)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("snapshot"), CLUSTERS, ROUTED, st.integers(1, 2)),
        st.tuples(st.just("request"), REQUEST),
        st.tuples(st.just("answer"), TARGETS, st.booleans()),
        st.tuples(st.just("reconnect"), st.integers(0, STREAMS - 1)),
    ),
    max_size=30,
)


class Pair:
    """A stream that shares decisions and its twin that evaluates alone, fed alike."""

    def __init__(self, snapshot: Snapshot, clock: list[float], is_delta: bool) -> None:
        self.delta = is_delta
        self.shared = StreamState(delta=is_delta, clock=lambda: clock[0])
        self.alone = StreamState(delta=is_delta, clock=lambda: clock[0], share_decisions=False)
        self.names: dict[str, list[str]] = {}
        self.set_snapshot(snapshot, clock[0])

    def set_snapshot(self, snapshot: Snapshot, change_ts: float) -> None:
        self.shared.set_snapshot(snapshot, change_ts)
        self.alone.set_snapshot(snapshot, change_ts)

    def request(self, req: Any) -> None:
        for s in (self.shared, self.alone):
            s.on_request(req)

    def subscribe(self, type_url: str, names: list[str], held: Mapping[str, str]) -> None:
        """The first request of a type; ``held``: the versions the client holds (SotW:
        ``""`` its version)."""
        self.names[type_url] = names
        node = type_url == C
        if self.delta:
            self.request(delta(type_url, names, initial=held, node=node))
        else:
            self.request(sotw(type_url, names, version=held.get("", ""), node=node))

    def ask(
        self, type_url: str, names: list[str], nonce: str, nack: bool, unsubscribe: bool
    ) -> None:
        """A request naming ``names`` (Delta: to subscribe to, or to unsubscribe from)."""
        error = "no" if nack else None
        if self.delta:
            sub, unsub = ([], names) if unsubscribe else (names, [])
            self.request(delta(type_url, sub, unsub, nonce=nonce, error=error))
            return
        self.names[type_url] = names
        self.request(sotw(type_url, names, nonce=nonce, error=error))

    def answer(self, type_url: str, nack: bool) -> None:
        """An answer to the latest response of ``type_url``."""
        ts = self.shared.types[type_url]
        error = "no" if nack else None
        if self.delta:
            self.request(delta(type_url, nonce=ts.nonce, error=error))
            return
        names = self.names.get(type_url, [])
        self.request(sotw(type_url, names, nonce=ts.nonce, version=ts.sent_version, error=error))

    def respond(self) -> list[Outgoing]:
        out = self.shared.responses()
        assert sent(out) == sent(self.alone.responses())
        assert observable(self.shared) == observable(self.alone)
        return out


#: Streams whose mappings are equal but not one object (a reconnected stream, others):
#: which of a stream's mappings are one object is its own, and decides what it is sent.
_EQUAL_BUT_NOT_ONE = [
    ("snapshot", {"a": 1}, ["a"], 1),
    ("snapshot", {}, [], 1),
    ("request", ((0, 1, 2), C, ["a"], "latest", False, False)),
    ("reconnect", 0),
    ("snapshot", {"a": 1}, [], 1),
    ("snapshot", {}, [], 1),
]


#: Clusters subscribed by name, not by wildcard, before any was acknowledged: routes are
#: held back for warming clusters only under a wildcard.
_NOT_WILDCARD = [("request", ((0, 1, 2), C, ["a"], "", False, False))]


#: A Delta client that reconnects holding a cluster at a version the snapshot lacks (it
#: is known by name and version alone), among streams that hold the cluster itself at
#: that version: routes to it are held back for those alone.
_HELD_ELSEWHERE: list[tuple[Any, ...]] = [
    ("answer", (0, 1, 2), True),
    ("snapshot", {"a": 1}, [], 1),
    ("request", ((0, 1, 2), C, [], "", False, False)),
    ("reconnect", 0),
    ("snapshot", {"a": 1}, ["a"], 2),
    ("reconnect", 0),
]


@settings(max_examples=500, deadline=None)
@given(CLUSTERS, ROUTED, OPS, st.booleans())
@example(clusters={}, routed=[], ops=_EQUAL_BUT_NOT_ONE, is_delta=False)
@example(clusters={"b": 1}, routed=["b"], ops=_NOT_WILDCARD, is_delta=False)
@example(clusters={"a": 1}, routed=[], ops=_HELD_ELSEWHERE, is_delta=True)
def test_a_stream_sharing_decisions_behaves_as_one_deciding_alone(
    clusters: dict[str, int], routed: list[str], ops: list[tuple[Any, ...]], is_delta: bool
) -> None:
    """Alike streams share each decision; requests to one stream alone (a NACK, a
    subscription, a stale answer, a reconnect) set it apart, and it is answered as it
    would be alone, as are the others."""
    interner = ResourceInterner()
    generation, clock = 1, [0.0]
    snapshot = mesh_snapshot(interner, clusters, routed, generation)
    pairs = [Pair(snapshot, clock, is_delta) for _ in range(STREAMS)]
    for pair in pairs:  # as Envoy: clusters by wildcard, then endpoints and routes by name
        pair.subscribe(C, [], {})
        pair.subscribe(E, sorted(clusters), {})
        pair.subscribe(R, ["r"], {})
        pair.respond()
    for op in ops:
        clock[0] += 1.0
        if op[0] == "snapshot":
            generation += 1
            snapshot = mesh_snapshot(interner, op[1], op[2], generation, op[3])
            for pair in pairs:
                pair.set_snapshot(snapshot, clock[0])
        elif op[0] == "request":
            targets, type_url, names, nonce_kind, nack, unsubscribe = op[1]
            for i in targets:
                pair = pairs[i]
                state = pair.shared.types.get(type_url)
                latest = state.nonce if state is not None else ""
                nonce = {"": "", "latest": latest, "old": "1"}[nonce_kind]
                pair.ask(type_url, names, nonce, nack, unsubscribe)
        elif op[0] == "answer":
            # Each targeted stream answers its latest response of every type.
            for i in op[1]:
                pair = pairs[i]
                for type_url, ts in list(pair.shared.types.items()):
                    if ts.pending:
                        pair.answer(type_url, nack=op[2] and type_url == E)
        else:
            # A new stream to the same snapshot, saying what the old one held.
            old = pairs[op[1]].shared
            pair = pairs[op[1]] = Pair(snapshot, clock, is_delta)
            for type_url, ts in old.types.items():
                held = (
                    {n: r.version for n, r in ts.acked.items()}
                    if is_delta
                    else {"": ts.acked_version}
                )
                pair.subscribe(type_url, sorted(ts.names), held)
        for pair in pairs:
            pair.respond()


def test_alike_streams_decide_once_and_a_stream_set_apart_decides_alone() -> None:
    """Many alike streams are answered with one decision (and one response object at one
    nonce); one that NACKed its endpoints, and one that holds another version of them,
    each get the answer that is theirs."""
    interner = ResourceInterner()
    first = mesh_snapshot(interner, {"a": 1, "b": 1}, ["a"], 1)
    streams = [StreamState(delta=False) for _ in range(10)]
    for s in streams:
        s.set_snapshot(first)
        s.on_request(sotw(C, node=True))
        s.on_request(sotw(E, ["a", "b"]))
        for out in s.responses():
            s.on_request(
                sotw(
                    out.type_url,
                    [] if out.type_url == C else ["a", "b"],
                    nonce=out.nonce,
                    version=out.version,
                )
            )
        assert s.responses() == []
    # The endpoints of "a" change; one stream NACKs them.
    second = mesh_snapshot(interner, {"a": 2, "b": 1}, ["a"], 2)
    for s in streams:
        s.set_snapshot(second)
    outs = [s.responses() for s in streams]
    assert all([(o.type_url, o.resources) for o in out] == [(E, 1)] for out in outs)
    assert len({id(out[0].payload) for out in outs}) == 1, "one response object at one nonce"
    nacker = streams[0]
    for s, o in zip(streams, outs, strict=True):
        for out in o:
            names = [] if out.type_url == C else ["a", "b"]
            error = "rejected" if s is nacker and out.type_url == E else None
            s.on_request(
                sotw(out.type_url, names, nonce=out.nonce, version=out.version, error=error)
            )
    # "behind" reconnects holding the first version of the endpoints.
    behind_again = StreamState(delta=False)
    behind_again.set_snapshot(second)
    behind_again.on_request(sotw(C, node=True, version=streams[2].types[C].acked_version))
    behind_again.on_request(sotw(E, ["a", "b"], version=first.view(E, frozenset("ab")).version))
    streams[1] = behind_again
    # A third generation changes the endpoints of "b": the alike streams get only what
    # changed since the version they acknowledged; the NACKer (which holds the first
    # version) and the reconnected stream (which asks for everything) get both.
    third = mesh_snapshot(interner, {"a": 2, "b": 3}, ["a"], 3)
    for s in streams:
        s.set_snapshot(third)
    answers = [[(o.type_url, o.resources) for o in s.responses()] for s in streams]
    assert answers[0] == [(E, 2)], "the NACKer holds a's first version"
    assert answers[1] == [(E, 2)], "the reconnected stream holds another version"
    assert answers[2:] == [[(E, 1)]] * 8, "only b's assignment changed for the others"
