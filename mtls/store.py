"""Where the mesh CA comes from: a Kubernetes Secret every replica shares, a directory, or
memory (:func:`load_ca`).

The Secret has cert-manager's form (type ``kubernetes.io/tls``: ``tls.crt``, ``tls.key``,
``ca.crt``), so it can equally be one that cert-manager issues: a root or an intermediate.

Creating the Secret is the only write, and it settles races: every replica first reads
the Secret; a replica that finds none generates a CA and tries to create it; the API
server accepts exactly one create, and a replica that gets 409 Conflict reads the
winner's CA instead of its own. An existing Secret is never overwritten, even when it
cannot be used.

With ``--ca-dir`` the CA is created in that directory on first start and kept across
restarts; with neither, it lives only as long as the process.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
from kubernetes.aio.client import ApiException, V1ObjectMeta, V1Secret

from mtls.ca import CaLoadError, CertificateAuthority, Clock, MtlsError, utcnow

log = logging.getLogger(__name__)

SECRET_TYPE = "kubernetes.io/tls"
#: Labels put on a Secret this module creates.
SECRET_LABELS: Mapping[str, str] = {"app.kubernetes.io/managed-by": "inferlane"}
HTTP_NOT_FOUND = 404
HTTP_CONFLICT = 409
#: Where a Pod finds its own namespace (for a ``--ca-secret`` given without one).
SERVICE_ACCOUNT_NAMESPACE_FILE: Final = Path(
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
)


class CaStoreError(MtlsError):
    """The CA Secret could not be read or created (permissions, API errors, races)."""


class SecretsApi(Protocol):
    """The two calls used, as ``kubernetes.aio.client.CoreV1Api`` provides them."""

    async def read_namespaced_secret(self, name: str, namespace: str) -> Any: ...

    async def create_namespaced_secret(self, namespace: str, body: Any) -> Any: ...


def decode_secret_data(data: Mapping[str, Any] | None) -> dict[str, bytes]:
    """A Secret's ``data`` as raw bytes: values on the wire are base64 strings."""
    decoded: dict[str, bytes] = {}
    for key, value in (data or {}).items():
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if b"-----BEGIN" in raw:  # already decoded by the client
            decoded[key] = raw
            continue
        try:
            decoded[key] = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise CaLoadError(f"Secret data {key!r} is not base64") from None
    return decoded


def encode_secret_data(data: Mapping[str, bytes]) -> dict[str, bytes | str]:
    return {key: base64.b64encode(value).decode("ascii") for key, value in data.items()}


def ca_secret_body(ca: CertificateAuthority, namespace: str, name: str) -> V1Secret:
    return V1Secret(
        api_version="v1",
        kind="Secret",
        type=SECRET_TYPE,
        metadata=V1ObjectMeta(name=name, namespace=namespace, labels=dict(SECRET_LABELS)),
        data=encode_secret_data(ca.secret_data()),
    )


async def _read(api: SecretsApi, namespace: str, name: str) -> Any | None:
    try:
        return await api.read_namespaced_secret(name=name, namespace=namespace)
    except ApiException as exc:
        if exc.status == HTTP_NOT_FOUND:
            return None
        raise CaStoreError(
            f"reading Secret {namespace}/{name}: {exc.status} {exc.reason}"
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise CaStoreError(f"reading Secret {namespace}/{name}: {exc}") from None


async def _create(api: SecretsApi, namespace: str, name: str, ca: CertificateAuthority) -> bool:
    """True if ours was created; False if another replica's already exists."""
    try:
        await api.create_namespaced_secret(
            namespace=namespace, body=ca_secret_body(ca, namespace, name)
        )
    except ApiException as exc:
        if exc.status == HTTP_CONFLICT:
            return False
        raise CaStoreError(
            f"creating Secret {namespace}/{name}: {exc.status} {exc.reason}"
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise CaStoreError(f"creating Secret {namespace}/{name}: {exc}") from None
    return True


async def load_or_create_shared_ca(
    api: SecretsApi,
    namespace: str,
    name: str,
    *,
    clock: Clock = utcnow,
    generate: Callable[[], CertificateAuthority] | None = None,
    attempts: int = 3,
) -> CertificateAuthority:
    """The CA in Secret ``namespace/name``, creating it if there is none.

    Raises :class:`CaLoadError` if the Secret exists but holds no usable CA (it is left
    as it is), and :class:`CaStoreError` if the API refuses or the Secret keeps
    disappearing between a lost create race and the read that follows.
    """
    make = generate or (lambda: CertificateAuthority.generate(clock=clock))
    for _ in range(attempts):
        secret = await _read(api, namespace, name)
        if secret is not None:
            try:
                ca = CertificateAuthority.from_secret_data(
                    decode_secret_data(secret.data), clock=clock
                )
            except CaLoadError as exc:
                raise CaLoadError(f"Secret {namespace}/{name}: {exc}") from None
            log.info("using the CA in Secret %s/%s (%s)", namespace, name, ca.root_fingerprint)
            return ca
        ca = make()
        if await _create(api, namespace, name, ca):
            log.info("created the CA Secret %s/%s (%s)", namespace, name, ca.root_fingerprint)
            return ca
        log.info("another replica created Secret %s/%s first; reading it", namespace, name)
    raise CaStoreError(f"Secret {namespace}/{name} was neither readable nor creatable")


def parse_secret_ref(text: str, default_namespace: str) -> tuple[str, str] | str:
    """``[NAMESPACE/]NAME`` -> (namespace, name), or what is wrong."""
    namespace, slash, name = text.strip().rpartition("/")
    if not slash:
        namespace = default_namespace
    if not name or not namespace or "/" in namespace:
        return f"{text!r} is not NAME or NAMESPACE/NAME"
    return namespace, name


def own_namespace() -> str:
    """The namespace this process runs in: ``POD_NAMESPACE``, the service-account
    namespace file, or ``default``."""
    from_env = os.environ.get("POD_NAMESPACE", "").strip()
    if from_env:
        return from_env
    try:
        return SERVICE_ACCOUNT_NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


def ca_secret_ref(ca_secret: str) -> tuple[str, str]:
    """``--ca-secret [NAMESPACE/]NAME`` -> (namespace, name), this process's namespace by
    default; :class:`CaLoadError` if malformed."""
    ref = parse_secret_ref(ca_secret, own_namespace())
    if isinstance(ref, str):
        raise CaLoadError(f"--ca-secret: {ref}")
    return ref


async def load_ca(
    *,
    ca_secret: str | None = None,
    ca_dir: Path | None = None,
    secrets_api: SecretsApi | None = None,
) -> CertificateAuthority:
    """The mesh CA: from ``--ca-secret``, else ``--ca-dir``, else a new in-memory one.

    Raises :class:`mtls.ca.MtlsError` (a CA that cannot be loaded or stored) with a
    message naming the input.
    """
    if ca_secret:
        if secrets_api is None:
            raise CaLoadError("--ca-secret needs the Kubernetes API")
        return await load_or_create_shared_ca(secrets_api, *ca_secret_ref(ca_secret))
    if ca_dir is not None:
        return await asyncio.to_thread(CertificateAuthority.load_or_create, ca_dir)
    log.warning(
        "no --ca-dir or --ca-secret: the mesh CA lives only as long as this process, and "
        "proxies must be given the new root after a restart"
    )
    return CertificateAuthority.generate()
