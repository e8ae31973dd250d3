"""The workload secrets served to proxies, one certificate per identity, and their renewal.

:class:`SecretStore` holds the ``default`` and ``ROOTCA`` SDS secrets per workload
identity, renewed at half life with jitter. A renewal calls ``on_change``, which the
control plane wires to its debouncer: a new generation in which only the secrets differ,
so the proxies of other identities are sent nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Callable, Collection
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from mtls.ca import DEFAULT_WORKLOAD_TTL, CertificateAuthority, utcnow
from mtls.identity import DEFAULT_TRUST_DOMAIN, Identity
from mtls.rotation import WorkloadCertificates
from mtls.sds import secrets_for


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
    (:meth:`bundle`) and renewed only by :meth:`run`, so every proxy of one generation
    sees the same certificate. Identities no connected proxy uses are dropped at the next
    renewal instead of being renewed. ``executor``: where renewal passes run (None: on
    the event loop).
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        rng: random.Random | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.ca = ca
        self.trust_domain = trust_domain
        self.ttl = ttl
        self.executor = executor
        self._certs = WorkloadCertificates(ca, trust_domain, ttl=ttl, rng=rng)
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

    @property
    def trust_bundle_pem(self) -> bytes:
        return self.ca.trust_bundle_pem

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

    def renew(self, identities: Collection[Identity]) -> list[Identity]:
        """Re-issue the certificates of ``identities`` now (those the store serves).

        Signs: call it off the event loop (:meth:`rotate_all` does).
        """
        with self._lock:
            renewed = [i for i in identities if i in self._bundles]
            for identity in renewed:
                self._certs.forget(*identity)
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

    async def _renewal_pass(
        self, renew: Callable[[Collection[Identity]], list[Identity]], which: Collection[Identity]
    ) -> list[Identity]:
        """One pass on the executor (or inline without one), then ``on_change`` here."""
        if self.executor is None:
            renewed = renew(which)
        else:
            renewed = await asyncio.get_running_loop().run_in_executor(self.executor, renew, which)
        if renewed:
            self.on_change()
        return renewed

    async def rotate_all(self) -> int:
        """Replace every certificate now, in one renewal pass off the event loop; how many
        were replaced. Proxies get the new ones with the next generation."""
        return len(await self._renewal_pass(self.renew, self.identities()))

    async def run(self, in_use: Callable[[], Collection[Identity]]) -> None:
        """Renew certificates as they fall due, until cancelled."""
        self._loop = asyncio.get_running_loop()
        try:
            while True:
                self._wake.clear()
                due = self._certs.next_renewal()
                timeout = None
                if due is not None:
                    timeout = max(self.min_renewal_interval, (due - utcnow()).total_seconds())
                # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow a
                # cancellation that arrives as the event is set, and the task would never end.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                due = self._certs.next_renewal()
                if due is None or due > utcnow():
                    continue
                # in_use() reads the connections: here, on the loop.
                await self._renewal_pass(self.renew_due, in_use())
        finally:
            self._loop = None
