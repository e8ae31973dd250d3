"""Hand-encoded responses parse exactly as protobuf's own messages."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import given
from hypothesis import strategies as st

from mesh import xds
from xds_server.ads import wire
from xds_server.ads.snapshot import ResourceInterner

names = st.text(min_size=1, max_size=40)


@given(st.lists(names, unique=True, max_size=8), st.text(max_size=20), st.text(max_size=10))
def test_sotw_response_round_trips(cluster_names: list[str], version: str, nonce: str) -> None:
    interner = ResourceInterner()
    resources = [interner.make(cluster_pb2.Cluster(name=n)) for n in cluster_names]
    payload = wire.discovery_response(
        version, xds.CLUSTER, nonce, (r.sotw_field for r in resources)
    )
    parsed = discovery_pb2.DiscoveryResponse.FromString(payload)
    assert parsed.version_info == version
    assert parsed.type_url == xds.CLUSTER
    assert parsed.nonce == nonce
    assert [a.type_url for a in parsed.resources] == [xds.CLUSTER] * len(cluster_names)
    decoded = [cluster_pb2.Cluster.FromString(a.value).name for a in parsed.resources]
    assert decoded == cluster_names


@given(st.lists(names, unique=True, max_size=8), st.lists(names, max_size=5), st.text(max_size=10))
def test_delta_response_round_trips(
    cluster_names: list[str], removed: list[str], nonce: str
) -> None:
    interner = ResourceInterner()
    resources = [interner.make(cluster_pb2.Cluster(name=n)) for n in cluster_names]
    payload = wire.delta_discovery_response(
        "sys", xds.CLUSTER, nonce, (r.delta_field for r in resources), removed
    )
    parsed = discovery_pb2.DeltaDiscoveryResponse.FromString(payload)
    assert parsed.system_version_info == "sys"
    assert parsed.nonce == nonce
    assert list(parsed.removed_resources) == removed
    assert [(r.name, r.version) for r in parsed.resources] == [
        (x.name, x.version) for x in resources
    ]
    for got, res in zip(parsed.resources, resources, strict=True):
        assert got.resource.type_url == xds.CLUSTER
        assert got.resource.value == res.body


def test_identical_resources_are_interned_and_versioned_by_content() -> None:
    interner = ResourceInterner()
    one = interner.make(cluster_pb2.Cluster(name="a", alt_stat_name="x"))
    two = interner.make(cluster_pb2.Cluster(name="a", alt_stat_name="x"))
    other = interner.make(cluster_pb2.Cluster(name="a", alt_stat_name="y"))
    assert one is two
    assert one.version != other.version
    # A fresh interner (a restarted control plane) gives the same version.
    assert ResourceInterner().make(cluster_pb2.Cluster(name="a", alt_stat_name="x")).version == (
        one.version
    )


def test_varint_matches_protobuf() -> None:
    from google.protobuf import wrappers_pb2

    for value in (0, 1, 127, 128, 300, 2**21, 2**35 + 7):
        # UInt64Value is field 1, varint: its encoding is the tag byte 0x08 and the varint.
        encoded = wrappers_pb2.UInt64Value(value=value).SerializeToString()
        assert b"\x08" + wire.varint(value) == encoded or value == 0


def test_debug_decoding_never_shows_a_private_key() -> None:
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    from xds_server.ads.snapshot import REDACTED, decode

    secret = secret_pb2.Secret(name="default")
    secret.tls_certificate.certificate_chain.inline_bytes = b"CERT"
    secret.tls_certificate.private_key.inline_bytes = b"-----BEGIN PRIVATE KEY-----"
    data = decode(ResourceInterner().make(secret))
    assert data["tls_certificate"]["private_key"] == REDACTED
    assert "PRIVATE" not in str(data) and data["tls_certificate"]["certificate_chain"]
