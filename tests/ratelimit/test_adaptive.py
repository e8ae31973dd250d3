"""The adaptive controller, driven by sample series on a fake clock."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.model import Priority, ServiceConfig
from ratelimit.adaptive import (
    AdaptiveController,
    AdaptiveMetrics,
    AdaptiveSettings,
    Regime,
    SaturationSample,
    class_limits,
)

HOT = SaturationSample(waiting=20, running=8, kv_cache_usage=0.95)  # saturation 4.0
WARM = SaturationSample(waiting=4, running=8, kv_cache_usage=0.6)  # 0.8: between thresholds
COOL = SaturationSample(waiting=0, running=2, kv_cache_usage=0.1)  # 0.125
EP = "10.0.0.5:8000"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _run(
    controller: AdaptiveController,
    clock: FakeClock,
    samples: list[SaturationSample],
    every_s: float = 1.0,
) -> list[float]:
    """Feed samples at a fixed interval; return the times at which limits changed."""
    changed_at = []
    for sample in samples:
        clock.now += every_s
        if controller.observe(EP, sample).changed:
            changed_at.append(clock.now)
    return changed_at


def test_saturation_combines_queue_and_kv_cache() -> None:
    c = AdaptiveController(clock=FakeClock())
    assert c.saturation(SaturationSample(waiting=5, running=0)) == 1.0
    assert c.saturation(SaturationSample(waiting=0, running=99, kv_cache_usage=0.4)) == 0.5
    assert c.saturation(HOT) == 4.0


def test_saturation_tightens_sheddable_first_within_the_hold_time() -> None:
    clock = FakeClock()
    metrics = AdaptiveMetrics()
    c = AdaptiveController(AdaptiveSettings(tighten_hold_s=2.0), clock=clock, metrics=metrics)
    start = clock.now
    changed = _run(c, clock, [HOT] * 3)
    # First sample starts the overload; the step comes once it has held for 2 s.
    assert changed == [start + 3.0]
    m = c.multipliers(EP)
    assert (m[Priority.SHEDDABLE], m[Priority.STANDARD], m[Priority.CRITICAL]) == (0.5, 1.0, 1.0)
    snap = c.snapshot().endpoints[EP]
    assert snap.regime is Regime.OVERLOADED
    assert snap.last_change_reason.startswith("tighten: saturation 4.00 >= 1.0")
    assert "sheddable 1 -> 0.5" in snap.last_change_reason
    assert snap.version == 1
    r = metrics.registry
    assert (
        r.get_sample_value("inferlane_adaptive_limit_changes_total", {"direction": "tighten"}) == 1
    )
    assert (
        r.get_sample_value(
            "inferlane_adaptive_multiplier", {"endpoint": EP, "priority": "sheddable"}
        )
        == 0.5
    )


def test_sustained_overload_walks_down_the_classes_to_their_floors() -> None:
    clock = FakeClock()
    s = AdaptiveSettings(tighten_hold_s=1.0, max_changes_per_minute=60)
    c = AdaptiveController(s, clock=clock)
    _run(c, clock, [HOT] * 60)
    m = c.multipliers(EP)
    assert m[Priority.SHEDDABLE] == s.sheddable_floor
    assert m[Priority.STANDARD] == s.standard_floor
    # The critical floor holds, however long the overload lasts.
    assert m[Priority.CRITICAL] == s.critical_floor


def test_steady_band_holds_and_recovery_loosens_highest_class_first() -> None:
    clock = FakeClock()
    s = AdaptiveSettings(tighten_hold_s=1.0, loosen_hold_s=5.0, max_changes_per_minute=60)
    c = AdaptiveController(s, clock=clock)
    _run(c, clock, [HOT] * 30)
    low = dict(c.multipliers(EP))
    assert _run(c, clock, [WARM] * 30) == []  # hysteresis: no change between thresholds
    assert dict(c.multipliers(EP)) == low
    changed = _run(c, clock, [COOL] * 12)
    assert len(changed) == 2  # one step per 5 s hold
    m = c.multipliers(EP)
    assert m[Priority.CRITICAL] == 1.0  # 0.8 + 0.1 + 0.1, capped
    assert m[Priority.STANDARD] == s.standard_floor
    assert "loosen" in c.snapshot().endpoints[EP].last_change_reason
    _run(c, clock, [COOL] * 200)
    assert set(c.multipliers(EP).values()) == {1.0}  # fully recovered


def test_change_budget_bounds_changes_under_flapping_input() -> None:
    clock = FakeClock()
    metrics = AdaptiveMetrics()
    s = AdaptiveSettings(
        tighten_hold_s=0.0, loosen_hold_s=0.0, max_changes_per_minute=4, sheddable_floor=0.001
    )
    c = AdaptiveController(s, clock=clock, metrics=metrics)
    changed = _run(c, clock, [HOT, COOL] * 150)  # flips every second for 5 minutes
    duration = 300.0
    assert len(changed) <= s.max_changes_per_minute * (1 + duration / 60)
    # ...and no 60 s window holds more than the bucket depth plus a minute's refill.
    for t in changed:
        in_window = [x for x in changed if t <= x < t + 60]
        assert len(in_window) <= 2 * s.max_changes_per_minute
    suppressed = metrics.registry.get_sample_value(
        "inferlane_adaptive_limit_changes_suppressed_total"
    )
    assert suppressed is not None and suppressed > 0
    assert c.snapshot().endpoints[EP].suppressed == suppressed


def test_scrape_errors_and_gaps_restart_the_hold() -> None:
    clock = FakeClock()
    c = AdaptiveController(AdaptiveSettings(tighten_hold_s=2.0), clock=clock)
    _run(c, clock, [HOT])
    clock.now += 1
    step = c.observe_error(EP, "timed out")
    assert step.state.regime is Regime.UNKNOWN and step.state.last_error == "timed out"
    assert _run(c, clock, [HOT, HOT]) == []  # the hold restarted at the error
    clock.now += 100  # a long gap: the overload before it does not count
    assert _run(c, clock, [HOT]) == []
    assert c.multipliers(EP)[Priority.SHEDDABLE] == 1.0


@settings(max_examples=50)
@given(st.lists(st.sampled_from([HOT, WARM, COOL]), max_size=200))
def test_multipliers_stay_within_floors_whatever_the_input(samples: list[SaturationSample]) -> None:
    clock = FakeClock()
    s = AdaptiveSettings(tighten_hold_s=1.0, loosen_hold_s=2.0)
    c = AdaptiveController(s, clock=clock)
    _run(c, clock, samples)
    m = c.multipliers(EP)
    for p in Priority:
        assert s.floor(p) <= m[p] <= 1.0
    assert m[Priority.SHEDDABLE] <= m[Priority.STANDARD] or m[Priority.STANDARD] == 1.0


def test_forget_drops_state_and_metrics() -> None:
    clock = FakeClock()
    metrics = AdaptiveMetrics()
    c = AdaptiveController(clock=clock, metrics=metrics)
    c.observe(EP, HOT)
    c.forget(EP)
    assert c.endpoints() == ()
    assert (
        metrics.registry.get_sample_value("inferlane_adaptive_saturation", {"endpoint": EP}) is None
    )
    assert dict(c.multipliers(EP)) == dict.fromkeys(Priority, 1.0)


def test_snapshot_is_json_ready() -> None:
    import json

    clock = FakeClock()
    c = AdaptiveController(clock=clock)
    c.observe(EP, HOT)
    doc = json.loads(json.dumps(c.snapshot().to_dict()))
    assert doc["endpoints"][0]["endpoint"] == EP
    assert doc["endpoints"][0]["regime"] == "overloaded"


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="loosen_at"):
        AdaptiveController(AdaptiveSettings(loosen_at=2.0), clock=FakeClock())


def test_class_limits_scale_rates_and_concurrency_shares() -> None:
    config = ServiceConfig(
        enabled=True,
        adaptive=True,
        rate_limit=MappingProxyType({Priority.STANDARD: 20.0, Priority.SHEDDABLE: 5.0}),
        max_concurrency=64,
    )
    static = class_limits(config)
    assert dict(static.rate) == {Priority.STANDARD: 20.0, Priority.SHEDDABLE: 5.0}
    # critical is not capped: it has no share, and the Service names no cap for it.
    assert dict(static.concurrency) == {Priority.STANDARD: 48, Priority.SHEDDABLE: 32}
    tight = class_limits(
        config, {Priority.CRITICAL: 1.0, Priority.STANDARD: 0.5, Priority.SHEDDABLE: 0.125}
    )
    assert dict(tight.rate) == {Priority.STANDARD: 10.0, Priority.SHEDDABLE: 0.625}
    assert dict(tight.concurrency) == {Priority.STANDARD: 24, Priority.SHEDDABLE: 4}
    assert Priority.CRITICAL not in tight.rate  # never limited unless named
    # A cap the Service names replaces the share, and is scaled the same way; naming
    # critical caps it.
    named = dataclasses.replace(
        config,
        class_concurrency=MappingProxyType({Priority.CRITICAL: 60, Priority.SHEDDABLE: 10}),
    )
    assert dict(class_limits(named, {Priority.CRITICAL: 0.8}).concurrency) == {
        Priority.CRITICAL: 48,
        Priority.STANDARD: 48,
        Priority.SHEDDABLE: 10,
    }
    # Multipliers only apply to adaptive Services.
    fixed = class_limits(ServiceConfig(rate_limit=config.rate_limit), {Priority.STANDARD: 0.5})
    assert fixed.rate[Priority.STANDARD] == 20.0
