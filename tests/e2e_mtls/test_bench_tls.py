"""bench/tls.py on a small scale: both byte paths serve Envoys and synthetic streams over
mutual TLS, and every proxy ACKs every change."""

from __future__ import annotations

import pytest

from bench.tls import MODES, compare, run
from tests.support.envoy import require_envoy


@pytest.mark.envoy
async def test_tls_bench_measures_both_byte_paths() -> None:
    require_envoy()
    rows = await run(envoys=[1], streams=[20], changes=1, rate=200)
    assert [(r.mode, r.result.proxies) for r in rows] == [
        (MODES[0], 1),
        (MODES[1], 1),
        (MODES[0], 20),
        (MODES[1], 20),
    ]
    for row in rows:
        assert row.result.changes == 1
        assert 0 < row.result.p99_ms < 10_000
        assert row.cpu_s > 0
    assert compare(rows[:2]).count("x") == 5
