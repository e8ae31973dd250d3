"""The per-caller ledger of token budgets: per window, and bounded."""

from __future__ import annotations

import pytest

from ratelimit.budgets import BudgetLedger, budget_labels
from ratelimit.rules import RateLimit, Rule, Unit

from .test_counters import FakeClock

RULE = Rule("r", RateLimit(1000, Unit.MINUTE, name="default/llama:critical:ops/*"))


def test_budget_labels_come_from_the_limits_name() -> None:
    assert budget_labels(RULE) == ("default/llama", "critical:ops/*")
    assert budget_labels(Rule("r", RateLimit(5, Unit.SECOND))) == ("unnamed", "unnamed")


def test_a_callers_window_adds_up_and_starts_afresh_with_the_next() -> None:
    clock = FakeClock(600.0)
    ledger = BudgetLedger(clock)
    ledger.reserved(RULE, "ops/a", 300, count=300)
    ledger.reserved(RULE, "ops/a", 200, count=500)
    ledger.settled(RULE, "ops/a", used=120, reserved=300)
    ledger.refused(RULE, "ops/a", count=380)
    ledger.settled(RULE, "ops/a", used=50, reserved=None)  # charged without a reservation
    [budget] = ledger.snapshot()
    assert (budget["service"], budget["budget"], budget["tokens"]) == (
        "default/llama",
        "critical:ops/*",
        1000,
    )
    [window] = budget["callers"]
    assert window == {
        "caller": "ops/a",
        "window_start": 600,
        "charged": 380,
        "reserved": 500,
        "open_reservations": 1,
        "used": 170,
        "returned": 180,
        "refused": 1,
    }
    clock.now += 60
    assert ledger.snapshot() == []  # that window has ended
    ledger.reserved(RULE, "ops/a", 10, count=10)
    [budget] = ledger.snapshot()
    assert budget["callers"][0]["reserved"] == 10


def test_the_ledger_is_bounded_and_forgets_the_least_recent_callers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(BudgetLedger, "MAX_ENTRIES", 3)
    ledger = BudgetLedger(FakeClock(600.0))
    for caller in ("ops/a", "ops/b", "ops/c"):
        ledger.reserved(RULE, caller, 1, count=1)
    ledger.refused(RULE, "ops/a", count=1)  # seen again: now the most recent
    ledger.reserved(RULE, "ops/d", 1, count=1)
    assert len(ledger) == 3
    [budget] = ledger.snapshot()
    assert [c["caller"] for c in budget["callers"]] == ["ops/a", "ops/c", "ops/d"]
