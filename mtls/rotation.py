"""Workload certificates per identity: issued on first use, replaced when due.

One certificate per ``(namespace, service account)``: every proxy of that identity gets
the same one, so a thousand replicas of one Deployment cost one signature per renewal.
Each certificate is due at :func:`mtls.ca.renew_at` (half its life, jittered), so
certificates issued together are not renewed together.

No I/O and no timers here: the xDS layer asks for :meth:`WorkloadCertificates.current`
when a proxy subscribes, sleeps until :meth:`WorkloadCertificates.next_renewal`, calls
:meth:`WorkloadCertificates.renew_due` and pushes the new secrets to the proxies of the
identities it returns. Changes are made by one thread at a time (:class:`mtls.secrets.
SecretStore` holds its lock around them); :meth:`WorkloadCertificates.next_renewal` reads a
copy, so the event loop may call it while another thread issues.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from mtls.ca import DEFAULT_WORKLOAD_TTL, CertificateAuthority, Clock, IssuedCert, renew_at, utcnow
from mtls.identity import Identity
from mtls.sds import secrets_for

log = logging.getLogger(__name__)


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
        rng: random.Random | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self._ca = ca
        self._trust_domain = trust_domain
        self._ttl = ttl
        self._rng = rng or random.Random()
        self._clock = clock
        self._entries: dict[Identity, _Entry] = {}

    @property
    def trust_bundle_pem(self) -> bytes:
        return self._ca.trust_bundle_pem

    def _issue(self, identity: Identity) -> _Entry:
        cert = self._ca.issue_workload(self._trust_domain, *identity, ttl=self._ttl)
        entry = _Entry(cert, renew_at(cert, self._rng))
        self._entries[identity] = entry
        log.debug("issued %s, renewal due %s", cert.spiffe_id, entry.due.isoformat())
        return entry

    def current(self, namespace: str, service_account: str) -> IssuedCert:
        """The identity's certificate; a new one if there is none yet or it is due.

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
        """Re-issue every certificate that is due; the identities whose secrets changed."""
        now = self._clock()
        renewed = [identity for identity, e in self._entries.items() if e.due <= now]
        for identity in renewed:
            self._issue(identity)
        if renewed:
            log.info("renewed %d workload certificates", len(renewed))
        return renewed

    def forget(self, namespace: str, service_account: str) -> None:
        """Drop an identity no proxy uses any more; it is issued afresh if asked again."""
        self._entries.pop(Identity(namespace, service_account), None)

    def __len__(self) -> int:
        return len(self._entries)
