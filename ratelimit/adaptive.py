"""The adaptive controller: per-endpoint class limits from the endpoint's saturation.

For a Service with ``inferlane.io/adaptive: "true"``, the control plane samples each
backend endpoint's vLLM gauges (``ratelimit.scrape``) and feeds them here. The
controller keeps, per endpoint, one *multiplier* per class in ``[floor, 1]`` and turns
it into limits with :func:`class_limits`: the class's ``rate-limit`` times its
multiplier, and its concurrency cap (its share of ``max-concurrency``,
:data:`mesh.model.CLASS_SHARES`, or the cap the Service names for it) times its
multiplier. The concurrency caps are what the endpoint's own sidecar admits per class
(``routing.clusters.inbound_cluster``), so the controller steers how many requests of
each class the pod holds, not only how fast they arrive. Nothing here does I/O; time
comes from an injected clock.

Control law: AIMD, ordered by class
===================================

*Saturation* is one number per sample, 1.0 meaning "at capacity": the larger of
``waiting / queue_depth_threshold`` and ``kv_cache_usage / kv_cache_threshold`` (the
two signals, and default thresholds 5 and 0.8, that the Gateway API Inference
Extension's saturation detector uses). ``running`` is recorded for the debug page but
not used: a full batch is the engine doing its job, a queue is overload.

- Tighten (multiplicative decrease): the lowest class not at its floor has its
  multiplier multiplied by ``decrease_factor`` (0.5). Sheddable goes first, then
  standard, and critical only after both are at their floors, never below
  ``critical_floor``.
- Loosen (additive increase): the highest class below 1 gains ``increase_step`` (0.1):
  critical first, sheddable last.

Why AIMD rather than a gradient controller (Netflix's Gradient2, Vegas): gradient
controllers steer on latency against a baseline, and an LLM request's latency is
dominated by how many tokens it generates, so the gradient is mostly noise. vLLM's
queue depth and KV-cache use measure saturation directly, so a threshold with AIMD
steps suffices. Multiplicative decrease sheds load within a few steps (sheddable is at
6 % after four); additive increase probes back slowly, so the controller does not
oscillate around the knee. It is TCP's rule, whose stability is well understood, and
each step is easy to explain on a debug page.

Hysteresis and pacing
=====================

- Saturation at or above ``tighten_at`` is *overloaded*, at or below ``loosen_at``
  *underloaded*, in between *steady* (no change either way).
- A state must hold for ``tighten_hold_s`` (overloaded) or ``loosen_hold_s``
  (underloaded) before a step, and again after every step, so steps are spaced at least
  a hold time apart. Loosening waits longer than tightening.
- A token bucket of ``max_changes_per_minute`` tokens, refilled at that many per minute,
  bounds changes per endpoint: at most ``max_changes_per_minute * (1 + T/60)`` changes
  in any ``T`` seconds, whatever the input. A due step without a token is suppressed,
  counted, and tried again on the next sample.
- A scrape failure or a gap of more than ``max_sample_gap_s`` between samples restarts
  the hold: limits never move on stale data.

Every change is counted in metrics and recorded with its reason; :meth:`snapshot`
returns a frozen view for ``/debug/ratelimits``.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from mesh.model import PRIORITIES, Priority, ServiceConfig

#: Tightening order (lowest class first); loosening goes the other way.
_TIGHTEN_ORDER = (Priority.SHEDDABLE, Priority.STANDARD, Priority.CRITICAL)

#: Multipliers are kept to this many decimals, so repeated steps do not drift.
_DECIMALS = 6


@dataclass(frozen=True)
class SaturationSample:
    """One reading of an endpoint's vLLM gauges."""

    #: Requests queued, not yet scheduled (``vllm:num_requests_waiting``).
    waiting: float
    #: Requests in the running batch (``vllm:num_requests_running``).
    running: float
    #: KV-cache use, 0 to 1 (``vllm:gpu_cache_usage_perc``); None when not exported.
    kv_cache_usage: float | None = None


@dataclass(frozen=True)
class AdaptiveSettings:
    """The controller's knobs. Units are in the names; defaults are explained inline."""

    #: Waiting requests that count as saturation 1.0 (the Inference Extension's default).
    queue_depth_threshold: float = 5.0
    #: KV-cache use that counts as saturation 1.0 (the Inference Extension's default).
    kv_cache_threshold: float = 0.8
    #: Saturation at or above this is overloaded.
    tighten_at: float = 1.0
    #: Saturation at or below this is underloaded; the gap to tighten_at is the hysteresis.
    loosen_at: float = 0.6
    #: Overload must last this long before (and between) tightening steps. Two scrapes
    #: at the usual 1 s interval: quick, but not on one noisy sample.
    tighten_hold_s: float = 2.0
    #: Underload must last this long before (and between) loosening steps: recover
    #: slowly, so a brief lull does not re-admit a flood.
    loosen_hold_s: float = 10.0
    #: Multiplicative decrease per tightening step.
    decrease_factor: float = 0.5
    #: Additive increase per loosening step (of the class's full limit).
    increase_step: float = 0.1
    #: Change budget per endpoint: bucket depth, and refill per minute.
    max_changes_per_minute: float = 6.0
    #: Lowest multipliers. Sheddable may be shed almost entirely; standard keeps a
    #: quarter; critical is never limited below 80 % of what its owner set.
    sheddable_floor: float = 0.05
    standard_floor: float = 0.25
    critical_floor: float = 0.8
    #: A longer gap between samples restarts the hold (the data in between is unknown).
    max_sample_gap_s: float = 30.0

    def floor(self, priority: Priority) -> float:
        return {
            Priority.SHEDDABLE: self.sheddable_floor,
            Priority.STANDARD: self.standard_floor,
            Priority.CRITICAL: self.critical_floor,
        }[priority]

    def problems(self) -> list[str]:
        """What is inconsistent in these settings (empty when they are usable)."""
        out = []
        if not 0 < self.loosen_at < self.tighten_at:
            out.append("need 0 < loosen_at < tighten_at")
        if not 0 < self.decrease_factor < 1:
            out.append("decrease_factor must be between 0 and 1")
        if not 0 < self.increase_step <= 1:
            out.append("increase_step must be in (0, 1]")
        if self.max_changes_per_minute < 1:
            out.append("max_changes_per_minute must be at least 1")
        if self.queue_depth_threshold <= 0 or self.kv_cache_threshold <= 0:
            out.append("thresholds must be positive")
        for p in PRIORITIES:
            if not 0 < self.floor(p) <= 1:
                out.append(f"{p} floor must be in (0, 1]")
        return out


class Regime(enum.StrEnum):
    UNKNOWN = "unknown"  # no usable sample yet, or the last scrape failed
    OVERLOADED = "overloaded"
    STEADY = "steady"
    UNDERLOADED = "underloaded"


@dataclass(frozen=True)
class EndpointSnapshot:
    """One endpoint's controller state, frozen (for ``/debug/ratelimits``)."""

    endpoint: str
    multipliers: Mapping[Priority, float]
    regime: Regime
    regime_since: float
    saturation: float | None
    last_sample: SaturationSample | None
    last_sample_at: float | None
    #: Bumped on every change: callers compare it to know when to push new limits.
    version: int
    changes: int
    suppressed: int
    budget_tokens: float
    last_change_at: float | None
    last_change_reason: str
    last_error: str

    def to_dict(self) -> dict[str, Any]:
        sample = self.last_sample
        return {
            "endpoint": self.endpoint,
            "multipliers": {str(p): m for p, m in self.multipliers.items()},
            "regime": str(self.regime),
            "regime_since": self.regime_since,
            "saturation": self.saturation,
            "last_sample": None
            if sample is None
            else {
                "waiting": sample.waiting,
                "running": sample.running,
                "kv_cache_usage": sample.kv_cache_usage,
            },
            "last_sample_at": self.last_sample_at,
            "version": self.version,
            "changes": self.changes,
            "suppressed": self.suppressed,
            "budget_tokens": round(self.budget_tokens, 3),
            "last_change_at": self.last_change_at,
            "last_change_reason": self.last_change_reason,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class ControllerSnapshot:
    at: float
    settings: AdaptiveSettings
    endpoints: Mapping[str, EndpointSnapshot]

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "settings": {k: v for k, v in self.settings.__dict__.items()},
            "endpoints": [self.endpoints[e].to_dict() for e in sorted(self.endpoints)],
        }


@dataclass(frozen=True)
class Step:
    """What one observation did."""

    changed: bool
    state: EndpointSnapshot


@dataclass(frozen=True)
class ClassLimits:
    """The limits one endpoint's inbound sidecar enforces, per class."""

    #: Requests per second per class: only classes the ``rate-limit`` annotation names.
    rate: Mapping[Priority, float]
    #: Concurrent requests per class: only the classes that are capped (none without
    #: ``max-concurrency``; critical only when the Service names a cap for it).
    concurrency: Mapping[Priority, int]
    multipliers: Mapping[Priority, float] = field(
        default_factory=lambda: MappingProxyType(dict.fromkeys(PRIORITIES, 1.0))
    )


def class_limits(
    config: ServiceConfig, multipliers: Mapping[Priority, float] | None = None
) -> ClassLimits:
    """A Service's per-class limits on one endpoint, scaled by that endpoint's multipliers.

    Without ``multipliers`` (or when the Service is not adaptive) these are the static
    limits. A class the ``rate-limit`` annotation does not name gets no rate, and a class
    without a cap (:meth:`ServiceConfig.concurrency_for`) no concurrency: critical is
    limited in neither unless the Service names it. Rates are rounded to a thousandth
    (at least that); concurrencies round down, to at least 1.
    """
    mult = {p: 1.0 for p in PRIORITIES}
    if multipliers is not None and config.adaptive:
        mult.update({p: m for p, m in multipliers.items() if p in mult})
    rate = {p: max(0.001, round(base * mult[p], 3)) for p, base in config.rate_limit.items()}
    concurrency: dict[Priority, int] = {}
    for p in PRIORITIES:
        base = config.concurrency_for(p)
        if base is not None:
            concurrency[p] = max(1, math.floor(round(base * mult[p], _DECIMALS)))
    return ClassLimits(
        rate=MappingProxyType(rate),
        concurrency=MappingProxyType(concurrency),
        multipliers=MappingProxyType(mult),
    )


class AdaptiveMetrics:
    """The controller's Prometheus metrics, on a registry of their own unless one is given."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.changes = Counter(
            "inferlane_adaptive_limit_changes_total",
            "Limit changes by direction (tighten, loosen).",
            ["direction"],
            registry=r,
        )
        self.suppressed = Counter(
            "inferlane_adaptive_limit_changes_suppressed_total",
            "Due limit changes held back by the per-endpoint change budget.",
            registry=r,
        )
        self.multiplier = Gauge(
            "inferlane_adaptive_multiplier",
            "Current multiplier of a class's limits on an endpoint (1 = untouched).",
            ["endpoint", "priority"],
            registry=r,
        )
        self.saturation = Gauge(
            "inferlane_adaptive_saturation",
            "Last saturation of an endpoint (1 = at capacity).",
            ["endpoint"],
            registry=r,
        )


@dataclass
class _State:
    """Mutable per-endpoint state; only the controller touches it."""

    multipliers: dict[Priority, float]
    tokens: float
    tokens_at: float
    regime: Regime
    regime_since: float
    saturation: float | None = None
    last_sample: SaturationSample | None = None
    last_sample_at: float | None = None
    version: int = 0
    changes: int = 0
    suppressed: int = 0
    last_change_at: float | None = None
    last_change_reason: str = ""
    last_error: str = ""


class AdaptiveController:
    """Per-endpoint AIMD on class multipliers. Not thread-safe: call it from one loop."""

    def __init__(
        self,
        settings: AdaptiveSettings | None = None,
        *,
        clock: Callable[[], float],
        metrics: AdaptiveMetrics | None = None,
    ) -> None:
        self.settings = settings or AdaptiveSettings()
        problems = self.settings.problems()
        if problems:
            raise ValueError("bad adaptive settings: " + "; ".join(problems))
        self._clock = clock
        self.metrics = metrics or AdaptiveMetrics()
        self._states: dict[str, _State] = {}

    def saturation(self, sample: SaturationSample) -> float:
        """The sample's saturation: 1.0 is at capacity (see the module docstring)."""
        s = self.settings
        parts = [max(0.0, sample.waiting) / s.queue_depth_threshold]
        if sample.kv_cache_usage is not None:
            parts.append(max(0.0, sample.kv_cache_usage) / s.kv_cache_threshold)
        return max(parts)

    def _state(self, endpoint: str, now: float) -> _State:
        state = self._states.get(endpoint)
        if state is None:
            state = _State(
                multipliers=dict.fromkeys(PRIORITIES, 1.0),
                tokens=self.settings.max_changes_per_minute,
                tokens_at=now,
                regime=Regime.UNKNOWN,
                regime_since=now,
            )
            self._states[endpoint] = state
            self._export(endpoint, state)
        return state

    def _refill(self, state: _State, now: float) -> None:
        budget = self.settings.max_changes_per_minute
        elapsed = max(0.0, now - state.tokens_at)
        state.tokens = min(budget, state.tokens + elapsed * budget / 60.0)
        state.tokens_at = now

    def _regime(self, saturation: float) -> Regime:
        if saturation >= self.settings.tighten_at:
            return Regime.OVERLOADED
        if saturation <= self.settings.loosen_at:
            return Regime.UNDERLOADED
        return Regime.STEADY

    def observe(self, endpoint: str, sample: SaturationSample) -> Step:
        """Take one sample of ``endpoint``; maybe change its multipliers."""
        now = self._clock()
        state = self._state(endpoint, now)
        self._refill(state, now)
        saturation = self.saturation(sample)
        regime = self._regime(saturation)
        gap = None if state.last_sample_at is None else now - state.last_sample_at
        if regime is not state.regime or (gap is not None and gap > self.settings.max_sample_gap_s):
            state.regime, state.regime_since = regime, now
        state.saturation, state.last_sample, state.last_sample_at = saturation, sample, now
        state.last_error = ""
        self.metrics.saturation.labels(endpoint).set(saturation)
        changed = self._maybe_step(endpoint, state, now)
        return Step(changed=changed, state=self._snapshot(endpoint, state))

    def observe_error(self, endpoint: str, error: str) -> Step:
        """A failed scrape: keep the limits, restart the hold, remember the error."""
        now = self._clock()
        state = self._state(endpoint, now)
        self._refill(state, now)
        state.regime, state.regime_since, state.last_error = Regime.UNKNOWN, now, error
        return Step(changed=False, state=self._snapshot(endpoint, state))

    def _maybe_step(self, endpoint: str, state: _State, now: float) -> bool:
        s = self.settings
        since = state.regime_since
        if state.last_change_at is not None:
            since = max(since, state.last_change_at)
        held = now - since
        if state.regime is Regime.OVERLOADED and held >= s.tighten_hold_s:
            direction, proposal = "tighten", self._tightened(state.multipliers)
            why = f"saturation {state.saturation:.2f} >= {s.tighten_at} for {held:.1f}s"
        elif state.regime is Regime.UNDERLOADED and held >= s.loosen_hold_s:
            direction, proposal = "loosen", self._loosened(state.multipliers)
            why = f"saturation {state.saturation:.2f} <= {s.loosen_at} for {held:.1f}s"
        else:
            return False
        if proposal is None:
            return False  # already at the floors (or fully open): nothing to change
        priority, new = proposal
        if state.tokens < 1.0:
            state.suppressed += 1
            self.metrics.suppressed.inc()
            return False
        old = state.multipliers[priority]
        state.tokens -= 1.0
        state.multipliers[priority] = new
        state.version += 1
        state.changes += 1
        state.last_change_at = now
        state.last_change_reason = f"{direction}: {why}; {priority} {old:g} -> {new:g}"
        self.metrics.changes.labels(direction).inc()
        self._export(endpoint, state)
        return True

    def _tightened(self, mult: Mapping[Priority, float]) -> tuple[Priority, float] | None:
        for p in _TIGHTEN_ORDER:
            floor = self.settings.floor(p)
            if mult[p] > floor:
                return p, round(max(floor, mult[p] * self.settings.decrease_factor), _DECIMALS)
        return None

    def _loosened(self, mult: Mapping[Priority, float]) -> tuple[Priority, float] | None:
        for p in reversed(_TIGHTEN_ORDER):
            if mult[p] < 1.0:
                return p, round(min(1.0, mult[p] + self.settings.increase_step), _DECIMALS)
        return None

    def _export(self, endpoint: str, state: _State) -> None:
        for p, m in state.multipliers.items():
            self.metrics.multiplier.labels(endpoint, str(p)).set(m)

    def multipliers(self, endpoint: str) -> Mapping[Priority, float]:
        """An endpoint's multipliers (all 1.0 for an endpoint never observed)."""
        state = self._states.get(endpoint)
        base = state.multipliers if state is not None else dict.fromkeys(PRIORITIES, 1.0)
        return MappingProxyType(dict(base))

    def forget(self, endpoint: str) -> None:
        """Drop a gone endpoint's state and metrics."""
        if self._states.pop(endpoint, None) is None:
            return
        with contextlib.suppress(KeyError):
            for p in PRIORITIES:
                self.metrics.multiplier.remove(endpoint, str(p))
            self.metrics.saturation.remove(endpoint)

    def endpoints(self) -> tuple[str, ...]:
        return tuple(sorted(self._states))

    def _snapshot(self, endpoint: str, state: _State) -> EndpointSnapshot:
        return EndpointSnapshot(
            endpoint=endpoint,
            multipliers=MappingProxyType(dict(state.multipliers)),
            regime=state.regime,
            regime_since=state.regime_since,
            saturation=state.saturation,
            last_sample=state.last_sample,
            last_sample_at=state.last_sample_at,
            version=state.version,
            changes=state.changes,
            suppressed=state.suppressed,
            budget_tokens=state.tokens,
            last_change_at=state.last_change_at,
            last_change_reason=state.last_change_reason,
            last_error=state.last_error,
        )

    def snapshot(self) -> ControllerSnapshot:
        """Every endpoint's state, frozen, with budgets refilled to now."""
        now = self._clock()
        endpoints = {}
        for endpoint, state in self._states.items():
            self._refill(state, now)
            endpoints[endpoint] = self._snapshot(endpoint, state)
        return ControllerSnapshot(
            at=now, settings=replace(self.settings), endpoints=MappingProxyType(endpoints)
        )
