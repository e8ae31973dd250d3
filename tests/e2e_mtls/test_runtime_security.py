"""Mesh security at run time, without Envoy: parsing, the secret store and its renewal, the
generator's secrets, and token reviews against a fake API server. (The authorizer:
test_identity_binding.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st
from kubernetes.aio.client import ApiClient, AuthenticationV1Api, Configuration

from mesh import xds
from mesh.model import Workload, World
from mtls.ca import CaLoadError, CertificateAuthority
from mtls.identity import Identity
from mtls.secrets import SecretStore
from mtls.store import load_ca, parse_secret_ref
from mtls.tokens import KubernetesTokenReviewer, TokenIdentity, bearer_token
from routing.generator import MeshGenerator
from tests.mtls.fake_kube import FakeSecretsServer, core_api, serve
from tests.routing.factories import endpoint, proxy, service
from xds_server.auth.settings import SecuritySettings, parse_networks
from xds_server.auth.transport import parse_grpc_peer

TD = "cluster.local"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


# --------------------------------------------------------------------------- parsing


@given(st.text(max_size=80))
def test_parsers_never_raise(text: str) -> None:
    assert isinstance(parse_networks(text), tuple | str)
    peer = parse_grpc_peer(text)
    assert peer is None or isinstance(peer, tuple)
    assert bearer_token([("authorization", text)]) in (None, *text.split())
    assert isinstance(parse_secret_ref(text, "ns"), tuple | str)


@given(st.lists(st.ip_addresses(), min_size=1, max_size=4), st.integers(0, 32))
def test_networks_round_trip(addresses: list[Any], prefix: int) -> None:
    networks = [
        ipaddress.ip_network(f"{a}/{min(prefix, a.max_prefixlen)}", strict=False) for a in addresses
    ]
    assert parse_networks(", ".join(str(n) for n in networks)) == tuple(networks)


def test_networks_name_the_bad_entry() -> None:
    assert parse_networks("10.0.0.0/8,, ::1") == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    error = parse_networks("10.0.0.0/8,nope")
    assert isinstance(error, str) and "'nope'" in error


@given(st.ip_addresses(), st.integers(0, 65535))
def test_grpc_peers_round_trip(address: Any, port: int) -> None:
    text = f"ipv4:{address}:{port}" if address.version == 4 else f"ipv6:[{address}]:{port}"
    expected = address.ipv4_mapped if address.version == 6 and address.ipv4_mapped else address
    assert parse_grpc_peer(text) == (str(expected), port)


def test_grpc_peer_forms() -> None:
    assert parse_grpc_peer("ipv6:%5B::1%5D:80") == ("::1", 80)
    assert parse_grpc_peer("ipv6:[::ffff:127.0.0.2]:80") == ("127.0.0.2", 80)
    assert parse_grpc_peer("unix:/tmp/socket") is None
    assert parse_grpc_peer("ipv4:1.2.3.4:99999") is None


def test_bearer_tokens() -> None:
    assert bearer_token([("Authorization", "Bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", b"bearer xyz")]) == "xyz"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token(None) is None


def test_secret_refs() -> None:
    assert parse_secret_ref("ca", "ns") == ("ns", "ca")
    assert parse_secret_ref("other/ca", "ns") == ("other", "ca")
    assert isinstance(parse_secret_ref("a/b/c", "ns"), str)
    assert isinstance(parse_secret_ref("ns/", "ns"), str)


# --------------------------------------------------------------------------- the CA


async def test_ca_dir_keeps_its_root(tmp_path: Path) -> None:
    first = await load_ca(ca_dir=tmp_path / "ca")
    second = await load_ca(ca_dir=tmp_path / "ca")
    assert first.root_fingerprint == second.root_fingerprint


async def test_ca_secret_is_created_once_and_shared() -> None:
    fake = FakeSecretsServer()
    async with serve(fake) as url, core_api(url) as api:
        first = await load_ca(ca_secret="inferlane/mesh-ca", secrets_api=api)
        second = await load_ca(ca_secret="inferlane/mesh-ca", secrets_api=api)
    assert first.root_fingerprint == second.root_fingerprint
    assert ("inferlane", "mesh-ca") in fake.secrets and fake.creates == 1


async def test_ca_secret_errors_are_clear() -> None:
    with pytest.raises(CaLoadError, match="Kubernetes API"):
        await load_ca(ca_secret="mesh-ca")
    with pytest.raises(CaLoadError, match="NAMESPACE/NAME"):
        await load_ca(ca_secret="a/b/c", secrets_api=object())  # type: ignore[arg-type]


def test_connection_lifetime_follows_the_certificate_lifetime() -> None:
    assert SecuritySettings().connection_lifetime_s == 3600.0
    assert SecuritySettings(cert_ttl=timedelta(seconds=8)).connection_lifetime_s == 2.0


# --------------------------------------------------------------------------- secrets


def _leaf(bundle_secrets: Any) -> x509.Certificate:
    by_name = {s.name: s for s in bundle_secrets}
    pem = by_name["default"].tls_certificate.certificate_chain.inline_bytes
    return x509.load_pem_x509_certificates(pem)[0]


async def test_one_certificate_per_identity_until_rotated(ca: CertificateAuthority) -> None:
    store = SecretStore(ca, TD)
    changes: list[int] = []
    store.on_change = lambda: changes.append(1)
    first = store.bundle(Identity("default", "llama"))
    assert store.bundle(Identity("default", "llama")) is first
    assert [s.name for s in first.secrets] == ["default", "ROOTCA"]
    assert _leaf(first.secrets).serial_number == first.serial
    other = store.bundle(Identity("default", "chat"))
    assert other.serial != first.serial and store.identities() == [
        ("default", "chat"),
        ("default", "llama"),
    ]
    assert await store.rotate_all() == 2 and changes == [1]
    assert store.bundle(Identity("default", "llama")).serial != first.serial


def test_unused_identities_are_dropped_at_renewal(ca: CertificateAuthority) -> None:
    store = SecretStore(ca, TD)
    store.bundle(Identity("default", "llama"))
    store.bundle(Identity("default", "chat"))
    assert store.renew_due(in_use={Identity("default", "chat")}) == []
    assert store.identities() == [("default", "chat")]


async def test_renewal_at_half_life_calls_on_change(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SecretStore(ca, TD, ttl=timedelta(seconds=1))
    changed = asyncio.Event()
    store.on_change = changed.set
    first = store.bundle(Identity("default", "llama"))
    task = asyncio.create_task(store.run(lambda: {Identity("default", "llama")}))
    try:
        async with asyncio.timeout(5):
            await changed.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert store.renewed >= 1
    assert store.bundle(Identity("default", "llama")).serial != first.serial


async def test_renewal_never_spins(ca: CertificateAuthority) -> None:
    """A certificate so short-lived that it is due again at once: the renewal loop still
    waits its minimum interval between passes."""
    store = SecretStore(ca, TD, ttl=timedelta(milliseconds=100))
    store.bundle(Identity("default", "llama"))
    task = asyncio.create_task(store.run(lambda: {Identity("default", "llama")}))
    await asyncio.sleep(1.0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert 1 <= store.renewed <= 1.0 / store.min_renewal_interval + 1


# --------------------------------------------------------------------------- the generator


def _world(pods: dict[str, str]) -> World:
    workloads = {
        ("default", pod): Workload(namespace="default", name=pod, service_account=sa)
        for pod, sa in pods.items()
    }
    svc = service(endpoints=[endpoint("10.0.0.1", gpu=True, pod="gpu-0")])
    return World(services=(svc,), workloads=MappingProxyType(workloads))


async def test_generator_serves_own_secrets_and_keys_on_the_identity(
    ca: CertificateAuthority,
) -> None:
    store = SecretStore(ca, TD)
    world = _world({"client-0": "chat", "client-1": "chat", "gpu-0": "llama"})
    sidecars = {("default", "gpu-0"): proxy(pod="gpu-0", ip="10.0.0.1")}
    generator = MeshGenerator(world, sidecars, store)
    one, two = proxy(pod="client-0"), proxy(pod="client-1", ip="10.1.0.2")
    assert generator.key(one) == generator.key(two)
    resources = generator.generate(one)
    assert _leaf(resources[xds.SECRET]).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/default/sa/chat"
    ]
    stranger = proxy(pod="stranger-0")
    assert xds.SECRET not in generator.generate(stranger)
    assert generator.key(stranger) != generator.key(one)

    # A rotation is a new generation with the same routing and a new certificate. Keys
    # hold within one generation (the cache memoizes per generation), so the key does not
    # name the certificate, and computing it never signs.
    await store.rotate_all()
    after = MeshGenerator(world, sidecars, store, previous=generator)
    issued = store.issued
    assert after.key(one) == generator.key(one) and store.issued == issued
    again = after.generate(one)
    for type_url in (xds.CLUSTER, xds.LISTENER, xds.ROUTE, xds.ENDPOINT):
        assert again[type_url] is resources[type_url]
    assert _leaf(again[xds.SECRET]).serial_number != _leaf(resources[xds.SECRET]).serial_number


def test_generator_without_secrets_sends_no_mtls_config() -> None:
    world = _world({"client-0": "chat", "gpu-0": "llama"})
    sidecars = {("default", "gpu-0"): proxy(pod="gpu-0", ip="10.0.0.1")}
    resources = MeshGenerator(world, sidecars).generate(proxy(pod="client-0"))
    assert xds.SECRET not in resources
    assert not any(c.transport_socket_matches for c in resources[xds.CLUSTER])


# --------------------------------------------------------------------------- token reviews


@contextlib.asynccontextmanager
async def token_api(reviews: dict[str, Any]) -> AsyncIterator[AuthenticationV1Api]:
    """A fake API server answering TokenReviews from ``reviews`` (token -> status or
    HTTP status code), with a real kubernetes.aio client pointed at it."""
    seen: list[Any] = []

    async def review(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        seen.append(body)
        answer = reviews.get(body["spec"]["token"], {"authenticated": False, "error": "bad"})
        if isinstance(answer, int):
            return web.json_response({"kind": "Status", "code": answer}, status=answer)
        return web.json_response(
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": body["spec"],
                "status": answer,
            },
            status=201,
        )

    app = web.Application()
    app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", review)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    client = ApiClient(Configuration(host=f"http://{host}:{port}"))
    try:
        yield AuthenticationV1Api(client)
    finally:
        await client.close()  # type: ignore[no-untyped-call]
        await runner.cleanup()
        assert all(b["spec"]["audiences"] == ["inferlane"] for b in seen)


async def test_token_reviews() -> None:
    sa = "system:serviceaccount:default:chat"
    reviews: dict[str, Any] = {
        "good": {
            "authenticated": True,
            "audiences": ["inferlane"],
            "user": {"username": sa, "extra": {"authentication.kubernetes.io/pod-name": ["c-0"]}},
        },
        "unbound": {"authenticated": True, "audiences": ["inferlane"], "user": {"username": sa}},
        "other-audience": {"authenticated": True, "audiences": ["api"], "user": {"username": sa}},
        "a-person": {
            "authenticated": True,
            "audiences": ["inferlane"],
            "user": {"username": "alice"},
        },
        "forbidden": 403,
    }
    async with token_api(reviews) as api:
        reviewer = KubernetesTokenReviewer(api)
        assert await reviewer.review("good") == TokenIdentity("default", "chat", "c-0")
        assert await reviewer.review("unbound") == TokenIdentity("default", "chat", "")
        for token, reason in (
            ("other-audience", "audience"),
            ("a-person", "not a service account"),
            ("forbidden", "403"),
            ("unknown", "refused"),
        ):
            result = await reviewer.review(token)
            assert isinstance(result, str) and reason in result, (token, result)
