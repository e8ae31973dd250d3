"""The key epoch: which generation of derived workload keys every replica serves.

Workload keys derive from the CA's key, the identity, the renewal period and the key
epoch (:mod:`mtls.rotation`), so a restarted control plane, or another replica, derives
the keys the proxies already hold. After a suspected key compromise (``kill -USR1``) that
must not happen: the control plane raises the epoch, and keeps it next to the CA, where
every replica and every later start reads it:

* ``--ca-dir DIR``: the file ``DIR/key-epoch``, changed under the directory's lock;
* ``--ca-secret NS/NAME``: the ConfigMap ``NS/NAME-key-epoch`` (key ``epoch``), created
  if absent and replaced with the resourceVersion read, so racing replicas settle;
* neither: no store; the CA itself lives only as long as the process.

The epoch only rises. Raising it means "past the epoch I served" (:meth:`EpochStore.
advance` stores the larger of what is stored and that), so replicas that are signalled
together raise it once; a replica that reads a higher epoch than its own adopts it
(:meth:`mtls.secrets.SecretStore.run` polls). It is not a secret: without the CA's key it
derives nothing. Whoever may write it can force a rotation, or, by lowering it, make
restarted replicas derive an earlier epoch's keys again; it lives where the CA does and
should be guarded like it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Final, Protocol

import aiohttp
from kubernetes.aio.client import ApiException, V1ConfigMap, V1ObjectMeta

from mtls.ca import LOCK_FILE, CaLoadError, MtlsError, fsync_dir, locked, write_atomic
from mtls.publish import HTTP_CONFLICT, HTTP_FORBIDDEN, HTTP_NOT_FOUND, LABELS, ConfigMapsApi
from mtls.store import ca_secret_ref

log = logging.getLogger(__name__)

#: The file under ``--ca-dir``.
EPOCH_FILE: Final = "key-epoch"
#: The ConfigMap next to ``--ca-secret NAME`` is ``NAME`` + this; its data key.
CONFIGMAP_SUFFIX: Final = "-key-epoch"
EPOCH_KEY: Final = "epoch"
#: Writes tried when other replicas keep writing in between (409 Conflict).
WRITE_ATTEMPTS: Final = 5
#: Longest epoch accepted, in digits: far beyond any count of rotations.
_MAX_DIGITS = 18


class EpochError(MtlsError):
    """The key epoch could not be read or stored."""


class EpochStore(Protocol):
    """Where the replicas keep the key epoch."""

    #: Where it is kept, for logs and errors.
    where: str

    async def read(self) -> int:
        """The stored epoch; 0 if none was ever stored. Raises :class:`EpochError`."""
        ...

    async def advance(self, past: int) -> int:
        """Store an epoch greater than ``past`` (unless a greater one is already stored);
        the epoch stored now. Raises :class:`EpochError`."""
        ...


def parse_epoch(text: str, where: str) -> int:
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > _MAX_DIGITS:
        raise EpochError(
            f"{where} holds {text[:40]!r}, not a key epoch (a whole number); restore the "
            "value it had, or a greater one"
        )
    return int(value)


class DirectoryEpoch:
    """``DIR/key-epoch``, next to the CA's files."""

    def __init__(self, ca_dir: Path) -> None:
        self.directory = ca_dir
        self.path = ca_dir / EPOCH_FILE
        self.where = str(self.path)

    async def read(self) -> int:
        return await asyncio.to_thread(self._read)

    async def advance(self, past: int) -> int:
        return await asyncio.to_thread(self._advance, past)

    def _read(self) -> int:
        try:
            text = self.path.read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise EpochError(f"reading {self.where}: {exc}") from None
        return parse_epoch(text, self.where)

    def _advance(self, past: int) -> int:
        try:
            with locked(self.directory / LOCK_FILE):
                stored = self._read()
                if stored > past:
                    return stored
                write_atomic(self.path, f"{past + 1}\n".encode(), mode=0o644)
                fsync_dir(self.directory)
        except OSError as exc:
            raise EpochError(f"writing {self.where}: {exc}") from None
        return past + 1


class ConfigMapEpoch:
    """A ConfigMap next to the CA Secret: ``data.epoch``."""

    def __init__(self, api: ConfigMapsApi, namespace: str, name: str) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.where = f"ConfigMap {namespace}/{name}"

    async def read(self) -> int:
        return (await self._get())[0]

    async def advance(self, past: int) -> int:
        for _ in range(WRITE_ATTEMPTS):
            stored, version = await self._get()
            if stored > past:
                return stored
            if await self._write(past + 1, version):
                return past + 1
            log.info("%s: another replica wrote first; reading it again", self.where)
        raise EpochError(f"{self.where} kept changing: {WRITE_ATTEMPTS} writes lost races")

    async def _get(self) -> tuple[int, str | None]:
        """(the stored epoch, the resourceVersion read); (0, None) when there is none."""
        try:
            found = await self.api.read_namespaced_config_map(self.name, self.namespace)
        except ApiException as exc:
            if exc.status == HTTP_NOT_FOUND:
                return 0, None
            raise self._api_error("reading", exc) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise EpochError(f"reading {self.where}: {exc}") from None
        epoch = parse_epoch((found.data or {}).get(EPOCH_KEY, "0"), self.where)
        return epoch, found.metadata.resource_version

    async def _write(self, epoch: int, version: str | None) -> bool:
        """Create (``version`` None) or replace the ConfigMap; False if another replica
        wrote first (409 Conflict)."""
        body = V1ConfigMap(
            api_version="v1",
            kind="ConfigMap",
            metadata=V1ObjectMeta(
                name=self.name,
                namespace=self.namespace,
                labels=dict(LABELS),
                resource_version=version,
            ),
            data={EPOCH_KEY: str(epoch)},
        )
        try:
            if version is None:
                await self.api.create_namespaced_config_map(self.namespace, body)
            else:
                await self.api.replace_namespaced_config_map(self.name, self.namespace, body)
        except ApiException as exc:
            if exc.status == HTTP_CONFLICT:
                return False
            raise self._api_error("writing", exc) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise EpochError(f"writing {self.where}: {exc}") from None
        return True

    def _api_error(self, doing: str, exc: ApiException) -> EpochError:
        hint = ""
        if exc.status == HTTP_FORBIDDEN:
            hint = " (the control plane's Role must allow get and update of this ConfigMap)"
        return EpochError(f"{doing} {self.where}: {exc.status} {exc.reason}{hint}")


def epoch_store(
    *,
    ca_secret: str | None = None,
    ca_dir: Path | None = None,
    configmaps: ConfigMapsApi | None = None,
) -> EpochStore | None:
    """Where the key epoch is kept for this CA (as :func:`mtls.store.load_ca` chooses the
    CA: ``--ca-secret``, else ``--ca-dir``); None for an in-memory CA."""
    if ca_secret:
        if configmaps is None:
            raise CaLoadError("--ca-secret needs the Kubernetes API")
        namespace, name = ca_secret_ref(ca_secret)
        return ConfigMapEpoch(configmaps, namespace, name + CONFIGMAP_SUFFIX)
    if ca_dir is not None:
        return DirectoryEpoch(Path(ca_dir))
    return None
