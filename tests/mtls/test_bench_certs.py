from __future__ import annotations

import io

from bench.certs import format_table, main, measure


def test_measure_counts_runs() -> None:
    calls: list[int] = []
    row = measure("noop", calls.append, count=10, runs=3)
    assert len(calls) == 30 and len(row.cpu_rates) == len(row.wall_rates) == 3
    assert row.median_per_s > 0 and row.wall_median_per_s > 0
    assert "noop" in format_table([row])


def test_main_prints_the_table() -> None:
    out = io.StringIO()
    assert main(["--count", "20", "--runs", "1"], out=out) == 0
    text = out.getvalue()
    for what in ("P-256 CA", "RSA-2048 CA", "key generation only, P-256", "RSA-2048"):
        assert what in text
    assert "goal of 2,000/s" in text
