"""The proxyless resources, consumed by grpcio's own xDS client.

A minimal State-of-the-World ADS server (in this test, not the product's) serves what
``routing.generate`` builds for a proxyless proxy. A gRPC client in a subprocess (its xDS
bootstrap is process-wide) dials ``xds:///llama.default.svc.cluster.local:8000``. The
critical cluster's endpoint is pointed at one backend and the other classes' at another,
so the answer shows which route gRPC took.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from mesh import xds
from mesh.model import Priority
from tests.routing.factories import HOST, build, config, endpoint, proxy, service, world

_METHOD = "/inferlane.test.Echo/Call"
#: The class header values the client sends, one call each; "-" sends none.
_SENT = ("CRITICAL", "-", "critical", "standard", "nonsense")
_CLIENT = """
import sys, grpc
channel = grpc.insecure_channel(sys.argv[1])
call = channel.unary_unary(sys.argv[2])
for value in sys.argv[3:]:
    metadata = () if value == "-" else (("x-inference-priority", value),)
    print(call(b"", metadata=metadata, timeout=15).decode(), flush=True)
channel.close()
"""


class _Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Answers each subscription with the named resources; records NACKs."""

    def __init__(self, resources: dict[str, list[Any]]) -> None:
        self._resources = resources
        self.nacks: list[str] = []
        self._lock = threading.Lock()

    def StreamAggregatedResources(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        sent: dict[str, tuple[str, frozenset[str]]] = {}
        nonce = 0
        for request in requests:
            if request.error_detail.code:
                with self._lock:
                    self.nacks.append(request.error_detail.message)
                continue
            wanted = frozenset(request.resource_names)
            if sent.get(request.type_url) == (request.response_nonce, wanted):
                continue  # an ACK of what we sent
            nonce += 1
            packed = []
            for message in self._resources.get(request.type_url, []):
                if xds.resource_name(message) in wanted:
                    item = any_pb2.Any()
                    item.Pack(message, deterministic=True)
                    packed.append(item)
            sent[request.type_url] = (str(nonce), wanted)
            yield discovery_pb2.DiscoveryResponse(
                version_info="1", type_url=request.type_url, nonce=str(nonce), resources=packed
            )


def _echo_server(name: str) -> tuple[Any, int]:
    handler = grpc.method_handlers_generic_handler(
        "inferlane.test.Echo",
        {"Call": grpc.unary_unary_rpc_method_handler(lambda request, context: name.encode())},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _point_classes(resources: dict[str, list[Any]], critical: int, other: int) -> None:
    for assignment in resources[xds.ENDPOINT]:
        port = critical if f"|{Priority.CRITICAL.value}|" in assignment.cluster_name else other
        for locality in assignment.endpoints:
            for lb in locality.lb_endpoints:
                lb.endpoint.address.socket_address.port_value = port


@pytest.mark.parametrize(
    ("namespace", "expected"),
    [
        ("prod", ["critical", "other", "critical", "other", "other"]),
        ("dev", ["other", "other", "other", "other", "other"]),
    ],
    ids=["listed-caller", "clamped-caller"],
)
def test_grpc_client_accepts_and_routes_by_class(namespace: str, expected: list[str]) -> None:
    the_world = world(
        service(
            cfg=config(callers=["prod/*"]),
            endpoints=[endpoint("127.0.0.1", gpu=True, pod="g0")],
        )
    )
    resources = build(the_world, proxy(proxyless=True, namespace=namespace))
    servers: list[Any] = []
    try:
        critical_server, critical_port = _echo_server("critical")
        other_server, other_port = _echo_server("other")
        servers += [critical_server, other_server]
        _point_classes(resources, critical_port, other_port)
        ads = _Ads(resources)
        xds = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, xds)
        xds_port = xds.add_insecure_port("127.0.0.1:0")
        xds.start()
        servers.append(xds)
        bootstrap = {
            "xds_servers": [
                {
                    "server_uri": f"127.0.0.1:{xds_port}",
                    "channel_creds": [{"type": "insecure"}],
                    "server_features": ["xds_v3"],
                }
            ],
            "node": {"id": f"sidecar~127.0.0.1~client.{namespace}~{namespace}.svc.cluster.local"},
        }
        result = subprocess.run(
            [sys.executable, "-c", _CLIENT, f"xds:///{HOST}:8000", _METHOD, *_SENT],
            env={"GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(bootstrap), "PATH": ""},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert ads.nacks == []
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split() == expected
    finally:
        for server in servers:
            server.stop(grace=None)
