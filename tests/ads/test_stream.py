"""The protocol state machine, without sockets: every rule in stream.py's docstring."""

from __future__ import annotations

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mesh import xds
from tests.ads.helpers import clusters_snapshot, delta, sotw
from xds_server.ads.snapshot import ResourceInterner
from xds_server.ads.stream import (
    Outcome,
    ProtocolError,
    StreamLimits,
    StreamState,
    SyncStatus,
)

C, E = xds.CLUSTER, xds.ENDPOINT


def parse(payload: bytes) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse.FromString(payload)


def parse_delta(payload: bytes) -> discovery_pb2.DeltaDiscoveryResponse:
    return discovery_pb2.DeltaDiscoveryResponse.FromString(payload)


@pytest.fixture
def interner() -> ResourceInterner:
    return ResourceInterner()


def sotw_stream(interner: ResourceInterner, clusters: dict[str, int]) -> StreamState:
    s = StreamState(delta=False)
    s.set_snapshot(clusters_snapshot(interner, clusters))
    return s


def names_of(resp: discovery_pb2.DiscoveryResponse) -> list[str]:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2

    out = []
    for a in resp.resources:
        if a.type_url == C:
            out.append(cluster_pb2.Cluster.FromString(a.value).name)
        else:
            out.append(endpoint_pb2.ClusterLoadAssignment.FromString(a.value).cluster_name)
    return out


# -- State of the World ------------------------------------------------------------


def test_sotw_wildcard_then_by_name(interner: ResourceInterner) -> None:
    s = sotw_stream(interner, {"a": 1, "b": 1})
    assert s.on_request(sotw(C)).outcome is Outcome.SUBSCRIBE
    [out] = s.responses()
    resp = parse(out.payload)
    assert names_of(resp) == ["a", "b"] and resp.nonce == out.nonce and resp.type_url == C
    s.on_request(sotw(C, nonce=out.nonce, version=out.version))
    # EDS by name: only what is asked for.
    s.on_request(sotw(E, ["b"]))
    [eds] = s.responses()
    assert names_of(parse(eds.payload)) == ["b"]
    assert int(eds.nonce) > int(out.nonce)


def test_sotw_ack_sends_nothing_and_stale_nonce_is_dropped(interner: ResourceInterner) -> None:
    s = sotw_stream(interner, {"a": 1})
    s.on_request(sotw(E, ["a"]))
    [first] = s.responses()
    assert s.on_request(sotw(E, ["a"], nonce=first.nonce)).outcome is Outcome.ACK
    assert s.responses() == []
    s.set_snapshot(clusters_snapshot(interner, {"a": 2, "b": 1}, generation=2))
    assert len(s.responses()) == 1
    # An overlapping request with the superseded nonce: dropped, names unchanged.
    result = s.on_request(sotw(E, ["a", "b"], nonce=first.nonce))
    assert result.outcome is Outcome.STALE
    assert s.types[E].names == {"a"}
    assert s.responses() == []


def test_sotw_rerequest_with_acked_nonce_is_answered(interner: ResourceInterner) -> None:
    """Envoy re-warming an updated cluster asks again with the same nonce and names."""
    s = sotw_stream(interner, {"a": 1})
    s.on_request(sotw(E, ["a"]))
    [first] = s.responses()
    s.on_request(sotw(E, ["a"], nonce=first.nonce))
    assert s.on_request(sotw(E, ["a"], nonce=first.nonce)).outcome is Outcome.REREQUEST
    [again] = s.responses()
    assert again.version == first.version and again.nonce != first.nonce


def test_sotw_nack_rolls_back_and_does_not_resend(interner: ResourceInterner) -> None:
    s = sotw_stream(interner, {"a": 1})
    s.on_request(sotw(C))
    [good] = s.responses()
    s.on_request(sotw(C, nonce=good.nonce))
    s.set_snapshot(clusters_snapshot(interner, {"a": 99}, generation=2))
    [bad] = s.responses()
    result = s.on_request(sotw(C, nonce=bad.nonce, version=good.version, error="bad cluster"))
    assert result.outcome is Outcome.NACK and result.error == "bad cluster"
    t = s.types[C]
    assert t.status() is SyncStatus.NACKED and t.sent_version == good.version
    assert s.responses() == []  # no resend loop
    s.set_snapshot(clusters_snapshot(interner, {"a": 3}, generation=3))
    [fixed] = s.responses()
    s.on_request(sotw(C, nonce=fixed.nonce))
    assert t.status() is SyncStatus.SYNCED and t.acked_version == fixed.version
    assert t.last_error == "bad cluster"  # kept for /debug/syncz history


def test_sotw_nack_then_revert_to_the_accepted_config_is_synced(
    interner: ResourceInterner,
) -> None:
    s = sotw_stream(interner, {"a": 1})
    s.on_request(sotw(C))
    [good] = s.responses()
    s.on_request(sotw(C, nonce=good.nonce))
    s.set_snapshot(clusters_snapshot(interner, {"a": 99}, generation=2))
    [bad] = s.responses()
    s.on_request(sotw(C, nonce=bad.nonce, error="no"))
    s.set_snapshot(clusters_snapshot(interner, {"a": 1}, generation=3))
    assert s.responses() == []
    assert s.types[C].status() is SyncStatus.SYNCED


def test_sotw_reconnect_with_current_version_gets_nothing(interner: ResourceInterner) -> None:
    s = sotw_stream(interner, {"a": 1})
    s.on_request(sotw(C))
    [out] = s.responses()
    restarted = sotw_stream(ResourceInterner(), {"a": 1})
    restarted.on_request(sotw(C, version=out.version))
    assert restarted.responses() == []
    assert restarted.types[C].status() is SyncStatus.SYNCED
    # ...but a proxy holding an older version is brought up to date.
    other = sotw_stream(ResourceInterner(), {"a": 2})
    other.on_request(sotw(C, version=out.version))
    assert len(other.responses()) == 1


def test_sotw_cluster_change_is_followed_by_its_endpoints(interner: ResourceInterner) -> None:
    s = sotw_stream(interner, {"a": 1})
    s.on_request(sotw(C))
    [c1] = s.responses()
    s.on_request(sotw(C, nonce=c1.nonce))
    s.on_request(sotw(E, ["a"]))
    [e1] = s.responses()
    s.on_request(sotw(E, ["a"], nonce=e1.nonce))
    s.set_snapshot(clusters_snapshot(interner, {"a": 5}, generation=2))
    sent = [o.type_url for o in s.responses()]
    assert sent == [C, E]


def test_removed_cluster_is_kept_until_later_types_converge(interner: ResourceInterner) -> None:
    s = sotw_stream(interner, {"a": 1, "b": 1})
    s.on_request(sotw(C))
    [c1] = s.responses()
    s.on_request(sotw(C, nonce=c1.nonce))
    s.on_request(sotw(E, ["a", "b"]))
    [e1] = s.responses()
    s.on_request(sotw(E, ["a", "b"], nonce=e1.nonce))
    s.set_snapshot(clusters_snapshot(interner, {"a": 1}, generation=2))
    # The EDS state still holds "b" unacknowledged-away, so CDS keeps cluster "b".
    out = s.responses()
    assert [o.type_url for o in out] == [E]
    # Endpoints keep what a response leaves out: "a" did not change, and "b" goes with
    # its cluster, so the new version carries nothing.
    assert names_of(parse(out[0].payload)) == []
    assert parse(out[0].payload).version_info == out[0].version
    s.on_request(sotw(E, ["a", "b"], nonce=out[0].nonce))
    [c2] = s.responses()
    assert c2.type_url == C and names_of(parse(c2.payload)) == ["a"]


def test_sotw_endpoints_carry_only_what_changed_since_the_client_answered(
    interner: ResourceInterner,
) -> None:
    """The client keeps the assignments a response leaves out (the xDS protocol: every type
    but listeners and clusters), so once it has answered, a change carries only itself."""
    ab = frozenset({"a", "b"})
    s = sotw_stream(interner, {"a": 1, "b": 1})
    s.on_request(sotw(E, ["a", "b"]))
    [first] = s.responses()
    assert names_of(parse(first.payload)) == ["a", "b"]
    s.on_request(sotw(E, ["a", "b"], nonce=first.nonce, version=first.version))

    s.set_snapshot(clusters_snapshot(interner, {"a": 2, "b": 1}, generation=2))
    [change] = s.responses()
    assert names_of(parse(change.payload)) == ["a"] and change.resources == 1
    # At the version of everything the client then holds.
    assert s.snapshot is not None
    assert parse(change.payload).version_info == change.version == s.snapshot.view(E, ab).version

    s.on_request(sotw(E, ["a", "b"], nonce=change.nonce, version=change.version))

    # Unanswered, what the client holds is not known: the next response carries everything.
    s.set_snapshot(clusters_snapshot(interner, {"a": 3, "b": 1}, generation=3))
    [unanswered] = s.responses()
    assert names_of(parse(unanswered.payload)) == ["a"]
    s.set_snapshot(clusters_snapshot(interner, {"a": 3, "b": 2}, generation=4))
    [everything] = s.responses()
    assert names_of(parse(everything.payload)) == ["a", "b"]
    # Rejected, it holds what it acknowledged: the next change counts from there.
    s.on_request(sotw(E, ["a", "b"], nonce=everything.nonce, version=change.version, error="no"))
    s.set_snapshot(clusters_snapshot(interner, {"a": 2, "b": 4}, generation=5))
    [after_nack] = s.responses()
    assert names_of(parse(after_nack.payload)) == ["b"]
    s.on_request(sotw(E, ["a", "b"], nonce=after_nack.nonce, version=after_nack.version))

    # A name newly asked for in an answer is sent, the others are not.
    s.set_snapshot(clusters_snapshot(interner, {"a": 5, "b": 4, "c": 1}, generation=6))
    [pending] = s.responses()
    assert names_of(parse(pending.payload)) == ["a"]
    s.on_request(sotw(E, ["a", "b", "c"], nonce=pending.nonce, version=pending.version))
    [grown] = s.responses()
    assert names_of(parse(grown.payload)) == ["c"]
    # A request repeating an answered nonce asks for everything (Envoy re-warming a cluster).
    s.on_request(sotw(E, ["a", "b", "c"], nonce=grown.nonce, version=grown.version))
    s.on_request(sotw(E, ["a", "b", "c"], nonce=grown.nonce, version=grown.version))
    [again] = s.responses()
    assert names_of(parse(again.payload)) == ["a", "b", "c"]


def test_sotw_clusters_always_carry_every_cluster(interner: ResourceInterner) -> None:
    s = sotw_stream(interner, {"a": 1, "b": 1})
    s.on_request(sotw(C))
    [first] = s.responses()
    s.on_request(sotw(C, nonce=first.nonce, version=first.version))
    s.set_snapshot(clusters_snapshot(interner, {"a": 2, "b": 1}, generation=2))
    [change] = s.responses()
    assert names_of(parse(change.payload)) == ["a", "b"]


# -- Delta --------------------------------------------------------------------------


def delta_stream(interner: ResourceInterner, clusters: dict[str, int]) -> StreamState:
    s = StreamState(delta=True)
    s.set_snapshot(clusters_snapshot(interner, clusters))
    return s


def test_delta_sends_changes_and_removals_only(interner: ResourceInterner) -> None:
    s = delta_stream(interner, {"a": 1, "b": 1})
    s.on_request(delta(C))
    [first] = s.responses()
    assert sorted(r.name for r in parse_delta(first.payload).resources) == ["a", "b"]
    s.on_request(delta(C, nonce=first.nonce))
    s.set_snapshot(clusters_snapshot(interner, {"a": 2, "c": 1}, generation=2))
    [second] = s.responses()
    resp = parse_delta(second.payload)
    assert sorted(r.name for r in resp.resources) == ["a", "c"]
    assert list(resp.removed_resources) == ["b"]


def test_delta_nack_rolls_back_and_rejected_version_is_not_resent(
    interner: ResourceInterner,
) -> None:
    s = delta_stream(interner, {"a": 1})
    s.on_request(delta(C))
    [first] = s.responses()
    s.on_request(delta(C, nonce=first.nonce))
    s.set_snapshot(clusters_snapshot(interner, {"a": 9, "b": 1}, generation=2))
    [bad] = s.responses()
    assert s.on_request(delta(C, nonce=bad.nonce, error="no")).outcome is Outcome.NACK
    assert s.types[C].sent["a"].version == s.types[C].acked["a"].version
    assert s.responses() == []
    # Another change elsewhere is ACKed; the rejected "a" is still not resent.
    s.set_snapshot(clusters_snapshot(interner, {"a": 9, "b": 1, "c": 1}, generation=3))
    out = s.responses()
    assert out == [] or all(r.name != "a" for r in parse_delta(out[0].payload).resources)


def test_delta_initial_versions_and_unsubscribe(interner: ResourceInterner) -> None:
    snap = clusters_snapshot(interner, {"a": 1, "b": 1})
    s = StreamState(delta=True)
    s.set_snapshot(snap)
    held = {"a": snap.of_type(C)["a"].version, "b": "stale"}
    s.on_request(delta(C, ["*"], initial=held))
    [out] = s.responses()
    assert [r.name for r in parse_delta(out.payload).resources] == ["b"]
    # By-name type: unsubscribing forgets without a removal notice.
    s.on_request(delta(E, ["a", "b"]))
    [eds] = s.responses()
    s.on_request(delta(E, unsubscribe=["b"], nonce=eds.nonce))
    assert s.types[E].names == {"a"} and "b" not in s.types[E].sent


def test_delta_cluster_update_resends_its_assignment(interner: ResourceInterner) -> None:
    s = delta_stream(interner, {"a": 1})
    s.on_request(delta(C))
    [c1] = s.responses()
    s.on_request(delta(C, nonce=c1.nonce))
    s.on_request(delta(E, ["a"]))
    [e1] = s.responses()
    s.on_request(delta(E, nonce=e1.nonce))
    s.set_snapshot(clusters_snapshot(interner, {"a": 2}, generation=2))
    out = s.responses()
    assert [o.type_url for o in out] == [C, E]
    assert [r.name for r in parse_delta(out[1].payload).resources] == ["a"]


def test_delta_subscription_change_is_kept_even_with_a_stale_nonce(
    interner: ResourceInterner,
) -> None:
    s = delta_stream(interner, {"a": 1, "b": 1})
    s.on_request(delta(E, ["a"]))
    s.responses()
    assert s.on_request(delta(E, ["b"], nonce="old")).outcome is Outcome.STALE
    assert s.types[E].names == {"a", "b"}


# -- bad requests -------------------------------------------------------------------


@pytest.mark.parametrize("is_delta", [False, True])
def test_bad_requests_raise_protocol_errors(is_delta: bool) -> None:
    s = StreamState(delta=is_delta)
    make = delta if is_delta else sotw
    with pytest.raises(ProtocolError, match="unknown type URL"):
        s.on_request(make("type.googleapis.com/not.A.Type"))
    limits = StreamLimits()
    with pytest.raises(ProtocolError, match="over 10000"):
        s.on_request(make(C, [str(i) for i in range(limits.max_names + 1)]))
    with pytest.raises(ProtocolError, match="characters"):
        s.on_request(make(C, ["x" * (limits.max_name_length + 1)]))


# -- properties ---------------------------------------------------------------------

TYPES = [xds.CLUSTER, xds.ENDPOINT, xds.LISTENER, xds.ROUTE, "type.googleapis.com/bogus"]
NAMES = st.sampled_from(["a", "b", "c", "*"])


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, object]]:
    ops: list[tuple[str, object]] = []
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["request", "request", "request", "snapshot"]))
        if kind == "snapshot":
            clusters = st.dictionaries(st.sampled_from("abc"), st.integers(1, 3))
            ops.append(("snapshot", draw(clusters)))
        else:
            ops.append(
                (
                    "request",
                    (
                        draw(st.sampled_from(TYPES)),
                        draw(st.lists(NAMES, max_size=3)),
                        draw(st.sampled_from(["", "latest", "old", "garbage"])),
                        draw(st.booleans()),
                    ),
                )
            )
    return ops


#: Endpoints NACKed, then subscribed by name, then by no name again: the answer to the
#: last subscription is the version rejected under the first, and it must be sent (a
#: proxy that changes what it asks for is always answered).
_RESUBSCRIBED_TO_A_REJECTED_VIEW = [
    ("request", (xds.ENDPOINT, [], "", False)),
    ("request", (xds.ENDPOINT, ["a"], "latest", True)),
    ("request", (xds.ENDPOINT, [], "latest", False)),
]


#: A cluster re-subscribed after its endpoints' version was NACKed: the cluster goes out
#: again, and its (rejected) endpoints must not follow it.
_REJECTED_EDS_AFTER_CLUSTER = [
    ("request", (xds.CLUSTER, ["a"], "", False)),
    ("request", (xds.ENDPOINT, ["a"], "", False)),
    ("request", (xds.CLUSTER, [], "", False)),
    ("request", (xds.ENDPOINT, ["a"], "latest", True)),
    ("request", (xds.CLUSTER, ["a"], "", False)),
]


@settings(max_examples=150, deadline=None)
@given(operations(), st.booleans())
@example(ops=_REJECTED_EDS_AFTER_CLUSTER, is_delta=False)
@example(ops=_RESUBSCRIBED_TO_A_REJECTED_VIEW, is_delta=False)
def test_any_request_sequence_keeps_the_invariants(
    ops: list[tuple[str, object]], is_delta: bool
) -> None:
    """Never an exception but ProtocolError; nonces rise; every payload parses as the type
    it claims; what the proxy rejected is not sent again until the config changes."""
    interner = ResourceInterner()
    s = StreamState(delta=is_delta)
    s.set_snapshot(clusters_snapshot(interner, {"a": 1}))
    last_nonce = 0
    #: What each response carried, by nonce: a Delta NACK rejects what the response it
    #: names carried, whether or not it is the latest.
    carried_by: dict[str, set[tuple[str, str]]] = {}
    rejected: dict[str, set[tuple[str, str]]] = {}
    #: SotW: the names each type's last request asked for (every request names them all).
    subscribed: dict[str, frozenset[str]] = {}
    generation = 1
    for kind, arg in ops:
        if kind == "snapshot":
            generation += 1
            assert isinstance(arg, dict)
            s.set_snapshot(clusters_snapshot(interner, arg, generation))
            rejected.clear()
        else:
            assert isinstance(arg, tuple)
            type_url, names, nonce_kind, nack = arg
            current = s.types[type_url].nonce if type_url in s.types else ""
            nonce = {"": "", "latest": current, "old": "1", "garbage": "zz"}[nonce_kind]
            error = "x" if nack and nonce else None
            make = delta if is_delta else sotw
            try:
                result = s.on_request(make(type_url, names, nonce=nonce, error=error))
            except ProtocolError:
                assert type_url not in xds.PUSH_ORDER
                continue
            # A subscription change may legitimately ask for it again: under SotW any
            # change of the names (to none included), under Delta any name subscribed.
            changed = bool(names) if is_delta else subscribed.get(type_url) != frozenset(names)
            subscribed[type_url] = frozenset(names)
            if changed:
                rejected.pop(type_url, None)
            if result.outcome is Outcome.NACK:
                rejected[type_url] = set(carried_by.get(nonce, set()))
        for out in s.responses():
            assert int(out.nonce) > last_nonce
            last_nonce = int(out.nonce)
            if is_delta:
                d = parse_delta(out.payload)
                assert d.type_url == out.type_url and d.nonce == out.nonce
                carried = {(r.name, r.version) for r in d.resources}
            else:
                r = parse(out.payload)
                assert r.type_url == out.type_url and r.version_info == out.version
                carried = {("", out.version)}
            assert not carried & rejected.get(out.type_url, set()), "re-sent a rejected version"
            carried_by[out.nonce] = carried


def test_delta_reconnect_adopts_versions_once_a_snapshot_exists(
    interner: ResourceInterner,
) -> None:
    """A restarted control plane may hear from a proxy before its first world is loaded."""
    snap = clusters_snapshot(interner, {"a": 1, "b": 1})
    held = {n: r.version for n, r in snap.of_type(C).items()}
    s = StreamState(delta=True)
    s.on_request(delta(C, initial=held))
    assert s.responses() == []  # no snapshot yet: nothing is sent, nothing is forgotten
    s.set_snapshot(snap)
    assert s.responses() == []  # the proxy holds exactly this
    t = s.types[C]
    assert t.status() is SyncStatus.SYNCED and t.acked_version == t.sent_version != ""


def test_plain_ack_does_not_reevaluate_but_a_held_removal_does(
    interner: ResourceInterner,
) -> None:
    s = sotw_stream(interner, {"a": 1, "b": 1})
    s.on_request(sotw(C))
    [c1] = s.responses()
    s.on_request(sotw(C, nonce=c1.nonce))
    assert not s._dirty  # an ACK with nothing held back makes nothing due
    s.on_request(sotw(E, ["a", "b"]))
    [e1] = s.responses()
    s.on_request(sotw(E, ["a", "b"], nonce=e1.nonce))
    s.set_snapshot(clusters_snapshot(interner, {"a": 1}, generation=2))
    [e2] = s.responses()  # CDS keeps "b" until EDS is acknowledged: held
    s.on_request(sotw(E, ["a", "b"], nonce=e2.nonce))
    assert s._dirty
    [c2] = s.responses()
    assert c2.type_url == C
