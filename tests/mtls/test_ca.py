from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.certs import rsa_ca
from mtls.ca import (
    CERT_FILE,
    CLOCK_SKEW,
    KEY_FILE,
    ROOT_FILE,
    BadIdentity,
    CaLoadError,
    CertificateAuthority,
    ExpiredCertificate,
    IssuedCert,
    MtlsError,
    UntrustedCertificate,
)
from tests.mtls.pki import KeyPair, make_ca, make_leaf

TD = "cluster.local"
_SHARED_CA = CertificateAuthority.generate()
_CA_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


@pytest.fixture(scope="module")
def workload(ca: CertificateAuthority) -> IssuedCert:
    return ca.issue_workload(TD, "default", "llama")


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _chain(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


# ----------------------------------------------------------------------------- the root


def test_generated_root_is_a_p256_ca_named_inferlane(ca: CertificateAuthority) -> None:
    root = ca.certificate
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "inferlane"
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert ca.trust_bundle_pem == root.public_bytes(serialization.Encoding.PEM)


def test_ca_dir_is_created_once_and_reloaded_with_the_same_root(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    first = CertificateAuthority.load_or_create(ca_dir)
    assert {p.name for p in ca_dir.iterdir()} >= {CERT_FILE, KEY_FILE, ROOT_FILE}
    assert stat.S_IMODE(os.stat(ca_dir / KEY_FILE).st_mode) == 0o600
    assert not list(ca_dir.glob("*.tmp"))
    second = CertificateAuthority.load_or_create(ca_dir)
    assert second.root_fingerprint == first.root_fingerprint
    # A certificate the first instance issued verifies with the reloaded one.
    issued = first.issue_workload(TD, "ns", "sa")
    assert second.verify_client(issued.chain_pem) == "spiffe://cluster.local/ns/ns/sa/sa"


def test_half_written_ca_dir_is_replaced_not_loaded(tmp_path: Path) -> None:
    # A crash before tls.crt (written last) was renamed into place: only the key exists.
    tmp_path.joinpath(KEY_FILE).write_bytes(b"partial")
    ca = CertificateAuthority.load_or_create(tmp_path)
    assert CertificateAuthority.load_or_create(tmp_path).root_fingerprint == ca.root_fingerprint


def test_corrupt_ca_dir_is_a_clear_error(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    tmp_path.joinpath(KEY_FILE).write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CaLoadError, match="does not match"):
        CertificateAuthority.load_or_create(tmp_path)


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        (b"", b"", "no PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n", b"", "tls.crt"),
    ],
)
def test_bad_ca_material_is_a_clear_error(cert: bytes, key: bytes, message: str) -> None:
    with pytest.raises(CaLoadError, match=message):
        CertificateAuthority.from_pem(cert, key)


def test_a_leaf_certificate_cannot_be_a_ca() -> None:
    root = make_ca("root")
    not_ca = make_ca("leafy", root, ca=False)
    with pytest.raises(CaLoadError, match="not a CA"):
        CertificateAuthority.from_pem(not_ca.cert_pem + root.cert_pem, not_ca.key_pem)


def test_missing_secret_keys_are_named() -> None:
    with pytest.raises(CaLoadError, match=r"tls\.key"):
        CertificateAuthority.from_secret_data({"tls.crt": b"x"})


# ----------------------------------------------------------------------------- intermediates


@pytest.fixture(scope="module")
def external() -> tuple[KeyPair, KeyPair]:
    root = make_ca("external root")
    return root, make_ca("mesh intermediate", root)


def test_intermediate_from_cert_manager_secret(external: tuple[KeyPair, KeyPair]) -> None:
    root, inter = external
    ca = CertificateAuthority.from_secret_data(
        {"tls.crt": inter.cert_pem, "tls.key": inter.key_pem, "ca.crt": root.cert_pem}
    )
    assert ca.trust_bundle_pem == root.cert_pem
    issued = ca.issue_workload(TD, "default", "llama")
    chain = _chain(issued.chain_pem)
    assert [c.issuer for c in chain] == [inter.cert.subject, root.cert.subject]
    assert chain[1] == inter.cert
    assert ca.verify_client(issued.chain_pem) == "spiffe://cluster.local/ns/default/sa/llama"
    # The peer may send only its leaf: the CA supplies its own intermediate.
    assert ca.verify_client(issued.cert_pem) == issued.spiffe_id
    assert ca.secret_data()["tls.crt"] == inter.cert_pem


def test_intermediate_chain_in_tls_crt_without_ca_crt(external: tuple[KeyPair, KeyPair]) -> None:
    root, inter = external
    ca = CertificateAuthority.from_pem(inter.cert_pem + root.cert_pem, inter.key_pem)
    assert ca.trust_bundle_pem == root.cert_pem
    issued = ca.issue_workload(TD, "default", "llama")
    assert _chain(issued.chain_pem)[1:] == [inter.cert]  # never the root


def test_intermediate_from_files(tmp_path: Path, external: tuple[KeyPair, KeyPair]) -> None:
    root, inter = external
    (tmp_path / "tls.crt").write_bytes(inter.cert_pem)
    (tmp_path / "tls.key").write_bytes(inter.key_pem)
    (tmp_path / "ca.crt").write_bytes(root.cert_pem)
    ca = CertificateAuthority.load_or_create(tmp_path)
    assert ca.certificate == inter.cert
    assert ca.roots == (root.cert,)


def test_intermediate_without_its_root_is_refused(external: tuple[KeyPair, KeyPair]) -> None:
    _, inter = external
    with pytest.raises(CaLoadError, match="not self-signed"):
        CertificateAuthority.from_pem(inter.cert_pem, inter.key_pem)
    with pytest.raises(CaLoadError, match="does not chain"):
        CertificateAuthority.from_pem(inter.cert_pem, inter.key_pem, make_ca("other").cert_pem)


def test_two_level_intermediate_chain() -> None:
    root = make_ca("root")
    mid = make_ca("mid", root)
    low = make_ca("low", mid)
    ca = CertificateAuthority.from_pem(low.cert_pem + mid.cert_pem, low.key_pem, root.cert_pem)
    issued = ca.issue_workload(TD, "a", "b")
    assert _chain(issued.chain_pem)[1:] == [low.cert, mid.cert]
    assert ca.verify_client(issued.chain_pem) == "spiffe://cluster.local/ns/a/sa/b"


# ----------------------------------------------------------------------------- issuing


def test_workload_certificate_profile(ca: CertificateAuthority, workload: IssuedCert) -> None:
    cert = _cert(workload.cert_pem)
    assert workload.spiffe_id == "spiffe://cluster.local/ns/default/sa/llama"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(workload.spiffe_id)]
    assert len(cert.subject) == 0  # no CN-based identity
    key = serialization.load_pem_private_key(workload.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.serial_number == workload.serial


def test_workload_lifetime_is_backdated_for_clock_skew() -> None:
    now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    ca = CertificateAuthority.generate(clock=lambda: now)
    issued = ca.issue_workload(TD, "default", "llama")
    cert = _cert(issued.cert_pem)
    assert cert.not_valid_before_utc == issued.not_before == now - CLOCK_SKEW
    assert cert.not_valid_after_utc == issued.not_after == now + timedelta(hours=24)
    short = ca.issue_workload(TD, "default", "llama", ttl=timedelta(hours=1))
    assert short.not_after == now + timedelta(hours=1)


def test_workload_never_outlives_its_ca() -> None:
    ca = CertificateAuthority.generate(ttl=timedelta(hours=2))
    issued = ca.issue_workload(TD, "default", "llama")
    assert issued.not_after <= ca.certificate.not_valid_after_utc


def test_each_issue_has_a_fresh_key_and_serial(ca: CertificateAuthority) -> None:
    a = ca.issue_workload(TD, "default", "llama")
    b = ca.issue_workload(TD, "default", "llama")
    assert a.key_pem != b.key_pem and a.serial != b.serial


@pytest.mark.parametrize(
    ("td", "ns", "sa"),
    [("Cluster.Local", "default", "x"), (TD, "Default", "x"), (TD, "ns", ""), ("", "ns", "sa")],
)
def test_issue_refuses_malformed_identities(
    ca: CertificateAuthority, td: str, ns: str, sa: str
) -> None:
    with pytest.raises(BadIdentity):
        ca.issue_workload(td, ns, sa)


def test_server_certificate(ca: CertificateAuthority) -> None:
    issued = ca.issue_server(["inferlane.system.svc", "127.0.0.1"], ttl=timedelta(days=1))
    san = _cert(issued.cert_pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["inferlane.system.svc"]
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert issued.spiffe_id == ""
    with pytest.raises(MtlsError):
        ca.issue_server([])


# ----------------------------------------------------------------------------- derived


START = datetime(2030, 1, 1, 6, 30, 12, 345678, tzinfo=UTC)


def _derive(ca: CertificateAuthority, sa: str = "llama", **changes: object) -> IssuedCert:
    args: dict[str, Any] = {"start": START, "ttl": timedelta(hours=24), "epoch": 0} | changes
    return ca.derive_workload(TD, "default", sa, **args)


def test_every_copy_of_the_ca_derives_the_same_bytes(tmp_path: Path) -> None:
    """Two replicas (or one before and after a restart) load the CA from its files or its
    Secret: each derives byte-identical certificates and keys."""
    made = CertificateAuthority.load_or_create(tmp_path / "ca")
    loaded = CertificateAuthority.load_or_create(tmp_path / "ca")
    from_secret = CertificateAuthority.from_secret_data(made.secret_data())
    first = _derive(made)
    assert _derive(loaded) == first
    assert _derive(from_secret) == first
    # ... and deriving twice is not a cached answer: the CA signs each time (RFC 6979).
    assert _derive(made) == first and _derive(made) is not first
    # Another CA with its own key derives something else entirely.
    stranger = _derive(CertificateAuthority.generate(clock=lambda: START))
    assert stranger.key_pem != first.key_pem and stranger.serial != first.serial


def test_a_derived_certificate_is_a_valid_workload_certificate() -> None:
    ca = CertificateAuthority.generate(clock=lambda: START - timedelta(days=1))
    issued = _derive(ca)
    cert = _cert(issued.cert_pem)
    cert.verify_directly_issued_by(ca.certificate)
    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()
    assert cert.serial_number == issued.serial and 0 < issued.serial < 2**159
    # Valid from the start of its life (backdated for skew) for the whole lifetime.
    assert (
        cert.not_valid_before_utc
        == issued.not_before
        == (START - CLOCK_SKEW).replace(microsecond=0)
    )
    assert (
        cert.not_valid_after_utc
        == issued.not_after
        == (START + timedelta(hours=24)).replace(microsecond=0)
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(issued.spiffe_id)]
    assert ca.verify_client(issued.chain_pem, now=START) == issued.spiffe_id


def test_derived_keys_differ_by_identity_period_lifetime_and_epoch() -> None:
    ca = CertificateAuthority.generate(clock=lambda: START)
    variants = [
        _derive(ca),
        _derive(ca, sa="chat"),
        _derive(ca, start=START + timedelta(hours=12)),
        _derive(ca, start=START + timedelta(microseconds=1)),
        _derive(ca, ttl=timedelta(hours=23)),
        _derive(ca, epoch=1),
        ca.derive_workload("other.domain", "default", "llama", start=START),
    ]
    assert len({v.key_pem for v in variants}) == len(variants)
    assert len({v.serial for v in variants}) == len(variants)
    assert len({v.cert_pem for v in variants}) == len(variants)


def test_a_derived_certificate_stays_within_its_ca() -> None:
    """A CA made after the period began, and expiring before the leaf would: the leaf's
    validity is cut to the CA's, and still derived the same way every time."""
    ca = CertificateAuthority.generate(
        clock=lambda: START + timedelta(hours=1), ttl=timedelta(hours=5)
    )
    issued = _derive(ca)
    assert issued.not_before == ca.certificate.not_valid_before_utc
    assert issued.not_after == ca.certificate.not_valid_after_utc
    copy = CertificateAuthority.from_secret_data(
        ca.secret_data(), clock=lambda: START + timedelta(hours=1)
    )
    assert _derive(copy) == issued


def test_an_rsa_ca_derives_the_same_bytes_too() -> None:
    """PKCS#1 v1.5 signatures are deterministic by construction: an RSA CA (cert-manager
    issues those) derives identical certificates as well."""
    rsa = rsa_ca()
    copy = CertificateAuthority.from_secret_data(rsa.secret_data())
    now = datetime.now(UTC)
    assert _derive(rsa, start=now) == _derive(copy, start=now)
    _cert(_derive(rsa, start=now).cert_pem).verify_directly_issued_by(rsa.certificate)


def test_derivation_refuses_bad_input(ca: CertificateAuthority) -> None:
    with pytest.raises(BadIdentity):
        ca.derive_workload(TD, "Not_A_Namespace", "llama", start=START)
    with pytest.raises(MtlsError, match="epoch"):
        _derive(ca, epoch=-1)
    with pytest.raises(MtlsError, match="lifetime"):
        _derive(ca, ttl=timedelta(0))


# ----------------------------------------------------------------------------- verifying


@pytest.fixture(scope="module")
def own_root() -> tuple[KeyPair, CertificateAuthority]:
    """A CA whose key the test holds, to sign leaves our CA would never issue."""
    root = make_ca("own root")
    return root, CertificateAuthority.from_pem(root.cert_pem, root.key_pem)


def test_verify_accepts_pem_der_and_str(ca: CertificateAuthority, workload: IssuedCert) -> None:
    der = _cert(workload.cert_pem).public_bytes(serialization.Encoding.DER)
    assert ca.verify_client(der) == workload.spiffe_id
    assert ca.verify_client([der]) == workload.spiffe_id
    assert ca.verify_client(workload.chain_pem.decode()) == workload.spiffe_id
    assert ca.verify_client(workload.chain_pem, trust_domain=TD) == workload.spiffe_id


def test_verify_refuses_another_ca(ca: CertificateAuthority) -> None:
    stranger = CertificateAuthority.generate().issue_workload(TD, "default", "llama")
    with pytest.raises(UntrustedCertificate):
        ca.verify_client(stranger.chain_pem)


def test_verify_refuses_another_ca_with_the_same_name(ca: CertificateAuthority) -> None:
    # Same subject (O=inferlane) as ours, different key: only the signature tells them apart.
    impostor = CertificateAuthority.generate()
    assert impostor.certificate.subject == ca.certificate.subject
    with pytest.raises(UntrustedCertificate):
        ca.verify_client(impostor.issue_workload(TD, "default", "llama").chain_pem)


def test_verify_refuses_expired_and_not_yet_valid(
    ca: CertificateAuthority, workload: IssuedCert
) -> None:
    with pytest.raises(ExpiredCertificate, match="valid from"):
        ca.verify_client(workload.chain_pem, now=workload.not_after + timedelta(seconds=1))
    with pytest.raises(ExpiredCertificate):
        ca.verify_client(workload.chain_pem, now=workload.not_before - timedelta(seconds=1))


def test_verify_expired_from_another_ca_is_untrusted(ca: CertificateAuthority) -> None:
    stranger = CertificateAuthority.generate().issue_workload(TD, "a", "b")
    with pytest.raises(UntrustedCertificate):
        ca.verify_client(stranger.chain_pem, now=stranger.not_after + timedelta(hours=1))


@pytest.mark.parametrize(
    ("uris", "dns", "message"),
    [
        ([], [], "no subjectAltName"),
        ([], ["llama.default.svc"], "0 URI SANs"),
        (
            ["spiffe://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/c/sa/d"],
            [],
            "2 URI SANs",
        ),
        (["https://example.com/x"], [], "must start with 'spiffe://'"),
        (["spiffe://cluster.local/workload/x"], [], "path must be"),
    ],
)
def test_verify_refuses_bad_identities(
    own_root: tuple[KeyPair, CertificateAuthority], uris: list[str], dns: list[str], message: str
) -> None:
    root, ca = own_root
    leaf = make_leaf(root, uris, dns)
    with pytest.raises(BadIdentity, match=message):
        ca.verify_client(leaf.cert_pem)


def test_verify_accepts_a_spiffe_leaf_with_extra_dns_san(
    own_root: tuple[KeyPair, CertificateAuthority],
) -> None:
    root, ca = own_root
    leaf = make_leaf(root, ["spiffe://cluster.local/ns/a/sa/b"], ["b.a.svc"])
    assert ca.verify_client(leaf.cert_pem) == "spiffe://cluster.local/ns/a/sa/b"


def test_verify_checks_the_trust_domain(ca: CertificateAuthority, workload: IssuedCert) -> None:
    with pytest.raises(BadIdentity, match="trust domain"):
        ca.verify_client(workload.chain_pem, trust_domain="other.example")


def test_verify_refuses_a_server_only_certificate(ca: CertificateAuthority) -> None:
    server = ca.issue_server(["localhost"])
    with pytest.raises(UntrustedCertificate, match="EKU"):
        ca.verify_client(server.chain_pem)


@pytest.mark.parametrize(
    "junk", [b"", b"garbage", "-----BEGIN CERTIFICATE-----\nxx", [b"\x30\x03"]]
)
def test_verify_turns_junk_into_untrusted(
    ca: CertificateAuthority, junk: bytes | str | list[bytes]
) -> None:
    with pytest.raises(UntrustedCertificate):
        ca.verify_client(junk)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=600) | st.text(max_size=200))
def test_verify_never_raises_anything_but_mtls_errors(junk: bytes | str) -> None:
    with pytest.raises(MtlsError):
        _SHARED_CA.verify_client(junk)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400), st.binary(max_size=400), st.none() | st.binary(max_size=200))
def test_loading_junk_is_always_a_ca_load_error(
    cert: bytes, key: bytes, root: bytes | None
) -> None:
    with pytest.raises(CaLoadError):
        CertificateAuthority.from_pem(cert, key, root)


def test_unsupported_key_type_is_a_ca_load_error() -> None:
    root = make_ca("root")
    ed_key = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(CaLoadError, match="not supported"):
        CertificateAuthority.from_pem(root.cert_pem, ed_key)


def test_leaf_aki_repeats_the_signers_own_ski() -> None:
    # Some CAs compute their SKI another way; the leaf's AKI must copy it, not recompute it.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "odd ski")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier(b"0123456789abcdef"), critical=False)
        .add_extension(_CA_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    ca = CertificateAuthority.from_pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    issued = ca.issue_workload(TD, "a", "b")
    aki = _cert(issued.cert_pem).extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert aki.value.key_identifier == b"0123456789abcdef"
    assert ca.verify_client(issued.cert_pem) == issued.spiffe_id


def test_a_ca_without_key_usage_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no usage")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(CaLoadError, match="keyUsage"):
        CertificateAuthority.from_pem(cert.public_bytes(serialization.Encoding.PEM), key_pem)
