"""The workload secrets served to proxies, one certificate per identity, and their renewal.

:class:`SecretStore` holds the ``default`` and ``ROOTCA`` SDS secrets per workload
identity, one certificate per renewal period (:mod:`mtls.rotation`: the same bytes in every
replica and after a restart). A renewal calls ``on_change``, which the control plane wires
to its debouncer: a new generation in which only the secrets differ, so the proxies of
other identities are sent nothing. :meth:`SecretStore.rotate_all` raises the key epoch
(:mod:`mtls.epoch`) and re-issues every certificate under it; the other replicas read the
new epoch and follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Collection
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from mtls.ca import DEFAULT_WORKLOAD_TTL, CertificateAuthority, utcnow
from mtls.epoch import EpochError, EpochStore
from mtls.identity import DEFAULT_TRUST_DOMAIN, Identity
from mtls.rotation import WorkloadCertificates
from mtls.sds import secrets_for

log = logging.getLogger(__name__)

#: Seconds between reads of the stored key epoch: how long the other replicas keep serving
#: the old keys after one of them rotated every key. One small read per replica each time.
EPOCH_POLL_S = 10.0


@dataclass(frozen=True)
class SecretBundle:
    """One identity's SDS secrets, built once per certificate."""

    identity: Identity
    serial: int
    not_after: datetime
    secrets: tuple[secret_pb2.Secret, ...]


class SecretStore:
    """The workload secrets served to proxies, and their renewal.

    A certificate is issued the first time a generation asks for an identity
    (:meth:`bundle`) and renewed only by :meth:`run` and :meth:`rotate_all`, so every
    proxy of one generation sees the same certificate. Identities no connected proxy uses
    are dropped at the next renewal instead of being renewed. ``executor``: where renewal
    passes run (None: on the event loop). ``epochs``: where the replicas keep the key
    epoch (None: this process alone); ``epoch``: the one stored when the store is made.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        executor: Executor | None = None,
        epochs: EpochStore | None = None,
        epoch: int = 0,
        epoch_poll_s: float = EPOCH_POLL_S,
    ) -> None:
        self.ca = ca
        self.trust_domain = trust_domain
        self.ttl = ttl
        self.executor = executor
        self.epochs = epochs
        self.epoch_poll_s = epoch_poll_s
        self._certs = WorkloadCertificates(ca, trust_domain, ttl=ttl, epoch=epoch)
        self._bundles: dict[Identity, SecretBundle] = {}
        #: Held while the store changes, signing included (so that two threads asking for
        #: one new identity get one certificate).
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        #: The loop :meth:`run` runs on, woken from whichever thread issued a certificate.
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Called when secrets changed outside a generation (renewals, rotate_all).
        self.on_change: Callable[[], None] = lambda: None
        self.issued = 0
        self.renewed = 0
        self._epoch_unreadable = False

    @property
    def trust_bundle_pem(self) -> bytes:
        return self.ca.trust_bundle_pem

    @property
    def epoch(self) -> int:
        """The key epoch the certificates are derived under."""
        return self._certs.epoch

    @property
    def min_renewal_interval(self) -> float:
        """Seconds between renewal passes at the least, so no schedule can spin."""
        return max(0.05, min(1.0, self.ttl.total_seconds() / 20))

    def bundle(self, identity: Identity) -> SecretBundle:
        """The identity's secrets; a certificate is issued if it has none yet.

        Raises :class:`mtls.ca.BadIdentity` for names that cannot form a SPIFFE ID. Signs
        when the identity has no certificate: call it off the event loop.
        """
        found = self._bundles.get(identity)
        if found is not None:
            return found
        with self._lock:
            found = self._bundles.get(identity)
            if found is not None:
                return found
            found = self._refresh(identity)
        if self._loop is not None:
            # A new certificate, maybe due before any other: run() sleeps on the loop.
            self._loop.call_soon_threadsafe(self._wake.set)
        return found

    def _refresh(self, identity: Identity) -> SecretBundle:
        """Issue (if due) and record the identity's secrets; the lock is held."""
        issued = self._certs.current(*identity)
        bundle = SecretBundle(
            identity=identity,
            serial=issued.serial,
            not_after=issued.not_after,
            secrets=tuple(secrets_for(issued, self.trust_bundle_pem)),
        )
        self._bundles[identity] = bundle
        self.issued += 1
        return bundle

    def identities(self) -> list[Identity]:
        return sorted(list(self._bundles))

    def describe(self) -> dict[str, Any]:
        """The CA's root and each served identity's certificate (never a key), as data."""
        return {
            "trust_domain": self.trust_domain,
            "root_sha256": self.ca.root_fingerprint,
            "key_epoch": self.epoch,
            "issued": self.issued,
            "renewed": self.renewed,
            "identities": [
                {
                    "identity": str(identity),
                    "serial": f"{bundle.serial:x}",
                    "not_after": bundle.not_after.isoformat(),
                }
                for identity, bundle in sorted(list(self._bundles.items()))
            ],
        }

    def rekey(self, epoch: int) -> list[Identity]:
        """Move to key epoch ``epoch`` (epochs only rise) and re-issue every certificate the
        store serves under it; the identities whose secrets changed.

        Signs: call it off the event loop (:meth:`rotate_all` does).
        """
        with self._lock:
            renewed = self._certs.rekey(epoch)
            for identity in renewed:
                self._refresh(identity)
            self.renewed += len(renewed)
        return renewed

    def renew_due(self, in_use: Collection[Identity] | None = None) -> list[Identity]:
        """Renew the certificates that are due; drop those of identities not in use.

        Signs: call it off the event loop (:meth:`run` does). Neither this nor
        :meth:`renew` calls ``on_change``, which belongs to the event loop.
        """
        with self._lock:
            if in_use is not None:
                for identity in [i for i in self._bundles if i not in in_use]:
                    self._certs.forget(*identity)
                    del self._bundles[identity]
            renewed = [i for i in self._certs.renew_due() if i in self._bundles]
            for identity in renewed:
                self._refresh(identity)
            self.renewed += len(renewed)
        return renewed

    async def _renewal_pass(self, renew: Callable[[], list[Identity]]) -> list[Identity]:
        """One pass on the executor (or inline without one), then ``on_change`` here."""
        if self.executor is None:
            renewed = renew()
        else:
            renewed = await asyncio.get_running_loop().run_in_executor(self.executor, renew)
        if renewed:
            self.on_change()
        return renewed

    async def rotate_all(self) -> int:
        """Give every identity a new key now (after a suspected key compromise): raise the
        key epoch where the replicas keep it, then re-issue every certificate under it in
        one renewal pass off the event loop; how many were replaced. Proxies get the new
        ones with the next generation, and the other replicas follow within
        ``epoch_poll_s``."""
        epoch = self.epoch + 1
        if self.epochs is not None:
            try:
                epoch = await self.epochs.advance(self.epoch)
            except EpochError as exc:
                log.error(
                    "%s: key epoch %d is this process's alone; the other replicas, and this "
                    "one after a restart, derive the keys of epoch %d again until it is stored",
                    exc,
                    epoch,
                    self.epoch,
                )
        return len(await self._renewal_pass(functools.partial(self.rekey, epoch)))

    async def follow_epoch(self) -> int:
        """Read the stored key epoch and move to it if another replica raised it; how many
        certificates were replaced. A failed read is logged and changes nothing."""
        if self.epochs is None:
            return 0
        try:
            stored = await self.epochs.read()
        except EpochError as exc:
            # Once per outage, not every poll; the next poll tries again.
            level = logging.DEBUG if self._epoch_unreadable else logging.WARNING
            log.log(level, "%s; keeping key epoch %d", exc, self.epoch)
            self._epoch_unreadable = True
            return 0
        self._epoch_unreadable = False
        if stored <= self.epoch:
            return 0
        log.warning(
            "key epoch %d in %s (another replica rotated every key): replacing every "
            "workload certificate",
            stored,
            self.epochs.where,
        )
        return len(await self._renewal_pass(functools.partial(self.rekey, stored)))

    async def run(self, in_use: Callable[[], Collection[Identity]]) -> None:
        """Renew certificates as they fall due, and follow the stored key epoch, until
        cancelled."""
        loop = self._loop = asyncio.get_running_loop()
        next_poll = loop.time() + self.epoch_poll_s
        try:
            while True:
                self._wake.clear()
                due = self._certs.next_renewal()
                waits = []
                if due is not None:
                    waits.append(max(self.min_renewal_interval, (due - utcnow()).total_seconds()))
                if self.epochs is not None:
                    waits.append(max(0.0, next_poll - loop.time()))
                # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow a
                # cancellation that arrives as the event is set, and the task would never end.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(waits, default=None)):
                        await self._wake.wait()
                if self.epochs is not None and loop.time() >= next_poll:
                    next_poll = loop.time() + self.epoch_poll_s
                    await self.follow_epoch()
                due = self._certs.next_renewal()
                if due is None or due > utcnow():
                    continue
                # in_use() reads the connections: here, on the loop.
                await self._renewal_pass(functools.partial(self.renew_due, in_use()))
        finally:
            self._loop = None
