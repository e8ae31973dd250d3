"""Workload certificates per identity: one per renewal period, the same in every process.

One certificate per ``(namespace, service account)``: every proxy of that identity gets
the same one, so a thousand replicas of one Deployment cost one signature per renewal.

Time is cut into **renewal periods** of half the lifetime, aligned to the wall clock and
shifted per identity by an offset derived from its SPIFFE ID (:func:`renewal_period`), so
identities are renewed at different times, spread evenly over a period. An identity's
certificate for a period lives from the period's start for the whole lifetime
(:meth:`mtls.ca.CertificateAuthority.derive_workload`), so it is replaced at half its
life, when the next period begins. Its key, serial and signature derive from the CA's key,
the identity, the period and the key epoch: every replica, before and after a restart,
serves the same bytes, and a proxy that reconnects, to this process or another, already
holds them. A new key epoch (:meth:`WorkloadCertificates.rekey`, after a suspected key
compromise) gives every identity a new key at once.

No I/O and no timers here: the xDS layer asks for :meth:`WorkloadCertificates.current`
when a proxy subscribes, sleeps until :meth:`WorkloadCertificates.next_renewal`, calls
:meth:`WorkloadCertificates.renew_due` and pushes the new secrets to the proxies of the
identities it returns. Changes are made by one thread at a time (:class:`mtls.secrets.
SecretStore` holds its lock around them); :meth:`WorkloadCertificates.next_renewal` reads a
copy, so the event loop may call it while another thread issues.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from mtls.ca import (
    DEFAULT_WORKLOAD_TTL,
    CertificateAuthority,
    Clock,
    IssuedCert,
    from_unix_micros,
    spiffe_id,
    unix_micros,
    utcnow,
)
from mtls.identity import Identity
from mtls.sds import secrets_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Period:
    """One identity's renewal period: its certificate's life begins at ``start``, and the
    next certificate's at ``end``."""

    start: datetime
    end: datetime


def renewal_period(identity: str, ttl: timedelta, at: datetime) -> Period:
    """The renewal period of SPIFFE ID ``identity`` that ``at`` falls in.

    Periods last half of ``ttl`` and are counted from the Unix epoch, each identity's
    shifted by an offset in ``[0, ttl / 2)`` taken from a hash of its ID: a function of
    the ID, the lifetime and the time alone, so every process computes the same periods.
    """
    length = max(1, (ttl // 2) // timedelta(microseconds=1))
    digest = hashlib.sha256(identity.encode()).digest()
    offset = int.from_bytes(digest[:8], "big") % length
    start = (unix_micros(at) - offset) // length * length + offset
    return Period(start=from_unix_micros(start), end=from_unix_micros(start + length))


@dataclass(frozen=True)
class _Entry:
    cert: IssuedCert
    due: datetime


class WorkloadCertificates:
    def __init__(
        self,
        ca: CertificateAuthority,
        trust_domain: str,
        *,
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        epoch: int = 0,
        clock: Clock = utcnow,
    ) -> None:
        self._ca = ca
        self._trust_domain = trust_domain
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[Identity, _Entry] = {}
        #: The key epoch every certificate is derived under (:meth:`rekey` changes it).
        self.epoch = epoch

    @property
    def trust_bundle_pem(self) -> bytes:
        return self._ca.trust_bundle_pem

    def _issue(self, identity: Identity) -> _Entry:
        period = renewal_period(spiffe_id(self._trust_domain, *identity), self._ttl, self._clock())
        cert = self._ca.derive_workload(
            self._trust_domain, *identity, start=period.start, ttl=self._ttl, epoch=self.epoch
        )
        entry = _Entry(cert, period.end)
        self._entries[identity] = entry
        log.debug("issued %s, renewal due %s", cert.spiffe_id, entry.due.isoformat())
        return entry

    def current(self, namespace: str, service_account: str) -> IssuedCert:
        """The identity's certificate for the current period, issued if not yet issued.

        Raises :class:`mtls.ca.BadIdentity` for names that cannot form a SPIFFE ID.
        """
        identity = Identity(namespace, service_account)
        entry = self._entries.get(identity)
        if entry is None or entry.due <= self._clock():
            entry = self._issue(identity)
        return entry.cert

    def secrets(self, namespace: str, service_account: str) -> list[secret_pb2.Secret]:
        """The ``default`` and ``ROOTCA`` SDS secrets for one identity."""
        return secrets_for(self.current(namespace, service_account), self.trust_bundle_pem)

    def next_renewal(self) -> datetime | None:
        """When the earliest certificate falls due; None when none has been issued."""
        return min((e.due for e in list(self._entries.values())), default=None)

    def renew_due(self) -> list[Identity]:
        """Issue the next period's certificate for every identity whose period ended; the
        identities whose secrets changed."""
        now = self._clock()
        renewed = [identity for identity, e in self._entries.items() if e.due <= now]
        for identity in renewed:
            self._issue(identity)
        if renewed:
            log.info("renewed %d workload certificates", len(renewed))
        return renewed

    def rekey(self, epoch: int) -> list[Identity]:
        """Derive every certificate under key epoch ``epoch`` from now on, and re-issue the
        issued ones at once; the identities whose secrets changed. Epochs only rise: an
        epoch not above the current one changes nothing."""
        if epoch <= self.epoch:
            return []
        self.epoch = epoch
        identities = list(self._entries)
        for identity in identities:
            self._issue(identity)
        log.info("key epoch %d: re-issued %d workload certificates", epoch, len(identities))
        return identities

    def forget(self, namespace: str, service_account: str) -> None:
        """Drop an identity no proxy uses any more; it is issued again if asked again."""
        self._entries.pop(Identity(namespace, service_account), None)

    def __len__(self) -> int:
        return len(self._entries)
