"""Protocol corner cases a flaky network or a careful client produces, without sockets."""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2

from mesh import xds
from tests.ads.helpers import clusters_snapshot, delta, sotw
from xds_server.ads.snapshot import ResourceInterner
from xds_server.ads.stream import Outcome, StreamState, SyncStatus

C, E = xds.CLUSTER, xds.ENDPOINT


def parse_delta(payload: bytes) -> discovery_pb2.DeltaDiscoveryResponse:
    return discovery_pb2.DeltaDiscoveryResponse.FromString(payload)


def carried(payload: bytes) -> tuple[list[str], list[str]]:
    """(names sent, names removed) of a Delta response."""
    resp = parse_delta(payload)
    return sorted(r.name for r in resp.resources), sorted(resp.removed_resources)


def test_delta_nack_of_an_older_response_keeps_its_resources_unacked() -> None:
    """Two responses in flight; the client rejects the first and accepts the second. The
    first one's resources are not held by the client, whatever the later ACK says."""
    interner = ResourceInterner()
    s = StreamState(delta=True)
    s.set_snapshot(clusters_snapshot(interner, {"a": 1}))
    s.on_request(delta(C))
    [first] = s.responses()
    s.on_request(delta(C, nonce=first.nonce))
    good_a = s.types[C].acked["a"]

    s.set_snapshot(clusters_snapshot(interner, {"a": 9}, generation=2))  # "a" will be rejected
    [bad] = s.responses()
    s.set_snapshot(clusters_snapshot(interner, {"a": 9, "b": 1}, generation=3))
    [later] = s.responses()
    assert carried(later.payload) == (["b"], [])

    result = s.on_request(delta(C, nonce=bad.nonce, error="a is bad"))
    assert result.outcome is Outcome.NACK and result.error == "a is bad"
    assert s.on_request(delta(C, nonce=later.nonce)).outcome is Outcome.ACK

    t = s.types[C]
    assert t.acked["a"] is good_a  # the client still holds the old "a"
    assert t.acked["b"].version == s.snapshot.of_type(C)["b"].version  # type: ignore[union-attr]
    assert t.status() is SyncStatus.NACKED and t.last_error == "a is bad"
    assert s.responses() == []  # the rejected version is not sent again...
    s.set_snapshot(clusters_snapshot(interner, {"a": 3, "b": 1}, generation=4))
    [fixed] = s.responses()  # ...until the config moves past it
    assert carried(fixed.payload) == (["a"], [])
    s.on_request(delta(C, nonce=fixed.nonce))
    assert t.status() is SyncStatus.SYNCED and t.acked["a"].version == t.sent["a"].version


def test_delta_reconnect_removes_what_no_longer_exists() -> None:
    """A client reconnects (a control-plane restart, a failover) holding resources deleted
    meanwhile: they go out in removed_resources, and the ones it holds current are kept."""
    interner = ResourceInterner()
    before = clusters_snapshot(interner, {"a": 1, "gone": 1})
    held_c = {n: r.version for n, r in before.of_type(C).items()}
    held_e = {n: r.version for n, r in before.of_type(E).items()}
    s = StreamState(delta=True)
    s.set_snapshot(clusters_snapshot(interner, {"a": 1}))
    s.on_request(delta(C, initial=held_c))
    s.on_request(delta(E, ["a", "gone"], initial=held_e))
    out = {o.type_url: carried(o.payload) for o in s.responses()}
    assert out[E] == ([], ["gone"])
    # CDS first: the cluster goes only once its assignment's removal is acknowledged.
    assert C not in out
    s.on_request(delta(E, nonce=s.types[E].nonce))
    [cds] = s.responses()
    assert carried(cds.payload) == ([], ["gone"])
    s.on_request(delta(C, nonce=cds.nonce))
    assert set(s.types[C].acked) == {"a"} and set(s.types[E].acked) == {"a"}
    assert s.types[C].status() is SyncStatus.SYNCED


def test_delta_reconnect_with_an_unknown_version_is_sent_the_current_one() -> None:
    interner = ResourceInterner()
    s = StreamState(delta=True)
    s.set_snapshot(clusters_snapshot(interner, {"a": 1}))
    s.on_request(delta(C, initial={"a": "from-another-replica"}))
    [out] = s.responses()
    assert carried(out.payload) == (["a"], [])


def test_delta_subscription_to_a_missing_name_is_answered_as_removed() -> None:
    interner = ResourceInterner()
    s = StreamState(delta=True)
    s.set_snapshot(clusters_snapshot(interner, {"a": 1}))
    s.on_request(delta(E, ["a", "nope"]))
    [out] = s.responses()
    assert carried(out.payload) == (["a"], ["nope"])
    s.on_request(delta(E, nonce=out.nonce))
    assert s.responses() == []  # told once
    # When it appears, it is sent; when it goes again, it is removed.
    s.set_snapshot(clusters_snapshot(interner, {"a": 1, "nope": 1}, generation=2))
    [appeared] = s.responses()
    assert carried(appeared.payload) == (["nope"], [])
    s.on_request(delta(E, nonce=appeared.nonce))
    s.set_snapshot(clusters_snapshot(interner, {"a": 1}, generation=3))
    [gone] = s.responses()
    assert carried(gone.payload) == ([], ["nope"])
    # A new subscription to another missing name is answered too.
    s.on_request(delta(E, ["never"], nonce=gone.nonce))
    [again] = s.responses()
    assert carried(again.payload) == ([], ["never"])


def test_sotw_first_request_with_a_nonce_subscribes() -> None:
    """A client that kept the nonce of its previous stream across the reconnect."""
    s = StreamState(delta=False)
    s.set_snapshot(clusters_snapshot(ResourceInterner(), {"a": 1}))
    assert s.on_request(sotw(C, nonce="41", version="v0")).outcome is Outcome.SUBSCRIBE
    [out] = s.responses()
    assert out.type_url == C and s.types[C].wildcard
    s.on_request(sotw(E, ["a"], nonce="42"))
    [eds] = s.responses()
    assert eds.type_url == E


def test_delta_first_request_with_a_nonce_subscribes() -> None:
    s = StreamState(delta=True)
    s.set_snapshot(clusters_snapshot(ResourceInterner(), {"a": 1}))
    s.on_request(delta(E, ["a"]))
    assert [o.type_url for o in s.responses()] == [E]
    assert s.on_request(delta(C, nonce="old-stream-7")).outcome is Outcome.SUBSCRIBE
    cds, eds_again = s.responses()  # the new cluster, then its assignment again
    assert (cds.type_url, eds_again.type_url) == (C, E)
    assert carried(cds.payload) == (["a"], [])
