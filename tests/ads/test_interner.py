"""The interner serializes a message or a tuple of messages handed in again only once, and
forgets them when two generations pass without them."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from mesh import xds
from xds_server.ads.snapshot import ResourceInterner, SnapshotError, build_snapshot


class CountingInterner(ResourceInterner):
    def __init__(self) -> None:
        super().__init__()
        self.serialized = 0

    def make(self, message: Any) -> Any:
        self.serialized += 1
        return super().make(message)


def _clusters(*names: str) -> tuple[Any, ...]:
    return tuple(cluster_pb2.Cluster(name=n) for n in names)


def test_a_tuple_handed_in_again_shares_its_resources_without_serializing() -> None:
    interner = CountingInterner()
    clusters = _clusters("a", "b")
    assignments = (endpoint_pb2.ClusterLoadAssignment(cluster_name="a"),)
    first = build_snapshot(interner, {xds.CLUSTER: clusters, xds.ENDPOINT: assignments}, 1)
    assert interner.serialized == 3
    second = build_snapshot(interner, {xds.CLUSTER: clusters, xds.ENDPOINT: ()}, 2)
    assert interner.serialized == 3
    # The same bucket object: every snapshot built from the tuple shares it.
    assert second.of_type(xds.CLUSTER) is first.of_type(xds.CLUSTER)
    # A new tuple of known messages: a new bucket, the same resources, nothing serialized.
    third = build_snapshot(interner, {xds.CLUSTER: (clusters[1],)}, 3)
    assert interner.serialized == 3
    assert third.of_type(xds.CLUSTER)["b"] is first.of_type(xds.CLUSTER)["b"]


def test_lists_are_serialized_every_time() -> None:
    """A generator that builds fresh lists builds fresh messages: nothing to remember."""
    interner = CountingInterner()
    clusters = list(_clusters("a"))
    build_snapshot(interner, {xds.CLUSTER: clusters}, 1)
    build_snapshot(interner, {xds.CLUSTER: clusters}, 1)
    assert interner.serialized == 2


def test_what_two_generations_did_not_use_is_forgotten() -> None:
    interner = CountingInterner()
    kept, dropped = _clusters("kept"), _clusters("dropped")
    build_snapshot(interner, {xds.CLUSTER: kept}, 1)
    build_snapshot(interner, {xds.CLUSTER: dropped}, 1)
    build_snapshot(interner, {xds.CLUSTER: kept}, 2)
    build_snapshot(interner, {xds.CLUSTER: kept}, 3)
    assert interner.serialized == 2
    build_snapshot(interner, {xds.CLUSTER: dropped}, 4)
    assert interner.serialized == 3
    assert all(id(m) not in interner._messages_before for m in dropped)


def test_a_name_twice_is_refused_within_and_across_groups() -> None:
    interner = ResourceInterner()
    with pytest.raises(SnapshotError, match="two CDS"):
        build_snapshot(interner, {xds.CLUSTER: _clusters("a", "a")}, 1)
    with pytest.raises(SnapshotError, match="two CDS"):
        build_snapshot(interner, [*_clusters("a"), *_clusters("a")], 1)
    with pytest.raises(SnapshotError, match="two CDS"):
        build_snapshot(interner, {xds.CLUSTER: _clusters("a"), xds.ENDPOINT: _clusters("a")}, 1)
