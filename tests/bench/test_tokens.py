"""bench.tokens: its accounting, and a short run of both modes through real Envoys."""

from __future__ import annotations

import pytest

from bench.load import LengthDist
from bench.tokens import (
    Completed,
    Latency,
    ModeResult,
    TokenBenchOptions,
    TokenBenchResult,
    format_result,
    run_bench,
)
from ratelimit.tokens import TokenBudgetMode
from tests.support.envoy import require_envoy


def test_tokens_count_in_the_window_that_admitted_them_or_by_their_end() -> None:
    mode = ModeResult(TokenBudgetMode.CHARGE_AT_END)
    mode.completed += [
        Completed(admitted_at=59.5, ended_at=61.0, tokens=100, ttft_s=0.1),  # before: left out
        Completed(admitted_at=60.0, ended_at=70.0, tokens=200, ttft_s=0.1),
        Completed(admitted_at=119.9, ended_at=125.0, tokens=300, ttft_s=0.1),  # ends next
        Completed(admitted_at=130.0, ended_at=150.0, tokens=400, ttft_s=0.1),
    ]
    mode.refused += [60.5, 121.0, 122.0]
    assert mode.served([60, 120], 60) == [500, 400]
    assert mode.served([60, 120], 60, by_end=True) == [300, 700]
    assert mode.refused_in([60, 120], 60) == [1, 2]
    opts = TokenBenchOptions(budget=500, windows=2)
    reserve = ModeResult(TokenBudgetMode.RESERVE)
    latency = (Latency("wide", (1.0,), (2.0,)), Latency("open", (1.0,), (2.0,)))
    result = TokenBenchResult(opts, (60, 120), (reserve, mode), latency)
    assert result.overshoot(mode) == pytest.approx(0.0)
    assert result.overshoot(mode, by_end=True) == pytest.approx(0.4)
    assert result.used(mode) == pytest.approx(0.9)


@pytest.mark.envoy
@pytest.mark.timeout(120)
async def test_a_short_run_keeps_reserve_within_its_budget_and_shows_charge_at_end_over() -> None:
    require_envoy()
    opts = TokenBenchOptions(
        concurrency=16,
        budget=600,
        window="s",  # one-second windows, so that a test sees several
        windows=3,
        max_tokens=64,
        prompt_words=LengthDist(median=16, sigma=0.5, low=4, high=64),
        answer_tokens=LengthDist(median=16, sigma=0.8, low=2, high=256),
        step_ms=5.0,
        latency_requests=40,
        latency_concurrency=4,
    )
    result = await run_bench(opts)
    reserve, charge = result.modes
    assert (reserve.mode, charge.mode) == (TokenBudgetMode.RESERVE, TokenBudgetMode.CHARGE_AT_END)
    assert reserve.completed and charge.completed and reserve.refused
    # Reservations hold every window to its budget; charging at the end lets the streams
    # in flight when the budget runs out through.
    assert result.overshoot(reserve) <= 0.05
    assert result.overshoot(charge) > 0.05
    budgeted, unbudgeted = result.latency
    assert budgeted.headers_ms and unbudgeted.headers_ms
    report = "\n".join(format_result(result))
    assert "reserve: overshoot" in report and "charge-at-end: overshoot" in report
    assert set(result.to_json()) >= {"reserve", "charge-at-end", "latency", "window_starts"}
