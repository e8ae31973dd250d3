"""Requests and snapshots for protocol tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from mesh import xds
from xds_server.ads.snapshot import ResourceInterner, Snapshot, build_snapshot

NODE_ID = "sidecar~10.0.0.1~client-0.default~default.svc.cluster.local"


def sotw(
    type_url: str,
    names: Iterable[str] = (),
    *,
    nonce: str = "",
    version: str = "",
    error: str | None = None,
    node: bool = False,
) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(
        type_url=type_url, resource_names=list(names), response_nonce=nonce, version_info=version
    )
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
    if node:
        req.node.id = NODE_ID
    return req


def delta(
    type_url: str,
    subscribe: Iterable[str] = (),
    unsubscribe: Iterable[str] = (),
    *,
    nonce: str = "",
    error: str | None = None,
    initial: Mapping[str, str] | None = None,
    node: bool = False,
) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe),
        response_nonce=nonce,
        initial_resource_versions=dict(initial or {}),
    )
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
    if node:
        req.node.id = NODE_ID
    return req


def clusters_snapshot(
    interner: ResourceInterner, clusters: Mapping[str, int], generation: int = 1
) -> Snapshot:
    """EDS clusters named by the mapping, each with an assignment; the number is the
    content of both (a connect timeout, an overprovisioning factor)."""
    ads = config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )
    messages: list[object] = []
    for name, seconds in clusters.items():
        c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
        c.eds_cluster_config.eds_config.CopyFrom(ads)
        c.connect_timeout.seconds = seconds
        messages.append(c)
        cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
        cla.policy.overprovisioning_factor.value = seconds
        messages.append(cla)
    return build_snapshot(interner, {xds.CLUSTER: messages}, generation)
