"""The mesh's certificate authority: SPIFFE workload certificates and client verification.

A :class:`CertificateAuthority` signs with one key and certificate, which is either a root
(self-signed, created on first start and kept under ``--ca-dir``) or an intermediate loaded
from files or from a Secret in cert-manager's form (``tls.crt`` possibly a chain,
``tls.key``, ``ca.crt`` the root). The trust bundle, Istio's ``ROOTCA``, is ``ca.crt`` (or
the root itself); every issued chain carries the intermediates up to, not including, the
root.

Workload certificates follow the SPIFFE X.509-SVID profile as Istio issues them: a
P-256 key, an empty subject, and exactly one URI SAN ``spiffe://TD/ns/NS/sa/SA`` (marked
critical, as an empty subject requires). Nothing else names the workload: no CN, no DNS
SANs.

The control plane issues them with :meth:`CertificateAuthority.derive_workload`: the key
and serial come from the CA's private key (HKDF), the identity, the start of the
certificate's life and a key epoch, and the signature is deterministic, so every process
holding this CA issues the very same bytes for one identity and period. A restarted
control plane, or another replica, then serves the certificate a proxy already holds, and
sends it nothing (``docs/security.md`` says what this means for security).

Errors form a small tree rooted at :class:`MtlsError`; nothing else escapes this module
for bad certificates, keys, identities or CA files.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import itertools
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

log = logging.getLogger(__name__)

#: Workload certificate lifetime (SPEC: 24 h).
DEFAULT_WORKLOAD_TTL = timedelta(hours=24)
#: Lifetime of a root this CA creates for itself: long, since rotating it means
#: re-distributing trust to every proxy.
DEFAULT_ROOT_TTL = timedelta(days=3650)
#: Lifetime of the control plane's own serving certificate.
DEFAULT_SERVER_TTL = timedelta(days=365)
#: How far ``not_before`` is backdated, so a peer whose clock is a little behind still
#: accepts a certificate issued a moment ago.
CLOCK_SKEW = timedelta(minutes=1)
#: Domain separation for the workload keys derived from the CA's key: the HKDF salt, and
#: the first field of every derivation's info (a new version would derive other keys).
DERIVATION_SALT = b"inferlane workload key derivation"
DERIVATION_VERSION = b"inferlane workload certificate v1"
#: The order of P-256's group: a derived private key is a scalar in [1, order - 1].
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
#: Bytes of HKDF output per key: 64 bits more than the order's 256, so that reducing
#: them modulo the order is uniform to within 2**-64 (FIPS 186-5, A.2.1).
_KEY_SEED_BYTES = 40
#: Bytes per serial: 20, the most RFC 5280 allows, of which 159 bits are used (a positive
#: integer, as ``x509.random_serial_number`` makes).
_SERIAL_BYTES = 20
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

#: File names under ``--ca-dir``; the same keys as a cert-manager (``kubernetes.io/tls``)
#: Secret.
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
ROOT_FILE = "ca.crt"
#: Held while a process creates the CA or changes the key epoch in ``--ca-dir``.
LOCK_FILE = ".lock"
ROOT_ORGANIZATION = "inferlane"

#: Longest SPIFFE ID accepted (the SPIFFE standard's limit for a URI SAN).
MAX_SPIFFE_ID_LENGTH = 2048

CaPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def unix_micros(at: datetime) -> int:
    """Whole microseconds since the Unix epoch: exact, where ``timestamp()`` is a float."""
    return (at - _UNIX_EPOCH) // _MICROSECOND


def from_unix_micros(micros: int) -> datetime:
    return _UNIX_EPOCH + micros * _MICROSECOND


# --------------------------------------------------------------------------- errors


class MtlsError(Exception):
    """Base of every error this package raises on purpose."""


class UntrustedCertificate(MtlsError):
    """Not a certificate, or not issued (directly or through intermediates) by our roots."""


class ExpiredCertificate(MtlsError):
    """Signed by a trusted CA, but outside its validity window now."""


class BadIdentity(MtlsError):
    """A SPIFFE ID, or a certificate's identity, that does not follow the conventions."""


class CaLoadError(MtlsError):
    """CA material (files, a Secret) that cannot be used to issue certificates."""


# --------------------------------------------------------------------------- SPIFFE IDs

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
#: A Kubernetes namespace: an RFC 1123 label.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
#: A Kubernetes service account: an RFC 1123 subdomain.
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SPIFFE_PREFIX = "spiffe://"


class SpiffeId(NamedTuple):
    """A workload identity; unpacks as ``(trust_domain, namespace, service_account)``."""

    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"{_SPIFFE_PREFIX}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def _check_parts(trust_domain: str, namespace: str, service_account: str) -> None:
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise BadIdentity(
            f"trust domain {trust_domain!r} must be 1-255 characters of a-z, 0-9, '.', '-', '_'"
        )
    if not _DNS_LABEL.fullmatch(namespace):
        raise BadIdentity(f"namespace {namespace!r} is not a Kubernetes namespace name")
    if len(service_account) > 253 or not _DNS_SUBDOMAIN.fullmatch(service_account):
        raise BadIdentity(f"service account {service_account!r} is not a Kubernetes name")


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """``spiffe://TRUST_DOMAIN/ns/NS/sa/SA``; :class:`BadIdentity` if a part is malformed."""
    _check_parts(trust_domain, namespace, service_account)
    return SpiffeId(trust_domain, namespace, service_account).uri


def parse_spiffe_id(value: object) -> SpiffeId:
    """Parse ``spiffe://TD/ns/NS/sa/SA`` strictly; raise :class:`BadIdentity` saying why not.

    Strict means: lower-case scheme and trust domain, no port, user, query or fragment, and
    exactly the Istio path with Kubernetes-valid namespace and service-account names.
    """
    if not isinstance(value, str):
        raise BadIdentity(f"SPIFFE ID must be a string, not {type(value).__name__}")
    if len(value) > MAX_SPIFFE_ID_LENGTH:
        raise BadIdentity(f"SPIFFE ID is {len(value)} characters, over {MAX_SPIFFE_ID_LENGTH}")
    if not value.startswith(_SPIFFE_PREFIX):
        raise BadIdentity(f"{value!r} is not a SPIFFE ID: it must start with 'spiffe://'")
    trust_domain, slash, path = value[len(_SPIFFE_PREFIX) :].partition("/")
    if not slash:
        raise BadIdentity(f"SPIFFE ID {value!r} has no path; expected /ns/NS/sa/SA")
    segments = path.split("/")
    if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
        raise BadIdentity(f"SPIFFE ID {value!r}: path must be /ns/NAMESPACE/sa/SERVICEACCOUNT")
    try:
        _check_parts(trust_domain, segments[1], segments[3])
    except BadIdentity as exc:
        raise BadIdentity(f"SPIFFE ID {value!r}: {exc}") from None
    return SpiffeId(trust_domain, segments[1], segments[3])


# --------------------------------------------------------------------------- issued certificates


@dataclass(frozen=True)
class IssuedCert:
    """A certificate this CA signed, with its key. PEM throughout."""

    cert_pem: bytes
    key_pem: bytes
    #: The leaf followed by any intermediates (never the root): what a TLS peer presents.
    chain_pem: bytes
    serial: int
    not_before: datetime
    not_after: datetime
    #: ``spiffe://...`` for workload certificates, ``""`` for server certificates.
    spiffe_id: str

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.not_before


# --------------------------------------------------------------------------- parsing helpers


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


def _load_pem_certs(data: bytes | str, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(_as_bytes(data))
    except ValueError as exc:
        raise CaLoadError(f"{what}: no PEM certificate could be read ({exc})") from None
    if not certs:
        raise CaLoadError(f"{what}: no PEM certificate found")
    return certs


def _load_key(data: bytes | str, what: str) -> CaPrivateKey:
    try:
        key = serialization.load_pem_private_key(_as_bytes(data), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CaLoadError(f"{what}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaLoadError(f"{what}: {type(key).__name__} keys are not supported; use EC or RSA")
    return key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and _issued_by(cert, cert)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _spki(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | x509.Certificate) -> bytes:
    public = key.public_key() if isinstance(key, x509.Certificate) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _subject_key_id(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    """The certificate's own SKI when it has one: the AKI of what it signs must repeat it
    exactly, or chain building in TLS peers may not find the issuer."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


def _parse_chain(chain: bytes | str | Sequence[bytes]) -> list[x509.Certificate]:
    """PEM (one or more certificates), a DER certificate, or a sequence of either."""
    items: list[bytes | str] = [chain] if isinstance(chain, bytes | str) else list(chain)
    certs: list[x509.Certificate] = []
    try:
        for item in items:
            raw = _as_bytes(item)
            if b"-----BEGIN" in raw:
                certs.extend(x509.load_pem_x509_certificates(raw))
            else:
                certs.append(x509.load_der_x509_certificate(raw))
    except (ValueError, TypeError) as exc:
        raise UntrustedCertificate(f"not a certificate: {exc}") from None
    if not certs:
        raise UntrustedCertificate("no certificate presented")
    return certs


# --------------------------------------------------------------------------- the CA


class CertificateAuthority:
    """Signs workload and server certificates; verifies peers against its trust bundle.

    Build one with :meth:`generate`, :meth:`load_or_create` (``--ca-dir``),
    :meth:`from_files` or :meth:`from_secret_data` (cert-manager's Secret form). Instances
    are immutable and safe to share.
    """

    def __init__(
        self,
        key: CaPrivateKey,
        cert_chain: Sequence[x509.Certificate],
        roots: Sequence[x509.Certificate],
        *,
        clock: Clock = utcnow,
    ) -> None:
        """``cert_chain``: the signing certificate first, then its issuers (root optional);
        ``roots``: the trust bundle. Raises :class:`CaLoadError` if they do not fit."""
        if not cert_chain:
            raise CaLoadError("CA certificate chain is empty")
        if not roots:
            raise CaLoadError("CA trust bundle is empty")
        self._clock = clock
        self._key = key
        self._cert = cert_chain[0]
        self._roots = tuple(roots)
        self._check_signing_cert(key, self._cert)
        # Intermediates to send with each leaf: the signer and its issuers, minus roots.
        self._intermediates = tuple(c for c in cert_chain if c not in self._roots)
        self._check_chain(cert_chain)
        self._chain_tail_pem = b"".join(_pem(c) for c in self._intermediates)
        self._trust_bundle_pem = b"".join(_pem(c) for c in self._roots)
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            _subject_key_id(self._cert)
        )
        self._sign_hash = hashes.SHA256()
        #: HKDF's pseudorandom key for workload keys, extracted once from the CA's key.
        self._derivation_key = HKDF.extract(
            hashes.SHA256(),
            DERIVATION_SALT,
            key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )

    # ------------------------------------------------------------------ construction

    @classmethod
    def generate(
        cls,
        *,
        organization: str = ROOT_ORGANIZATION,
        ttl: timedelta = DEFAULT_ROOT_TTL,
        clock: Clock = utcnow,
    ) -> CertificateAuthority:
        """A new self-signed P-256 root (CA:true, pathlen 0, keyCertSign + cRLSign)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = clock()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        log.info("created a new root CA %s", _describe(cert))
        return cls(key, [cert], [cert], clock=clock)

    @classmethod
    def from_pem(
        cls,
        cert_pem: bytes | str,
        key_pem: bytes | str,
        ca_pem: bytes | str | None = None,
        *,
        clock: Clock = utcnow,
    ) -> CertificateAuthority:
        """Load a root or intermediate CA.

        ``cert_pem`` is the signing certificate, optionally followed by its issuers;
        ``ca_pem`` the trust bundle (one or more roots). Without ``ca_pem`` the last
        certificate of ``cert_pem`` must be self-signed, and it becomes the root.
        """
        chain = _load_pem_certs(cert_pem, CERT_FILE)
        key = _load_key(key_pem, KEY_FILE)
        if ca_pem is not None and _as_bytes(ca_pem).strip():
            roots = _load_pem_certs(ca_pem, ROOT_FILE)
        elif _is_self_signed(chain[-1]):
            roots = [chain[-1]]
        else:
            raise CaLoadError(
                f"{CERT_FILE} ends in {_describe(chain[-1])}, which is not self-signed, and no "
                f"{ROOT_FILE} names the root"
            )
        return cls(key, chain, roots, clock=clock)

    @classmethod
    def from_secret_data(
        cls, data: Mapping[str, bytes | str], *, clock: Clock = utcnow
    ) -> CertificateAuthority:
        """Load from decoded Secret data in cert-manager's form: tls.crt, tls.key, ca.crt."""
        missing = [k for k in (CERT_FILE, KEY_FILE) if not data.get(k)]
        if missing:
            raise CaLoadError(f"CA Secret lacks {', '.join(missing)}")
        return cls.from_pem(data[CERT_FILE], data[KEY_FILE], data.get(ROOT_FILE), clock=clock)

    @classmethod
    def from_files(
        cls,
        cert_path: Path | str,
        key_path: Path | str,
        ca_path: Path | str | None = None,
        *,
        clock: Clock = utcnow,
    ) -> CertificateAuthority:
        try:
            cert_pem = Path(cert_path).read_bytes()
            key_pem = Path(key_path).read_bytes()
            ca_pem = Path(ca_path).read_bytes() if ca_path is not None else None
        except OSError as exc:
            raise CaLoadError(f"cannot read CA files: {exc}") from None
        return cls.from_pem(cert_pem, key_pem, ca_pem, clock=clock)

    @classmethod
    def load_or_create(cls, ca_dir: Path | str, *, clock: Clock = utcnow) -> CertificateAuthority:
        """The CA kept in ``ca_dir`` (tls.crt, tls.key, ca.crt); created there if absent.

        ``tls.crt`` is written last, each file through a temporary name and a rename, so
        it marks a complete CA: a crash part-way leaves no ``tls.crt`` and the next start
        creates the CA again. An advisory lock keeps two processes from racing.
        """
        directory = Path(ca_dir)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            with locked(directory / LOCK_FILE):
                if (directory / CERT_FILE).exists():
                    ca_path = directory / ROOT_FILE
                    ca = cls.from_files(
                        directory / CERT_FILE,
                        directory / KEY_FILE,
                        ca_path if ca_path.exists() else None,
                        clock=clock,
                    )
                    log.info("loaded CA %s from %s", _describe(ca._cert), directory)
                    return ca
                ca = cls.generate(clock=clock)
                ca.save(directory)
                log.info("saved the new CA under %s", directory)
                return ca
        except OSError as exc:
            raise CaLoadError(f"CA directory {directory}: {exc}") from None

    def save(self, ca_dir: Path | str) -> None:
        """Write tls.key (0600), ca.crt and then tls.crt, each atomically."""
        directory = Path(ca_dir)
        data = self.secret_data()
        write_atomic(directory / KEY_FILE, data[KEY_FILE], mode=0o600)
        write_atomic(directory / ROOT_FILE, data[ROOT_FILE], mode=0o644)
        write_atomic(directory / CERT_FILE, data[CERT_FILE], mode=0o644)
        fsync_dir(directory)

    def secret_data(self) -> dict[str, bytes]:
        """This CA in cert-manager's Secret form (raw PEM values; base64 is the caller's)."""
        key_pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        issuers = (c for c in self._intermediates if c != self._cert)
        cert_pem = _pem(self._cert) + b"".join(_pem(c) for c in issuers)
        return {CERT_FILE: cert_pem, KEY_FILE: key_pem, ROOT_FILE: self._trust_bundle_pem}

    # ------------------------------------------------------------------ checks

    def _check_signing_cert(self, key: CaPrivateKey, cert: x509.Certificate) -> None:
        if _spki(key.public_key()) != _spki(cert):
            raise CaLoadError(f"{KEY_FILE} does not match the certificate {_describe(cert)}")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise CaLoadError(f"{_describe(cert)} has no basicConstraints: not a CA") from None
        if not constraints.ca:
            raise CaLoadError(f"{_describe(cert)} is not a CA certificate (CA:false)")
        # RFC 5280 profile, as verify_client applies it: a CA states keyCertSign.
        try:
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            raise CaLoadError(f"{_describe(cert)} has no keyUsage extension") from None
        if not usage.key_cert_sign:
            raise CaLoadError(f"{_describe(cert)} may not sign certificates (no keyCertSign)")
        now = self._clock()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CaLoadError(
                f"CA certificate {_describe(cert)} is valid from {cert.not_valid_before_utc} "
                f"to {cert.not_valid_after_utc}, not now ({now})"
            )

    def _check_chain(self, chain: Sequence[x509.Certificate]) -> None:
        for child, parent in itertools.pairwise(chain):
            if not _issued_by(child, parent):
                raise CaLoadError(
                    f"{CERT_FILE}: {_describe(child)} is not issued by the next certificate, "
                    f"{_describe(parent)}"
                )
        top = chain[-1]
        if top in self._roots:
            return
        if not any(_issued_by(top, root) for root in self._roots):
            raise CaLoadError(f"{_describe(top)} does not chain to any certificate in {ROOT_FILE}")

    # ------------------------------------------------------------------ properties

    @property
    def trust_bundle_pem(self) -> bytes:
        """The roots peers must trust: Istio's ``ROOTCA`` secret."""
        return self._trust_bundle_pem

    @property
    def certificate(self) -> x509.Certificate:
        """The signing certificate (the root itself, or an intermediate)."""
        return self._cert

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        return self._roots

    @property
    def root_fingerprint(self) -> str:
        """SHA-256 of the first root, hex: a short way to tell CAs apart in logs."""
        return self._roots[0].fingerprint(hashes.SHA256()).hex()

    # ------------------------------------------------------------------ issuing

    def issue_workload(
        self,
        trust_domain: str,
        namespace: str,
        service_account: str,
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
    ) -> IssuedCert:
        """A fresh random P-256 key and serial, valid from now for ``ttl``; the only
        identity is the SPIFFE URI SAN. The control plane serves :meth:`derive_workload`'s
        certificates instead; this is for tools and tests that need a new one."""
        identity = spiffe_id(trust_domain, namespace, service_account)
        return self._issue_fresh(_workload_san(identity), _WORKLOAD_USAGES, identity, ttl)

    def derive_workload(
        self,
        trust_domain: str,
        namespace: str,
        service_account: str,
        *,
        start: datetime,
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        epoch: int = 0,
    ) -> IssuedCert:
        """The identity's certificate whose life begins at ``start``: the same bytes from
        every CA that holds this key.

        The P-256 key and the serial are HKDF-SHA256 output keyed by the CA's private key,
        with the SPIFFE ID, ``start``, ``ttl`` and ``epoch`` as its info; the certificate is
        valid from ``start`` (backdated by ``CLOCK_SKEW``) for ``ttl``, within the CA's own
        validity; the signature is deterministic (RFC 6979 for an EC CA, and PKCS#1 v1.5,
        an RSA CA's, is by nature). A new ``epoch`` gives new keys for the same periods.
        """
        identity = spiffe_id(trust_domain, namespace, service_account)
        _check_lifetime(ttl)
        if epoch < 0:
            raise MtlsError(f"key epoch must not be negative, not {epoch}")
        info = b"\0".join(
            [
                DERIVATION_VERSION,
                identity.encode(),
                str(unix_micros(start)).encode(),
                str(ttl // _MICROSECOND).encode(),
                str(epoch).encode(),
            ]
        )
        okm = HKDFExpand(hashes.SHA256(), _KEY_SEED_BYTES + _SERIAL_BYTES, info).derive(
            self._derivation_key
        )
        scalar = int.from_bytes(okm[:_KEY_SEED_BYTES], "big") % (P256_ORDER - 1) + 1
        serial = int.from_bytes(okm[_KEY_SEED_BYTES:], "big") >> 1 or 1
        return self._issue(
            _workload_san(identity),
            _WORKLOAD_USAGES,
            identity,
            key=ec.derive_private_key(scalar, ec.SECP256R1()),
            serial=serial,
            not_before=max(start - CLOCK_SKEW, self._cert.not_valid_before_utc),
            not_after=start + ttl,
        )

    def issue_server(
        self, dns_names: Sequence[str], ttl: timedelta = DEFAULT_SERVER_TTL
    ) -> IssuedCert:
        """A serving certificate for the control plane's TLS xDS port.

        Entries of ``dns_names`` that are IP literals (``127.0.0.1``) become IP SANs.
        """
        if not dns_names:
            raise MtlsError("a server certificate needs at least one DNS name or IP")
        names: list[x509.GeneralName] = []
        for entry in dns_names:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(entry)))
            except ValueError:
                names.append(x509.DNSName(entry))
        san = x509.SubjectAlternativeName(names)
        return self._issue_fresh(san, [ExtendedKeyUsageOID.SERVER_AUTH], "", ttl)

    def _issue_fresh(
        self,
        san: x509.SubjectAlternativeName,
        usages: list[x509.ObjectIdentifier],
        identity: str,
        ttl: timedelta,
    ) -> IssuedCert:
        """A random key and serial, valid from now for ``ttl``."""
        _check_lifetime(ttl)
        now = self._clock()
        return self._issue(
            san,
            usages,
            identity,
            key=ec.generate_private_key(ec.SECP256R1()),
            serial=x509.random_serial_number(),
            not_before=now - CLOCK_SKEW,
            not_after=now + ttl,
        )

    def _issue(
        self,
        san: x509.SubjectAlternativeName,
        usages: list[x509.ObjectIdentifier],
        identity: str,
        *,
        key: ec.EllipticCurvePrivateKey,
        serial: int,
        not_before: datetime,
        not_after: datetime,
    ) -> IssuedCert:
        """Sign a leaf. Nothing here is random: equal arguments give equal bytes."""
        # A certificate never outlives the one that signed it.
        not_after = min(not_after, self._cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(self._aki, critical=False)
            # An empty subject makes the SAN the only name, so it must be critical.
            .add_extension(san, critical=True)
            .sign(
                self._key,
                self._sign_hash,
                # RFC 6979: the nonce comes from the key and the message, not from a RNG.
                ecdsa_deterministic=True
                if isinstance(self._key, ec.EllipticCurvePrivateKey)
                else None,
            )
        )
        cert_pem = _pem(cert)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return IssuedCert(
            cert_pem=cert_pem,
            key_pem=key_pem,
            chain_pem=cert_pem + self._chain_tail_pem,
            serial=serial,
            not_before=not_before.replace(microsecond=0),
            not_after=not_after.replace(microsecond=0),
            spiffe_id=identity,
        )

    # ------------------------------------------------------------------ verifying

    def verify_client(
        self,
        chain: bytes | str | Sequence[bytes],
        *,
        trust_domain: str | None = None,
        now: datetime | None = None,
    ) -> str:
        """The SPIFFE ID of a peer's certificate chain (leaf first), or an :class:`MtlsError`.

        :class:`UntrustedCertificate` unless it chains to our roots (with the intermediates
        it sent or ours); :class:`ExpiredCertificate` if it is trusted but outside its
        validity window; :class:`BadIdentity` unless it has exactly one URI SAN, a SPIFFE
        ID (in ``trust_domain`` when given).
        """
        certs = _parse_chain(chain)
        leaf, sent = certs[0], certs[1:]
        intermediates = [*sent, *(c for c in self._intermediates if c not in sent)]
        at = now or self._clock()
        try:
            self._verifier(at).verify(leaf, intermediates)
        except VerificationError as exc:
            start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
            if not start <= at <= end and self._trusted_at(
                leaf, intermediates, start + (end - start) / 2
            ):
                raise ExpiredCertificate(
                    f"certificate {leaf.serial_number:x} is valid from {start} to {end}, "
                    f"not at {at}"
                ) from None
            raise UntrustedCertificate(f"certificate is not trusted: {exc}") from None
        return self._identity(leaf, trust_domain)

    def _verifier(self, at: datetime) -> x509.verification.ClientVerifier:
        return (
            PolicyBuilder()
            .store(Store(list(self._roots)))
            .time(at)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_LEAF_POLICY)
            .build_client_verifier()
        )

    def _trusted_at(
        self, leaf: x509.Certificate, intermediates: list[x509.Certificate], at: datetime
    ) -> bool:
        try:
            self._verifier(at).verify(leaf, intermediates)
        except VerificationError:
            return False
        return True

    @staticmethod
    def _identity(leaf: x509.Certificate, trust_domain: str | None) -> str:
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise BadIdentity("certificate has no subjectAltName, so no SPIFFE ID") from None
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise BadIdentity(f"certificate has {len(uris)} URI SANs; exactly one is required")
        parsed = parse_spiffe_id(uris[0])
        if trust_domain is not None and parsed.trust_domain != trust_domain:
            raise BadIdentity(
                f"{parsed.uri} is in trust domain {parsed.trust_domain!r}, not {trust_domain!r}"
            )
        return parsed.uri


#: RFC 5280 / Web PKI checks, except that a leaf without a SAN is let through to the
#: identity check, which then names the problem (BadIdentity, not UntrustedCertificate).
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca()
_LEAF_POLICY = ExtensionPolicy.webpki_defaults_ee().may_be_present(
    x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
)

_WORKLOAD_USAGES = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def _check_lifetime(ttl: timedelta) -> None:
    if ttl <= timedelta(0):
        raise MtlsError(f"certificate lifetime must be positive, not {ttl}")


def _workload_san(identity: str) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)])


_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if absent), held for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, rename it over."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed or the file existed
        with os.fdopen(fd, "wb", closefd=False) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
