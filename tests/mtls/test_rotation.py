from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from mtls.ca import BadIdentity, CertificateAuthority
from mtls.rotation import WorkloadCertificates, renewal_period

DAY = timedelta(hours=24)


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ca(clock: FakeClock) -> CertificateAuthority:
    return CertificateAuthority.generate(clock=clock)


@pytest.fixture
def certs(ca: CertificateAuthority, clock: FakeClock) -> WorkloadCertificates:
    return WorkloadCertificates(ca, "cluster.local", clock=clock)


def _replica(ca: CertificateAuthority, clock: FakeClock, epoch: int = 0) -> WorkloadCertificates:
    """Another process with the same CA: its own copy, loaded from the CA's Secret form."""
    copy = CertificateAuthority.from_secret_data(ca.secret_data(), clock=clock)
    return WorkloadCertificates(copy, "cluster.local", clock=clock, epoch=epoch)


# ----------------------------------------------------------------------------- periods


def test_periods_are_half_the_lifetime_and_tile_time() -> None:
    at = datetime(2030, 5, 17, 3, 4, 5, tzinfo=UTC)
    period = renewal_period("spiffe://cluster.local/ns/a/sa/b", DAY, at)
    assert period.start <= at < period.end
    assert period.end - period.start == DAY / 2
    # Every moment of the period names the same period; the next one starts at its end.
    assert renewal_period("spiffe://cluster.local/ns/a/sa/b", DAY, period.start) == period
    just_before_end = period.end - timedelta(microseconds=1)
    assert renewal_period("spiffe://cluster.local/ns/a/sa/b", DAY, just_before_end) == period
    following = renewal_period("spiffe://cluster.local/ns/a/sa/b", DAY, period.end)
    assert following.start == period.end and following.end == period.end + DAY / 2


def test_identities_are_renewed_at_times_spread_over_the_period() -> None:
    """The per-identity offset spreads renewals evenly, as jitter did: of 2,000
    identities, every tenth of the period holds about a tenth of the renewals."""
    at = datetime(2030, 1, 1, tzinfo=UTC)
    half = DAY / 2
    ends = [
        renewal_period(f"spiffe://td/ns/ns-{i % 40}/sa/sa-{i}", DAY, at).end for i in range(2000)
    ]
    assert all(at < end <= at + half for end in ends)
    deciles = [0] * 10
    for end in ends:
        deciles[min(9, int((end - at) / half * 10))] += 1
    assert all(140 <= n <= 260 for n in deciles), deciles


def test_a_tiny_lifetime_still_has_periods() -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    period = renewal_period("spiffe://td/ns/a/sa/b", timedelta(microseconds=1), at)
    assert period.start <= at < period.end


# ----------------------------------------------------------------------------- certificates


def test_one_certificate_per_identity_until_its_period_ends(
    certs: WorkloadCertificates, clock: FakeClock
) -> None:
    first = certs.current("default", "llama")
    assert certs.current("default", "llama") is first
    assert certs.current("default", "vllm").spiffe_id == "spiffe://cluster.local/ns/default/sa/vllm"
    assert len(certs) == 2
    certs.forget("default", "vllm")
    due = certs.next_renewal()
    period = renewal_period(first.spiffe_id, DAY, clock.now)
    assert due == period.end
    # Renewed at half its life: the certificate's life began when the period did.
    assert first.not_after == (period.start + DAY).replace(microsecond=0)
    clock.now = due - timedelta(seconds=1)
    assert certs.current("default", "llama") is first
    clock.now = due
    renewed = certs.current("default", "llama")
    assert renewed.key_pem != first.key_pem and renewed.serial != first.serial
    assert renewed.not_before > first.not_before


def test_replicas_and_restarts_serve_the_same_bytes(
    ca: CertificateAuthority, certs: WorkloadCertificates, clock: FakeClock
) -> None:
    """Two processes on one CA, or one process before and after a restart later in the
    period, give an identity the same certificate and key, so its SDS secrets have the
    same versions; the next period, and another identity, get others."""

    def wire(secrets: list[secret_pb2.Secret]) -> list[bytes]:
        return [s.SerializeToString() for s in secrets]

    llama = wire(certs.secrets("default", "llama"))
    assert wire(_replica(ca, clock).secrets("default", "llama")) == llama
    period = renewal_period("spiffe://cluster.local/ns/default/sa/llama", DAY, clock.now)
    clock.now = period.end - timedelta(seconds=1)  # restarted just before the renewal
    later = _replica(ca, clock)
    assert wire(later.secrets("default", "llama")) == llama
    assert wire(later.secrets("default", "chat"))[0] != llama[0]
    clock.now = period.end
    renewed = wire(later.secrets("default", "llama"))
    assert renewed[0] != llama[0] and renewed[1] == llama[1]  # ROOTCA is the CA's
    assert wire(_replica(ca, clock).secrets("default", "llama")) == renewed


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


def test_a_new_epoch_gives_every_identity_a_new_key(
    ca: CertificateAuthority, certs: WorkloadCertificates, clock: FakeClock
) -> None:
    before = {sa: certs.current("ns", sa) for sa in ("a", "b")}
    assert sorted(certs.rekey(1)) == [("ns", "a"), ("ns", "b")]
    after = {sa: certs.current("ns", sa) for sa in ("a", "b")}
    for sa in ("a", "b"):
        assert after[sa].key_pem != before[sa].key_pem
        assert after[sa].serial != before[sa].serial
        # Same period: the same validity, only the key (and so the serial) is new.
        assert after[sa].not_after == before[sa].not_after
    # Epochs only rise; a replica that reads epoch 1 derives the same new keys.
    assert certs.rekey(1) == [] and certs.rekey(0) == [] and certs.epoch == 1
    assert _replica(ca, clock, epoch=1).current("ns", "a") == after["a"]
    assert _replica(ca, clock, epoch=0).current("ns", "a") == before["a"]


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
