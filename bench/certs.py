"""How fast the CA issues SPIFFE workload certificates.

``python -m bench.certs`` issues batches of workload certificates and prints the median
rate over several runs, the rows measured side by side (each run times every row in turn,
so a busy machine slows them alike):

* what the control plane serves: a **derived** certificate (the P-256 key and serial from
  HKDF over the CA's key, the identity and the period; an RFC 6979 deterministic
  signature), which is the same bytes in every replica and after a restart;
* the baseline it replaced: a **fresh** random P-256 key and serial, randomly signed;
* both again with an RSA-2048 CA (cert-manager issues those), and key generation alone for
  P-256 and RSA-2048, which is what makes RSA workload keys (Istio's default) costly.

A control plane renews every workload at half of a 24 h lifetime, so 2,000/s on one core
covers 86 million renewals a day.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from mtls.ca import CertificateAuthority

#: The rate the design needs from one process on this machine, certificates per second.
GOAL_PER_S = 2000.0
TRUST_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class Row:
    what: str
    #: Per run, operations per second of this process's CPU time: what one core does,
    #: whatever else shares the machine.
    cpu_rates: tuple[float, ...]
    #: Per run, operations per second of wall-clock time.
    wall_rates: tuple[float, ...]
    count: int

    @property
    def median_per_s(self) -> float:
        """Median over runs, per CPU second."""
        return statistics.median(self.cpu_rates)

    @property
    def wall_median_per_s(self) -> float:
        return statistics.median(self.wall_rates)


def side_by_side(
    operations: Sequence[tuple[str, Callable[[int], object], int]], runs: int
) -> list[Row]:
    """Each run times every ``(what, operation, count)`` in turn: ``count`` calls of
    ``operation(i)``. One row per operation, in order."""
    cpu: list[list[float]] = [[] for _ in operations]
    wall: list[list[float]] = [[] for _ in operations]
    for _ in range(runs):
        for k, (_what, operation, count) in enumerate(operations):
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            for i in range(count):
                operation(i)
            cpu_s = max(time.process_time() - cpu_start, 1e-9)
            wall_s = max(time.perf_counter() - wall_start, 1e-9)
            cpu[k].append(count / cpu_s)
            wall[k].append(count / wall_s)
    return [
        Row(what, tuple(cpu[k]), tuple(wall[k]), count)
        for k, (what, _operation, count) in enumerate(operations)
    ]


def rsa_ca() -> CertificateAuthority:
    """A self-signed RSA-2048 root, loaded as any external CA would be."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rsa baseline")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return CertificateAuthority.from_pem(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def _fresh(ca: CertificateAuthority) -> Callable[[int], object]:
    def issue(i: int) -> object:
        return ca.issue_workload(TRUST_DOMAIN, "bench", f"sa-{i % 100}")

    return issue


def _derived(ca: CertificateAuthority) -> Callable[[int], object]:
    """A new period for every call, so each is a certificate no call made before."""
    start = datetime.now(UTC)

    def derive(i: int) -> object:
        period = start + timedelta(microseconds=i)
        return ca.derive_workload(TRUST_DOMAIN, "bench", f"sa-{i % 100}", start=period)

    return derive


#: The first row is what the control plane serves; the second, the issuance it replaced.
SERVED, FRESH = 0, 1


def run(count: int = 2000, runs: int = 5) -> list[Row]:
    """All rows of the table. RSA key generation is slow, so it gets fewer iterations."""
    rsa_count = max(3, count // 100)
    p256, rsa2048 = CertificateAuthority.generate(), rsa_ca()
    return side_by_side(
        [
            ("workload cert, derived P-256 key, P-256 CA", _derived(p256), count),
            ("workload cert, fresh P-256 key, P-256 CA", _fresh(p256), count),
            ("workload cert, derived P-256 key, RSA-2048 CA", _derived(rsa2048), count),
            ("workload cert, fresh P-256 key, RSA-2048 CA", _fresh(rsa2048), count),
            (
                "key generation only, P-256",
                lambda _: ec.generate_private_key(ec.SECP256R1()),
                count,
            ),
            (
                "key generation only, RSA-2048",
                lambda _: rsa.generate_private_key(public_exponent=65537, key_size=2048),
                rsa_count,
            ),
        ],
        runs,
    )


def format_table(rows: Sequence[Row]) -> str:
    width = max(len(r.what) for r in rows)
    header = (
        f"{'what':<{width}}  {'median/CPU s':>12}  {'min':>8}  {'max':>8}  "
        f"{'median/wall s':>13}  per run"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.what:<{width}}  {r.median_per_s:>12,.0f}  {min(r.cpu_rates):>8,.0f}  "
            f"{max(r.cpu_rates):>8,.0f}  {r.wall_median_per_s:>13,.0f}  {r.count}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.certs", description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="certificates per run")
    parser.add_argument("--runs", type=int, default=5, help="runs; the median is reported")
    parser.add_argument(
        "--check", action="store_true", help=f"exit 1 below the goal of {GOAL_PER_S:,.0f}/s"
    )
    args = parser.parse_args(argv)
    if args.count < 1 or args.runs < 1:
        parser.error("--count and --runs must be at least 1")
    rows = run(args.count, args.runs)
    print(format_table(rows), file=out)
    ours, before = rows[SERVED].median_per_s, rows[FRESH].median_per_s
    verdict = "meets" if ours >= GOAL_PER_S else "misses"
    print(
        f"\nDerived P-256 workload certificates (what the control plane serves): {ours:,.0f} "
        f"per CPU second (one core), which {verdict} the goal of {GOAL_PER_S:,.0f}/s; "
        f"{ours / before:.2f}x the fresh-key issuance they replace ({before:,.0f}/s)",
        file=out,
    )
    return 1 if args.check and ours < GOAL_PER_S else 0


if __name__ == "__main__":
    sys.exit(main())
