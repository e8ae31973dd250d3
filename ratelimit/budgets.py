"""Token budgets as the rate-limit service accounts for them: metrics and a ledger.

The counters (:mod:`ratelimit.counters`) hold what every replica shares: each budget's
count per caller and window. This module keeps what one replica saw, for people:

- :class:`BudgetMetrics`: per budget (``service``, and ``budget``, the annotation's entry
  such as ``default/chat`` or ``critical:*``), tokens reserved, used and returned, and
  requests refused. Labels come from the annotations, never from callers, so a budget
  written ``*`` is one series however many callers draw on it.
- :class:`BudgetLedger`: per budget and caller, the current window as this replica saw
  it: the shared count its last answer read, the tokens it reserved, how many of those
  reservations are still open here, the usage it settled, what it returned and how many
  requests it refused. ``/debug/ratelimits`` shows it. It holds at most
  :attr:`BudgetLedger.MAX_ENTRIES` (budget, caller) pairs, the least recently seen
  leaving first, so hostile callers cannot grow it. A settlement counts in the window it
  arrives in, and a reservation settled by another replica stays open here until its
  window ends.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter

from ratelimit.rules import Rule

#: ``budget`` label and ledger key of a rule that is not a budget's (it has no name).
UNNAMED: Final = "unnamed"


def budget_labels(rule: Rule) -> tuple[str, str]:
    """``(service, budget)`` of a budget's rule, from its limit's name ``NS/NAME:ENTRY``
    (:func:`ratelimit.rules.budget_name`; a Service's name holds no colon)."""
    service, _, budget = rule.limit.name.partition(":")
    return (service, budget) if budget else (service or UNNAMED, UNNAMED)


class BudgetMetrics:
    """Prometheus counters per budget, on the rate-limit service's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["service", "budget"]
        self.reserved = Counter(
            "inferlane_token_budget_reserved_tokens_total",
            "Tokens reserved at admission (each request's worst case).",
            labels,
            registry=registry,
        )
        self.used = Counter(
            "inferlane_token_budget_used_tokens_total",
            "Tokens charged at the end of requests, from the usage the model server reported.",
            labels,
            registry=registry,
        )
        self.returned = Counter(
            "inferlane_token_budget_returned_tokens_total",
            "Reserved tokens a request did not use, given back to its budget at its end.",
            labels,
            registry=registry,
        )
        self.refused = Counter(
            "inferlane_token_budget_refused_total",
            "Requests refused because their reservation did not fit in the budget.",
            labels,
            registry=registry,
        )
        self.settlements = Counter(
            "inferlane_token_budget_settlements_total",
            "Ends of requests by outcome: replaced (a reservation by its usage), charged "
            "(usage without a reservation), unknown (no such reservation), skipped.",
            ["outcome"],
            registry=registry,
        )


@dataclass
class CallerWindow:
    """One caller's current window of one budget, as this replica saw it."""

    window_start: int
    #: The shared count (reservations and usage of every replica) at this replica's last
    #: admission; None before one.
    charged: int | None = None
    reserved: int = 0
    open_reservations: int = 0
    used: int = 0
    returned: int = 0
    refused: int = 0


class BudgetLedger:
    """Per (budget, caller), the current window's accounting on this replica."""

    #: (budget, caller) pairs kept at most.
    MAX_ENTRIES: Final = 4096

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._windows: OrderedDict[tuple[str, str], tuple[Rule, CallerWindow]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def _window(self, rule: Rule, caller: str) -> CallerWindow:
        unit_s = rule.limit.unit.seconds
        current = int(self._clock() // unit_s) * unit_s
        key = (rule.limit.name or UNNAMED, caller)
        found = self._windows.get(key)
        if found is None or found[1].window_start < current:
            found = (rule, CallerWindow(current))
            self._windows[key] = found
            while len(self._windows) > self.MAX_ENTRIES:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(key)
        return found[1]

    def reserved(self, rule: Rule, caller: str, tokens: int, count: int | None) -> None:
        window = self._window(rule, caller)
        window.reserved += tokens
        window.open_reservations += 1
        window.charged = count

    def refused(self, rule: Rule, caller: str, count: int | None) -> None:
        window = self._window(rule, caller)
        window.refused += 1
        window.charged = count

    def settled(self, rule: Rule, caller: str, used: int, reserved: int | None) -> None:
        """A request's end: ``reserved`` is what its reservation held (None: it had none)."""
        window = self._window(rule, caller)
        window.used += used
        if reserved is not None:
            window.open_reservations = max(0, window.open_reservations - 1)
            window.returned += max(0, reserved - used)

    def snapshot(self) -> list[dict[str, Any]]:
        """Per budget: its limit and window, and each caller's current window, JSON-ready.
        Windows that have ended are left out."""
        now = self._clock()
        budgets: dict[str, dict[str, Any]] = {}
        for (name, caller), (rule, window) in self._windows.items():
            unit_s = rule.limit.unit.seconds
            if window.window_start + unit_s <= now:
                continue
            service, budget = budget_labels(rule)
            entry = budgets.setdefault(
                name,
                {
                    "service": service,
                    "budget": budget,
                    "tokens": rule.limit.requests_per_unit,
                    "window_s": unit_s,
                    "callers": [],
                },
            )
            entry["callers"].append({"caller": caller, **asdict(window)})
        for entry in budgets.values():
            entry["callers"].sort(key=lambda c: c["caller"])
        return [budgets[name] for name in sorted(budgets)]
