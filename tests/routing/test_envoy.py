"""The generated config, checked by a real Envoy: validate mode, then live traffic."""

from __future__ import annotations

import dataclasses
import http.client
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from envoy.config.core.v3 import health_check_pb2

from mesh.model import MtlsMode, Priority, SchedulingPolicy
from mesh.proxy import Proxy
from routing import names
from tests.routing.envoy_static import (
    ENVOY,
    running_envoy,
    static_bootstrap,
    validate,
    write_bootstrap,
)
from tests.routing.factories import build, config, endpoint, gateway, proxy, service, world

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not ENVOY.exists(), reason="no envoy binary in the venv"),
]


def _rich_world() -> Any:
    llama = config(
        callers=["prod/api", "spiffe://cluster.local/ns/ops/sa/admin"],
        max_concurrency=16,
        timeouts={Priority.CRITICAL: 30.0},
    )
    return world(
        service(
            cfg=dataclasses.replace(
                llama,
                scheduling=SchedulingPolicy.PRIORITY,
                class_concurrency=MappingProxyType({Priority.CRITICAL: 20}),
            ),
            ports=(8000, 8001),
            endpoints=[
                endpoint("10.0.0.1", gpu=True, pod="gpu-0"),
                endpoint("10.0.0.2", gpu=True, pod="gpu-1"),
                endpoint("10.0.0.3", pod="cpu-0"),
                endpoint("10.0.0.1", gpu=True, pod="gpu-0", service_port=8001, port=9001),
            ],
        ),
        service(
            "mistral",
            "prod",
            cfg=config(default=Priority.SHEDDABLE, mtls=MtlsMode.STRICT),
            endpoints=[endpoint("10.0.1.1", pod="m-0", namespace="prod")],
        ),
        service("empty", "default"),
    )


@pytest.mark.parametrize(
    "who",
    [proxy(pod="gpu-0", ip="10.0.0.1"), proxy(namespace="prod"), gateway(namespace="ingress")],
    ids=["sidecar-of-a-backend", "sidecar-of-a-client", "gateway"],
)
def test_generated_config_validates(who: Proxy, tmp_path: Path) -> None:
    sidecars = {("prod", "m-0"): proxy(pod="m-0", namespace="prod", ip="10.0.1.1")}
    resources = build(_rich_world(), who, sidecars)
    result = validate(write_bootstrap(static_bootstrap(resources), tmp_path / "envoy.json"))
    assert result.returncode == 0, result.stdout + result.stderr


class _Echo(BaseHTTPRequestHandler):
    """Answers with its server's name and the class header it received; a POST with the
    body it received."""

    def do_GET(self) -> None:
        body = json.dumps(
            {
                "backend": getattr(self.server, "backend_name", "?"),
                "priority": self.headers.get("x-inference-priority"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        received = self.rfile.read(int(self.headers.get("content-length", "0")))
        body = json.dumps({"body": received.decode(), "length": len(received)}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _EchoServer(ThreadingHTTPServer):
    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.backend_name = name


@pytest.fixture
def backends() -> Iterator[dict[str, int]]:
    """Two live HTTP backends on loopback: ``gpu`` and ``cpu``; name -> port."""
    servers: list[_EchoServer] = []
    try:
        for name in ("gpu", "cpu"):
            server = _EchoServer(name)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
        yield {server.backend_name: server.server_address[1] for server in servers}
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


_DOWN = {"127.0.0.2", "127.0.0.3"}


def _mark_down(assignment: Any) -> None:
    """Report the hosts on 127.0.0.2 and .3 as unhealthy, as a health check would."""
    for locality in assignment.endpoints:
        for lb in locality.lb_endpoints:
            if lb.endpoint.address.socket_address.address in _DOWN:
                lb.health_status = health_check_pb2.UNHEALTHY


def _get(port: int, authority: str, priority: str | None = None) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Host": authority}
        if priority is not None:
            headers["X-Inference-Priority"] = priority
        conn.request("GET", "/v1/models", headers=headers)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body)
        return dict(json.loads(body))
    finally:
        conn.close()


def test_live_traffic_priorities_classes_and_clamp(
    backends: dict[str, int], tmp_path: Path
) -> None:
    gpu, cpu = backends["gpu"], backends["cpu"]
    the_world = world(
        # One healthy GPU host of three: it must take every request.
        service(
            cfg=config(callers=["prod/api"]),
            endpoints=[
                endpoint("127.0.0.1", port=gpu, gpu=True, pod="g0"),
                endpoint("127.0.0.2", port=gpu, gpu=True, pod="g1"),
                endpoint("127.0.0.3", port=gpu, gpu=True, pod="g2"),
                endpoint("127.0.0.1", port=cpu, pod="c0"),
            ],
        ),
        # No healthy GPU host: the fallback takes over.
        service(
            "mistral",
            endpoints=[
                endpoint("127.0.0.2", port=gpu, gpu=True, pod="m0"),
                endpoint("127.0.0.3", port=gpu, gpu=True, pod="m1"),
                endpoint("127.0.0.1", port=cpu, pod="m2"),
            ],
        ),
    )
    caller = proxy(namespace="default", bind_address="127.0.0.1", outbound_port=0)
    resources = build(the_world, caller)
    bootstrap = static_bootstrap(
        resources,
        keep_listener=lambda listener: listener.name == names.OUTBOUND_LISTENER,
        edit_assignment=_mark_down,
    )
    path = write_bootstrap(bootstrap, tmp_path / "envoy.json")
    with running_envoy(path, tmp_path) as ports:
        port = ports[names.OUTBOUND_LISTENER]
        seen = {_get(port, "llama:8000")["backend"] for _ in range(30)}
        assert seen == {"gpu"}
        seen = {_get(port, "mistral.default")["backend"] for _ in range(10)}
        assert seen == {"cpu"}
        # The class header arrives canonical, and the clamp lowers an unlisted caller.
        assert _get(port, "mistral", "SHEDDABLE")["priority"] == "sheddable"
        assert _get(port, "mistral", "bogus")["priority"] == "standard"
        assert _get(port, "mistral", "Critical")["priority"] == "critical"
        assert _get(port, "llama", "Critical")["priority"] == "standard"


def _post(port: int, body: bytes, priority: str | None = None) -> str:
    """POST ``body`` into the inbound listener; the body the workload received."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Host": "llama", "content-type": "application/json"}
        if priority is not None:
            headers["x-inference-priority"] = priority
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200, answer
        assert answer["length"] == len(answer["body"].encode())  # content-length kept right
        return str(answer["body"])
    finally:
        conn.close()


def test_live_inbound_writes_the_class_into_the_body_for_the_scheduler(
    backends: dict[str, int], tmp_path: Path
) -> None:
    passes = dataclasses.replace(config(), scheduling=SchedulingPolicy.PRIORITY)
    the_world = world(
        service(cfg=passes, endpoints=[endpoint("127.0.0.1", port=backends["gpu"], pod="g0")])
    )
    me = proxy(pod="g0", ip="127.0.0.1", bind_address="127.0.0.1", inbound_port=0)
    bootstrap = static_bootstrap(
        build(the_world, me),
        keep_listener=lambda listener: listener.name == names.INBOUND_LISTENER,
    )
    with running_envoy(write_bootstrap(bootstrap, tmp_path / "envoy.json"), tmp_path) as ports:
        port = ports[names.INBOUND_LISTENER]
        request = {"model": "llama", "prompt": "hello"}
        for priority, expected in (("critical", 0), ("standard", 1), ("sheddable", 2)):
            got = json.loads(_post(port, json.dumps(request).encode(), priority))
            assert got == {**request, "priority": expected}
        # No class header: the default class (standard).
        assert json.loads(_post(port, b'{"prompt": "x"}'))["priority"] == 1
        # A client's own priority is overridden: the last key wins in vLLM's parser.
        sneaky = json.loads(_post(port, b'{"priority": -100, "prompt": "x"}', "sheddable"))
        assert sneaky["priority"] == 2
        assert json.loads(_post(port, b" { } ", "critical")) == {"priority": 0}
        # Not a JSON object: untouched.
        assert _post(port, b"[1, 2]", "critical") == "[1, 2]"
        # A long prompt (over Envoy's default 1 MiB buffer) is rewritten, not refused.
        long = {"prompt": "word " * 400_000}
        assert json.loads(_post(port, json.dumps(long).encode(), "sheddable"))["priority"] == 2
