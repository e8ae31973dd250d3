from __future__ import annotations

import asyncio
import base64

import pytest

from mtls.ca import CaLoadError, CertificateAuthority
from mtls.store import CaStoreError, decode_secret_data, load_or_create_shared_ca
from tests.mtls.fake_kube import FakeSecretsServer, core_api, serve
from tests.mtls.pki import make_ca

NS, NAME = "inferlane-system", "inferlane-ca"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_two_replicas_racing_end_with_the_same_root() -> None:
    fake = FakeSecretsServer()
    # Both replicas must see "absent" before either creates: the race is forced.
    fake.hold_missing_reads(2)
    async with serve(fake) as url, core_api(url) as api_a, core_api(url) as api_b:
        first, second = await asyncio.gather(
            load_or_create_shared_ca(api_a, NS, NAME),
            load_or_create_shared_ca(api_b, NS, NAME),
        )
        assert first.root_fingerprint == second.root_fingerprint
        assert (fake.creates, fake.conflicts) == (2, 1)
        stored = fake.secrets[(NS, NAME)]
        assert stored["type"] == "kubernetes.io/tls"
        assert set(stored["data"]) == {"tls.crt", "tls.key", "ca.crt"}
        # Certificates from one replica verify at the other.
        issued = first.issue_workload("cluster.local", "default", "llama")
        assert second.verify_client(issued.chain_pem) == issued.spiffe_id
        # A third replica, later, just reads.
        third = await load_or_create_shared_ca(api_a, NS, NAME)
        assert third.root_fingerprint == first.root_fingerprint
        assert fake.creates == 2


async def test_existing_cert_manager_intermediate_is_used_without_writing() -> None:
    root = make_ca("corp root")
    inter = make_ca("mesh intermediate", root)
    fake = FakeSecretsServer()
    fake.put(
        NS,
        NAME,
        {
            "tls.crt": _b64(inter.cert_pem + root.cert_pem),
            "tls.key": _b64(inter.key_pem),
            "ca.crt": _b64(root.cert_pem),
        },
    )
    async with serve(fake) as url, core_api(url) as api:
        ca = await load_or_create_shared_ca(api, NS, NAME)
    assert ca.certificate == inter.cert
    assert ca.trust_bundle_pem == root.cert_pem
    assert fake.creates == 0


async def test_unusable_secret_is_reported_and_left_alone() -> None:
    fake = FakeSecretsServer()
    fake.put(NS, NAME, {"tls.crt": _b64(b"not a certificate"), "tls.key": _b64(b"nope")})
    async with serve(fake) as url, core_api(url) as api:
        with pytest.raises(CaLoadError, match=f"{NS}/{NAME}"):
            await load_or_create_shared_ca(api, NS, NAME)
    assert fake.creates == 0


async def test_forbidden_is_a_store_error() -> None:
    fake = FakeSecretsServer(fail_reads_with=403)
    async with serve(fake) as url, core_api(url) as api:
        with pytest.raises(CaStoreError, match="403"):
            await load_or_create_shared_ca(api, NS, NAME)


async def test_unreachable_api_is_a_store_error() -> None:
    fake = FakeSecretsServer()
    async with serve(fake) as url:
        pass  # stopped: nothing listens there now
    async with core_api(url) as api:
        with pytest.raises(CaStoreError, match="reading Secret"):
            await load_or_create_shared_ca(api, NS, NAME)


def test_decode_secret_data() -> None:
    pem = CertificateAuthority.generate().trust_bundle_pem
    assert decode_secret_data({"ca.crt": _b64(pem)}) == {"ca.crt": pem}
    assert decode_secret_data({"ca.crt": pem}) == {"ca.crt": pem}
    assert decode_secret_data(None) == {}
    with pytest.raises(CaLoadError, match="not base64"):
        decode_secret_data({"ca.crt": "%%%"})
