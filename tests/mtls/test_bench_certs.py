from __future__ import annotations

import io

from bench.certs import format_table, main, side_by_side


def test_side_by_side_takes_turns() -> None:
    """Each run times every operation in turn, so load that comes and goes hits all."""
    calls: list[str] = []
    rows = side_by_side(
        [("a", lambda _: calls.append("a"), 2), ("b", lambda _: calls.append("b"), 1)], runs=2
    )
    assert calls == ["a", "a", "b", "a", "a", "b"]
    assert [(r.what, r.count, len(r.cpu_rates)) for r in rows] == [("a", 2, 2), ("b", 1, 2)]
    assert all(r.median_per_s > 0 and r.wall_median_per_s > 0 for r in rows)
    assert "a" in format_table(rows)


def test_main_prints_the_table() -> None:
    out = io.StringIO()
    assert main(["--count", "20", "--runs", "1"], out=out) == 0
    text = out.getvalue()
    for what in (
        "derived P-256 key, P-256 CA",
        "fresh P-256 key, RSA-2048 CA",
        "key generation only, P-256",
        "RSA-2048",
    ):
        assert what in text
    assert "goal of 2,000/s" in text and "the fresh-key issuance they replace" in text
