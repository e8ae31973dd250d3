from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from mtls.ca import BadIdentity, CertificateAuthority
from mtls.rotation import WorkloadCertificates


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def certs(clock: FakeClock) -> WorkloadCertificates:
    ca = CertificateAuthority.generate(clock=clock)
    return WorkloadCertificates(ca, "cluster.local", rng=random.Random(1), clock=clock)


def test_one_certificate_per_identity_until_due(
    certs: WorkloadCertificates, clock: FakeClock
) -> None:
    first = certs.current("default", "llama")
    assert certs.current("default", "llama") is first
    assert certs.current("default", "vllm").spiffe_id == "spiffe://cluster.local/ns/default/sa/vllm"
    assert len(certs) == 2
    certs.forget("default", "vllm")
    due = certs.next_renewal()
    assert due is not None
    # Half of 24 h, give or take 10 % of the lifetime.
    assert first.not_before + timedelta(hours=9.5) < due < first.not_before + timedelta(hours=14.5)
    clock.now = due - timedelta(seconds=1)
    assert certs.current("default", "llama") is first
    clock.now = due
    renewed = certs.current("default", "llama")
    assert renewed.serial != first.serial and renewed.not_before > first.not_before


def test_renew_due_reissues_only_what_is_due(certs: WorkloadCertificates, clock: FakeClock) -> None:
    a = certs.current("ns", "a")
    b = certs.current("ns", "b")
    assert certs.renew_due() == []
    earliest = certs.next_renewal()
    assert earliest is not None
    clock.now = earliest
    renewed = certs.renew_due()
    assert len(renewed) == 1
    assert certs.current(*renewed[0]).serial not in (a.serial, b.serial)
    clock.now += timedelta(hours=24)
    assert sorted(certs.renew_due()) == [("ns", "a"), ("ns", "b")]
    next_due = certs.next_renewal()
    assert next_due is not None and next_due > clock.now


def test_secrets_and_forget(certs: WorkloadCertificates) -> None:
    default, root = certs.secrets("default", "llama")
    assert (default.name, root.name) == ("default", "ROOTCA")
    assert root.validation_context.trusted_ca.inline_bytes == certs.trust_bundle_pem
    certs.forget("default", "llama")
    assert len(certs) == 0 and certs.next_renewal() is None


def test_bad_identity_is_refused(certs: WorkloadCertificates) -> None:
    with pytest.raises(BadIdentity):
        certs.current("Not_A_Namespace", "x")
    assert len(certs) == 0
