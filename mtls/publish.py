"""The mesh's root certificate, published where sidecars mount it, as Istio publishes its own.

:class:`RootCertPublisher` keeps a ConfigMap ``inferlane-ca-root-cert`` (key
``root-cert.pem``) in every namespace that has inferlane-enabled workloads: an enabled
Service, or a pod with inferlane's sidecar (a pod that is still starting counts, so its
sidecar's volume appears while the kubelet waits for it). ``inferlane inject`` mounts it,
and the sidecar checks the control plane's TLS certificate against it, so manifests carry
no CA file.

The calls are few and narrow: ``get`` and ``update`` of that one name, and ``create``
(RBAC cannot limit a create to a name). A namespace is read when it first appears and at
each resync (every :data:`RESYNC_S`), so a deleted or edited ConfigMap comes back.

Several replicas must not fight. Every write is conditional: a create loses to an
existing object (409), and an update carries the resourceVersion read (409 when another
replica wrote in between); the loser re-reads on its next pass. And a replica overwrites
a ConfigMap only when its own bundle ranks higher (:func:`bundle_rank`: newest root
first), so during a CA rotation, when replicas briefly hold different bundles, the newest
wins and the others leave it alone instead of writing back and forth. Namespaces that no
longer have workloads keep their ConfigMap (Istio does the same): deleting it could
strand a pod that is still starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Final, Protocol

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from kubernetes.aio.client import ApiException, V1ConfigMap, V1ObjectMeta

from mesh.model import World

log = logging.getLogger(__name__)

CONFIGMAP_NAME: Final = "inferlane-ca-root-cert"
ROOT_CERT_KEY: Final = "root-cert.pem"
LABELS: Final[Mapping[str, str]] = {"app.kubernetes.io/managed-by": "inferlane"}
#: Seconds between full passes over every namespace: repairs edits and deletions.
RESYNC_S: Final = 300.0
HTTP_FORBIDDEN: Final = 403
HTTP_NOT_FOUND: Final = 404
HTTP_CONFLICT: Final = 409

_TRANSIENT = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


class ConfigMapsApi(Protocol):
    """The calls used, as ``kubernetes.aio.client.CoreV1Api`` provides them."""

    async def read_namespaced_config_map(self, name: str, namespace: str) -> Any: ...

    async def create_namespaced_config_map(self, namespace: str, body: Any) -> Any: ...

    async def replace_namespaced_config_map(self, name: str, namespace: str, body: Any) -> Any: ...


def mesh_namespaces(world: World) -> frozenset[str]:
    """Namespaces with an enabled Service or a pod that runs inferlane's sidecar."""
    found = {svc.namespace for svc in world.services}
    found.update(w.namespace for w in world.workloads.values() if w.sidecar)
    return frozenset(found)


def bundle_rank(pem: str) -> tuple[datetime, tuple[str, ...]] | None:
    """How bundles are ordered: by their newest certificate's notBefore, then by their
    certificates' fingerprints (any fixed tie-break does). None if it holds no PEM."""
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        return None
    newest = max(c.not_valid_before_utc for c in certs)
    return newest, tuple(sorted(c.fingerprint(hashes.SHA256()).hex() for c in certs))


class _Conflict(Exception):
    """Another replica wrote between our read and our write: read again."""


class RootCertPublisher:
    """Keeps the root ConfigMap in every mesh namespace; run :meth:`run` as a task."""

    def __init__(
        self,
        api: ConfigMapsApi,
        bundle: Callable[[], bytes],
        *,
        resync_s: float = RESYNC_S,
    ) -> None:
        self.api = api
        self.bundle = bundle
        self.resync_s = resync_s
        self.namespaces: frozenset[str] = frozenset()
        #: Namespaces whose ConfigMap is known to hold our bundle (or a newer one).
        self._current: set[str] = set()
        self._wake = asyncio.Event()
        self._warned: set[tuple[str, int]] = set()
        self.writes = 0

    def set_world(self, world: World) -> None:
        """Publish to the world's mesh namespaces; new ones are done at once."""
        self.namespaces = mesh_namespaces(world)
        if not self.namespaces <= self._current:
            self._wake.set()

    def root_changed(self) -> None:
        """The bundle changed: check every namespace now."""
        self._current.clear()
        self._wake.set()

    async def run(self) -> None:
        """Reconcile new namespaces when they appear and all of them every resync."""
        loop = asyncio.get_running_loop()
        next_resync = loop.time()
        while True:
            if loop.time() >= next_resync:
                self._current.clear()
                next_resync = loop.time() + self.resync_s
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception:  # never take the control plane down; the next pass retries
                log.exception("publishing %s failed", CONFIGMAP_NAME)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_resync - loop.time())):
                    await self._wake.wait()

    async def reconcile(self) -> int:
        """One pass over the namespaces not known to be current; returns the writes made."""
        pem = self.bundle().decode("ascii")
        writes = 0
        for namespace in sorted(self.namespaces - self._current):
            try:
                if await self._ensure(namespace, pem):
                    writes += 1
                self._current.add(namespace)
            except _Conflict:
                self._wake.set()  # read it again on the next pass
            except ApiException as exc:
                self._warn(namespace, exc.status, f"{exc.status} {exc.reason}")
            except _TRANSIENT as exc:
                self._warn(namespace, 0, str(exc) or type(exc).__name__)
        self.writes += writes
        return writes

    async def _ensure(self, namespace: str, pem: str) -> bool:
        """Make the namespace's ConfigMap hold ``pem`` unless it holds a newer bundle; True
        if this call wrote. A lost race (409) is left for the next pass to re-read."""
        try:
            existing = await self.api.read_namespaced_config_map(CONFIGMAP_NAME, namespace)
        except ApiException as exc:
            if exc.status != HTTP_NOT_FOUND:
                raise
            return await self._write(namespace, pem, None)
        current = (existing.data or {}).get(ROOT_CERT_KEY, "")
        if current == pem:
            return False
        ours, theirs = bundle_rank(pem), bundle_rank(current)
        if theirs is not None and ours is not None and theirs > ours:
            log.debug("ConfigMap %s/%s holds a newer root; kept", namespace, CONFIGMAP_NAME)
            return False
        return await self._write(namespace, pem, existing.metadata.resource_version)

    async def _write(self, namespace: str, pem: str, resource_version: str | None) -> bool:
        body = V1ConfigMap(
            api_version="v1",
            kind="ConfigMap",
            metadata=V1ObjectMeta(
                name=CONFIGMAP_NAME,
                namespace=namespace,
                labels=dict(LABELS),
                resource_version=resource_version,
            ),
            data={ROOT_CERT_KEY: pem},
        )
        try:
            if resource_version is None:
                await self.api.create_namespaced_config_map(namespace, body)
            else:
                await self.api.replace_namespaced_config_map(CONFIGMAP_NAME, namespace, body)
        except ApiException as exc:
            if exc.status == HTTP_CONFLICT:
                log.info("ConfigMap %s/%s: another replica wrote first", namespace, CONFIGMAP_NAME)
                raise _Conflict() from None
            raise
        verb = "updated" if resource_version else "created"
        log.info("%s ConfigMap %s/%s", verb, namespace, CONFIGMAP_NAME)
        return True

    def _warn(self, namespace: str, status: int, message: str) -> None:
        """Log a failure once per namespace and status; the next pass tries again."""
        if (namespace, status) in self._warned:
            return
        self._warned.add((namespace, status))
        hint = ""
        if status == HTTP_FORBIDDEN:
            hint = " (its RBAC must allow get, create and update of this ConfigMap)"
        log.warning(
            "cannot publish %s in namespace %s: %s%s", CONFIGMAP_NAME, namespace, message, hint
        )
