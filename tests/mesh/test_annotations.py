"""parse_service_config: the SPEC's annotation table, bad values, and a fuzz test."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.annotations import KNOWN_ANNOTATIONS, PREFIX, parse_service_config
from mesh.model import (
    DEFAULT_TIMEOUT_S,
    BudgetTier,
    MtlsMode,
    Priority,
    SchedulingPolicy,
    ServiceConfig,
    TokenBudget,
)

C, S, H = Priority.CRITICAL, Priority.STANDARD, Priority.SHEDDABLE


def test_no_annotations_gives_the_spec_defaults() -> None:
    config, errors = parse_service_config({})
    assert errors == ()
    assert config == ServiceConfig()
    assert not config.enabled
    assert config.default_priority is S
    assert config.critical_callers == ()
    assert dict(config.rate_limit) == {}
    assert config.max_concurrency is None
    assert not config.adaptive
    assert config.mtls is MtlsMode.PERMISSIVE
    assert config.timeout_for(C) == DEFAULT_TIMEOUT_S == 300.0


def test_a_full_set_of_good_annotations() -> None:
    config, errors = parse_service_config(
        {
            "inferlane.io/enabled": "true",
            "inferlane.io/default-priority": "Sheddable",
            "inferlane.io/critical-callers": " default/chat-frontend , ops/* ,"
            "spiffe://cluster.local/ns/web/sa/gateway",
            "inferlane.io/rate-limit": "standard=20, SHEDDABLE=5.5",
            "inferlane.io/max-concurrency": "64",
            "inferlane.io/adaptive": "TRUE",
            "inferlane.io/global-rate-limit": "sheddable=100",
            "inferlane.io/mtls": "Strict",
            "inferlane.io/timeout": "critical=30s,sheddable=2m",
            "app.kubernetes.io/name": "ignored",
        }
    )
    assert errors == ()
    assert config.enabled
    assert config.default_priority is H
    assert config.critical_callers == (
        "default/chat-frontend",
        "ops/*",
        "spiffe://cluster.local/ns/web/sa/gateway",
    )
    assert dict(config.rate_limit) == {S: 20.0, H: 5.5}
    assert config.max_concurrency == 64
    assert config.adaptive
    assert dict(config.global_rate_limit) == {H: 100.0}
    assert config.mtls is MtlsMode.STRICT
    assert config.timeout_for(C) == 30.0
    assert config.timeout_for(H) == 120.0
    assert config.timeout_for(S) == DEFAULT_TIMEOUT_S


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("1.5m", 90.0),
        ("500ms", 0.5),
        ("2h", 7200.0),
        ("1m30s", 90.0),
        ("0.25s", 0.25),
        ("10S", 10.0),
    ],
)
def test_timeout_durations(value: str, seconds: float) -> None:
    config, errors = parse_service_config({"inferlane.io/timeout": f"critical={value}"})
    assert errors == ()
    assert config.timeout_for(C) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("annotation", "value", "fragment"),
    [
        ("enabled", "yes", '"true" or "false"'),
        ("enabled", "", '"true" or "false"'),
        ("adaptive", "1", '"true" or "false"'),
        ("default-priority", "urgent", "unknown class"),
        ("mtls", "required", '"strict" or "permissive"'),
        ("max-concurrency", "0", "positive whole number"),
        ("max-concurrency", "-3", "positive whole number"),
        ("max-concurrency", "2.5", "positive whole number"),
        ("max-concurrency", "99999999999", "at most"),
        ("max-concurrency", "8,4", "total twice"),
        ("max-concurrency", "8,sheddable=0", "positive whole number"),
        ("max-concurrency", "8,urgent=2", "not a class"),
        ("max-concurrency", "8,sheddable=2,Sheddable=3", "given twice"),
        ("max-concurrency", ",", "positive whole number"),
        ("scheduling-policy", "lifo", '"fcfs" or "priority"'),
        ("rate-limit", "standard", "not class=value"),
        ("rate-limit", "standard=0", "positive"),
        ("rate-limit", "standard=-1", "not a number"),
        ("rate-limit", "standard=inf", "not a number"),
        ("rate-limit", "standard=nan", "not a number"),
        ("rate-limit", "standard=1e999", "finite"),
        ("rate-limit", "standard=1_000", "not a number"),
        ("rate-limit", "standard=\u0661", "not a number"),
        ("rate-limit", "urgent=5", "not a class"),
        ("rate-limit", "standard=1,standard=2", "given twice"),
        ("global-rate-limit", "sheddable=abc", "not a number"),
        ("timeout", "critical=30", "not a duration"),
        ("timeout", "critical=0s", "positive"),
        ("timeout", "critical=-5s", "not a duration"),
        ("timeout", "critical=30 s", "not a duration"),
        ("timeout", "critical=1d", "not a duration"),
        ("timeout", "critical=9999h", "maximum"),
        ("critical-callers", "chat-frontend", "namespace/serviceaccount"),
        ("critical-callers", "Default/chat", "not a valid namespace"),
        ("critical-callers", "default/chat_frontend", "not a valid service account"),
        ("critical-callers", "default/", "namespace/serviceaccount"),
        ("critical-callers", "spiffe://td/ns/x", "spiffe://TRUST_DOMAIN"),
        ("critical-callers", "spiffe://td/ns/X/sa/y", "not a valid name"),
        ("token-budget", "default/chat", "not CALLER=TOKENS/WINDOW"),
        ("token-budget", "default/chat=100", "window must be"),
        ("token-budget", "default/chat=100/d", "window must be"),
        ("token-budget", "default/chat=100/60s", "window must be"),
        ("token-budget", "default/chat=0/m", "1 to 4294967295"),
        ("token-budget", "default/chat=1.5/m", "1 to 4294967295"),
        ("token-budget", "default/chat=99999999999/m", "1 to 4294967295"),
        ("token-budget", "chat=100/m", "or *"),
        ("token-budget", "urgent:default/chat=100/m", "not a valid namespace"),
        ("token-budget", "*=1/m,* = 2/h", "* is given twice"),
        ("token-budget", "critical:*=1/m,critical:*=2/h", "critical:* is given twice"),
        ("default-max-tokens", "0", "1 to 10000000"),
        ("default-max-tokens", "lots", "1 to 10000000"),
    ],
)
def test_a_bad_value_is_one_error_and_its_default(
    annotation: str, value: str, fragment: str
) -> None:
    key = PREFIX + annotation
    good = {"inferlane.io/enabled": "true", "inferlane.io/mtls": "strict"}
    config, errors = parse_service_config({**good, key: value})
    assert len(errors) == 1
    (error,) = errors
    assert error.annotation == key
    assert error.value == value.strip()
    assert fragment in error.message
    assert key in str(error)
    field = {
        "enabled": "enabled",
        "adaptive": "adaptive",
        "default-priority": "default_priority",
        "mtls": "mtls",
        "max-concurrency": "max_concurrency",
        "rate-limit": "rate_limit",
        "global-rate-limit": "global_rate_limit",
        "timeout": "timeouts",
        "critical-callers": "critical_callers",
        "scheduling-policy": "scheduling",
        "token-budget": "token_budgets",
        "default-max-tokens": "default_max_tokens",
    }[annotation]
    defaults = ServiceConfig()
    assert getattr(config, field) == getattr(defaults, field)
    # The other annotations are unaffected.
    if annotation != "enabled":
        assert config.enabled
    if annotation != "mtls":
        assert config.mtls is MtlsMode.STRICT


@pytest.mark.parametrize(
    ("value", "total", "per_class"),
    [
        ("64", 64, {}),
        ("64, sheddable=8", 64, {H: 8}),
        ("Critical=100,sheddable=4", None, {C: 100, H: 4}),
        ("standard=6,32", 32, {S: 6}),
    ],
)
def test_max_concurrency_takes_a_total_and_caps_per_class(
    value: str, total: int | None, per_class: dict[Priority, int]
) -> None:
    config, errors = parse_service_config({"inferlane.io/max-concurrency": value})
    assert errors == ()
    assert config.max_concurrency == total
    assert dict(config.class_concurrency) == per_class


def test_class_caps_default_to_shares_and_critical_to_none() -> None:
    config, _ = parse_service_config({"inferlane.io/max-concurrency": "64,sheddable=8"})
    assert config.concurrency_for(C) is None
    assert config.concurrency_for(S) == 48.0
    assert config.concurrency_for(H) == 8.0
    named, _ = parse_service_config({"inferlane.io/max-concurrency": "critical=60"})
    assert (named.concurrency_for(C), named.concurrency_for(S)) == (60.0, None)


def test_scheduling_policy() -> None:
    assert parse_service_config({})[0].scheduling is SchedulingPolicy.FCFS
    config, errors = parse_service_config({"inferlane.io/scheduling-policy": "Priority"})
    assert errors == ()
    assert config.scheduling is SchedulingPolicy.PRIORITY


@pytest.mark.parametrize(
    ("others", "steers"),
    [
        ({}, False),
        ({"inferlane.io/max-concurrency": "8"}, True),
        ({"inferlane.io/max-concurrency": "sheddable=2"}, True),
        ({"inferlane.io/rate-limit": "sheddable=5"}, True),
        ({"inferlane.io/rate-limit": "sheddable=fast"}, False),
    ],
)
def test_adaptive_needs_a_limit_to_steer(others: dict[str, str], steers: bool) -> None:
    config, errors = parse_service_config({"inferlane.io/adaptive": "true", **others})
    assert config.adaptive is steers
    adaptive_errors = [e for e in errors if e.annotation == "inferlane.io/adaptive"]
    if steers:
        assert not adaptive_errors
    else:
        (error,) = adaptive_errors
        assert "nothing to steer" in error.message
    assert [e.annotation for e in errors] == sorted(e.annotation for e in errors)


def test_several_bad_values_give_several_errors_sorted_by_annotation() -> None:
    config, errors = parse_service_config(
        {
            "inferlane.io/timeout": "critical=forever",
            "inferlane.io/enabled": "true",
            "inferlane.io/rate-limit": "standard=fast",
        }
    )
    assert config.enabled
    assert [e.annotation for e in errors] == ["inferlane.io/rate-limit", "inferlane.io/timeout"]


def test_unknown_inferlane_keys_are_errors_with_a_suggestion() -> None:
    config, errors = parse_service_config(
        {"inferlane.io/enabled": "true", "inferlane.io/ratelimit": "standard=5"}
    )
    assert config.enabled
    assert dict(config.rate_limit) == {}
    (error,) = errors
    assert error.annotation == "inferlane.io/ratelimit"
    assert "unknown" in error.message
    assert "did you mean inferlane.io/rate-limit?" in error.message


def test_empty_list_values_mean_the_default_without_error() -> None:
    config, errors = parse_service_config(
        {"inferlane.io/critical-callers": " ", "inferlane.io/rate-limit": ""}
    )
    assert errors == ()
    assert config.critical_callers == ()


def test_critical_callers_are_normalised_and_deduplicated() -> None:
    config, errors = parse_service_config({"inferlane.io/critical-callers": "a/b,  a / b ,c/*,a/b"})
    assert errors == ()
    assert config.critical_callers == ("a/b", "c/*")


def test_yaml_scalars_are_read_as_kubernetes_would_print_them() -> None:
    raw: dict[str, Any] = {
        "inferlane.io/enabled": True,
        "inferlane.io/max-concurrency": 8,
        "inferlane.io/adaptive": ["true"],
    }
    config, errors = parse_service_config(raw)
    assert config.enabled
    assert config.max_concurrency == 8
    (error,) = errors
    assert error.annotation == "inferlane.io/adaptive"
    assert "string" in error.message


def test_long_values_are_elided_in_errors() -> None:
    _, errors = parse_service_config({"inferlane.io/mtls": "x" * 5000})
    assert len(errors[0].value) < 300


def test_every_known_annotation_is_in_the_spec_table() -> None:
    assert set(KNOWN_ANNOTATIONS) == {
        PREFIX + name
        for name in (
            "enabled",
            "default-priority",
            "critical-callers",
            "rate-limit",
            "max-concurrency",
            "adaptive",
            "global-rate-limit",
            "mtls",
            "scheduling-policy",
            "timeout",
            "token-budget",
            "default-max-tokens",
        )
    }


def test_token_budgets_as_spec_writes_them() -> None:
    config, errors = parse_service_config(
        {
            "inferlane.io/token-budget": " default/chat-frontend=200000/m, *=20000/M,"
            "critical:spiffe://cluster.local/ns/web/sa/gw=50/s, CRITICAL:ops/*=9/h",
            "inferlane.io/default-max-tokens": "512",
        }
    )
    assert errors == ()
    assert config.token_budgets == (
        TokenBudget("default/chat-frontend", 200000, 60),
        TokenBudget("*", 20000, 60),
        TokenBudget("web/gw", 50, 1, BudgetTier.CRITICAL),
        TokenBudget("ops/*", 9, 3600, BudgetTier.CRITICAL),
    )
    assert config.default_max_tokens == 512
    assert [b.name for b in config.token_budgets] == [
        "default/chat-frontend",
        "*",
        "critical:web/gw",
        "critical:ops/*",
    ]


@pytest.mark.parametrize(
    ("priority", "caller", "expected"),
    [
        # The most specific entry of the request's tier wins: exact, then namespace, then *.
        (S, "default/chat", "default/chat"),
        (H, "default/chat", "default/chat"),
        (S, "default/batch", "default/*"),
        (S, "team-a/batch", "*"),
        # critical draws only on critical: entries; none names default/chat.
        (C, "default/chat", None),
        (C, "ops/pager", "critical:ops/pager"),
        (C, "ops/other", None),
    ],
)
def test_which_budget_a_request_draws_on(
    priority: Priority, caller: str, expected: str | None
) -> None:
    config, errors = parse_service_config(
        {"inferlane.io/token-budget": "*=1/m,default/*=2/m,default/chat=3/m,critical:ops/pager=4/m"}
    )
    assert errors == ()
    budget = config.token_budget_for(priority, caller)
    assert (budget.name if budget else None) == expected


_keys = st.one_of(
    st.sampled_from(KNOWN_ANNOTATIONS),
    st.text(max_size=30).map(lambda s: PREFIX + s),
    st.text(max_size=30),
)
_values = st.one_of(
    st.text(max_size=60),
    st.from_regex(r"(critical|standard|sheddable|x)=[0-9.e+-]{0,6}(ms|s|m|h)?", fullmatch=True),
    st.integers(),
    st.booleans(),
    st.none(),
    st.floats(),
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=12))
def test_fuzz_never_raises_and_errors_name_bad_annotations(raw: dict[str, object]) -> None:
    config, errors = parse_service_config(raw)
    assert isinstance(config, ServiceConfig)
    inferlane_keys = {k for k in raw if k.startswith(PREFIX)}
    assert {e.annotation for e in errors} <= inferlane_keys
    assert len(errors) == len({e.annotation for e in errors})
    for rate in (*config.rate_limit.values(), *config.global_rate_limit.values()):
        assert rate > 0
    assert all(t > 0 for t in config.timeouts.values())
    # Deterministic: the same input gives the same result.
    assert parse_service_config(dict(raw)) == (config, errors)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=8))
def test_fuzz_non_inferlane_keys_never_matter(raw: dict[str, str]) -> None:
    others = {k: v for k, v in raw.items() if not k.startswith(PREFIX)}
    assert parse_service_config(others) == (ServiceConfig(), ())
