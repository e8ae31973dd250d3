"""Prometheus gauges of certificate expiry, read from the secret store at scrape time.

``inferlane_cert_expiry_timestamp_seconds{kind}``: when the earliest certificate of each
kind stops being valid, as a Unix time (``time() - ...`` in PromQL gives the seconds
left): ``root`` (the trust bundle's roots), ``ca`` (the certificate the CA signs with: the
root itself, or an intermediate such as one cert-manager issues) and ``workload`` (the
served workload certificates, which are renewed at half life: one that comes close to
expiring means renewal is stuck).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mtls.secrets import SecretStore

EXPIRY_METRIC = "inferlane_cert_expiry_timestamp_seconds"


class CertificateExpiry(Collector):
    """Reads ``store()`` (None before the store exists) whenever Prometheus scrapes."""

    def __init__(self, store: Callable[[], SecretStore | None]) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            EXPIRY_METRIC,
            "When the earliest certificate of each kind expires (root, ca, workload), Unix time.",
            labels=["kind"],
        )
        store = self._store()
        if store is not None:
            ca = store.ca
            family.add_metric(["root"], min(c.not_valid_after_utc for c in ca.roots).timestamp())
            family.add_metric(["ca"], ca.certificate.not_valid_after_utc.timestamp())
            workloads = [
                datetime.fromisoformat(i["not_after"]) for i in store.describe()["identities"]
            ]
            if workloads:
                family.add_metric(["workload"], min(workloads).timestamp())
        yield family
