"""Rules: envoyproxy/ratelimit's matching, inferlane's rules from the world, parsing."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from mesh.model import InferenceService, Priority, ServiceConfig, World
from ratelimit.rules import (
    DomainRules,
    RateLimit,
    RuleError,
    RuleSet,
    Unit,
    limit_for_rate,
    override_rule,
    parse_domain,
    parse_rule_set,
    rules_from_world,
)

EXAMPLE = yaml.safe_load(
    """
domain: example
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: remote_address
    value: 50.0.0.5
    rate_limit: {unit: second, requests_per_unit: 0}
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit: {unit: day, requests_per_unit: 5}
  - key: to_number
    rate_limit: {unit: day, requests_per_unit: 100}
  - key: path
    value: /api/*
    rate_limit: {unit: minute, requests_per_unit: 20}
  - key: path
    value: /api/admin*
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: service
    descriptors:
      - key: user
        value: user-a
        shadow_mode: true
        rate_limit: {unit: second, requests_per_unit: 10}
  - key: ldap
    rate_limit: {unlimited: true}
"""
)


@pytest.fixture
def rules() -> DomainRules:
    parsed = parse_domain(EXAMPLE)
    assert isinstance(parsed, DomainRules), parsed
    return parsed


@pytest.mark.parametrize(
    ("entries", "name", "limit"),
    [
        ([("remote_address", "50.0.0.1")], "example.remote_address", 10),
        ([("remote_address", "50.0.0.5")], "example.remote_address_50.0.0.5", 0),
        (
            [("message_type", "marketing"), ("to_number", "2061111111")],
            "example.message_type_marketing.to_number",
            5,
        ),
        ([("to_number", "2061111111")], "example.to_number", 100),
        ([("path", "/api/users")], "example.path_/api/*", 20),
        ([("path", "/api/admin/x")], "example.path_/api/admin*", 2),
        ([("service", "auth"), ("user", "user-a")], "example.service.user_user-a", 10),
    ],
)
def test_most_specific_match_wins(
    rules: DomainRules, entries: list[tuple[str, str]], name: str, limit: int
) -> None:
    rule = rules.match(entries)
    assert rule is not None
    assert (rule.name, rule.limit.requests_per_unit) == (name, limit)


@pytest.mark.parametrize(
    "entries",
    [
        [("message_type", "marketing")],  # placeholder node without a limit
        [("message_type", "other"), ("to_number", "1")],  # no such value, no default
        [("remote_address", "1.2.3.4"), ("extra", "x")],  # deeper than the rule
        [("service", "auth")],  # shallower than the rule
        [("service", "auth"), ("user", "user-b")],  # no default user
        [("unknown", "x")],
        [],
    ],
)
def test_depth_and_value_must_match(rules: DomainRules, entries: list[tuple[str, str]]) -> None:
    assert rules.match(entries) is None


def test_shadow_and_unlimited_are_carried(rules: DomainRules) -> None:
    shadow = rules.match([("service", "auth"), ("user", "user-a")])
    assert shadow is not None and shadow.shadow_mode
    unlimited = rules.match([("ldap", "x")])
    assert unlimited is not None and unlimited.limit.unlimited


def test_rule_set_matches_by_domain(rules: DomainRules) -> None:
    rule_set = RuleSet.of(rules)
    assert rule_set.match([("to_number", "1")], domain="example") is not None
    assert rule_set.match([("to_number", "1")], domain="other") is None


def _service(ns: str, name: str, **limits: float) -> InferenceService:
    return InferenceService(
        namespace=ns,
        name=name,
        ports=(),
        config=ServiceConfig(
            enabled=True,
            global_rate_limit=MappingProxyType({Priority(k): v for k, v in limits.items()}),
        ),
    )


def test_rules_from_world_count_per_caller_and_class() -> None:
    world = World(
        services=(
            _service("default", "llama", sheddable=100, standard=2.5),
            _service("default", "plain"),
        )
    )
    rules = rules_from_world(world)
    shed = rules.match([("service", "default/llama"), ("caller", "a/x"), ("priority", "sheddable")])
    assert shed is not None
    assert shed.limit == RateLimit(requests_per_unit=100, unit=Unit.SECOND)
    assert shed.name == "inferlane.service_default/llama.caller.priority_sheddable"
    std = rules.match([("service", "default/llama"), ("caller", "b/y"), ("priority", "standard")])
    assert std is not None and std.limit == RateLimit(150, Unit.MINUTE)
    # critical is not named: never limited; a Service without limits has no rules.
    assert (
        rules.match([("service", "default/llama"), ("caller", "a/x"), ("priority", "critical")])
        is None
    )
    assert (
        rules.match([("service", "default/plain"), ("caller", "a/x"), ("priority", "sheddable")])
        is None
    )
    # The rules print in the format they are read in.
    again = parse_domain(rules.domains["inferlane"].to_dict())
    assert again == rules.domains["inferlane"]


@pytest.mark.parametrize(
    ("rps", "expected"),
    [
        (100, RateLimit(100, Unit.SECOND)),
        (2.5, RateLimit(150, Unit.MINUTE)),
        (0.5, RateLimit(30, Unit.MINUTE)),
        (1 / 60, RateLimit(1, Unit.MINUTE)),
        (0.001, RateLimit(86, Unit.DAY)),  # whole in no window: the day count, rounded
        (1e-9, RateLimit(1, Unit.DAY)),
        (0, None),
        (-1, None),
        (float("nan"), None),
    ],
)
def test_limit_for_rate(rps: float, expected: RateLimit | None) -> None:
    assert limit_for_rate(rps) == expected


def test_override_rule_names_the_descriptor() -> None:
    rule = override_rule("d", [("a", "1"), ("b", "")], 7, Unit.HOUR)
    assert rule.name == "d.a_1.b"
    assert rule.limit == RateLimit(7, Unit.HOUR)


_RL = "descriptors[0].rate_limit"


def _limited(limit: Any) -> dict[str, Any]:
    return {"domain": "d", "descriptors": [{"key": "k", "rate_limit": limit}]}


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ([], ""),
        ({"descriptors": []}, ""),
        ({"domain": ""}, "domain"),
        ({"domain": "d", "extra": 1}, ""),
        ({"domain": "d", "descriptors": {}}, "descriptors"),
        ({"domain": "d", "descriptors": [{"value": "x"}]}, "descriptors[0]"),
        (_limited({"unit": "fortnight", "requests_per_unit": 1}), f"{_RL}.unit"),
        (_limited({"unit": "second", "requests_per_unit": -1}), f"{_RL}.requests_per_unit"),
        (_limited({"unit": "second", "requests_per_unit": "5"}), f"{_RL}.requests_per_unit"),
        (_limited({"unit": "second"}), f"{_RL}.requests_per_unit"),
        (_limited({"requests_per_unit": 1}), _RL),
        (_limited([1]), _RL),
        ({"domain": "d", "descriptors": [{"key": "k"}, {"key": "k"}]}, "descriptors[1]"),
        (
            {"domain": "d", "descriptors": [{"key": "k", "shadow_mode": "yes"}]},
            "descriptors[0].shadow_mode",
        ),
    ],
)
def test_bad_documents_become_errors_with_a_path(doc: Any, path: str) -> None:
    err = parse_domain(doc)
    assert isinstance(err, RuleError)
    assert err.path == path, err


def test_rule_set_refuses_duplicate_domains() -> None:
    err = parse_rule_set([{"domain": "a"}, {"domain": "a"}])
    assert isinstance(err, RuleError) and err.path == "[1].domain"
    ok = parse_rule_set([{"domain": "a"}, {"domain": "b"}])
    assert isinstance(ok, RuleSet) and set(ok.domains) == {"a", "b"}


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "domain",
                    "descriptors",
                    "key",
                    "value",
                    "rate_limit",
                    "unit",
                    "requests_per_unit",
                    "shadow_mode",
                    "unlimited",
                    "x",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@given(_json)
def test_parsing_never_raises(doc: Any) -> None:
    result = parse_domain(doc)
    assert isinstance(result, DomainRules | RuleError)


_keys = st.text(alphabet="abc_", min_size=1, max_size=3)


@st.composite
def _descriptors(draw: st.DrawFn, depth: int = 0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(draw(st.integers(0, 3 if depth < 2 else 0))):
        d: dict[str, Any] = {"key": draw(_keys)}
        value = draw(st.text(alphabet="xy*", max_size=2))
        if value:
            d["value"] = value
        composite = f"{d['key']}_{value}" if value else d["key"]
        if composite in seen:
            continue
        seen.add(composite)
        if draw(st.booleans()):
            d["rate_limit"] = {
                "unit": draw(st.sampled_from([u.value for u in Unit])),
                "requests_per_unit": draw(st.integers(0, 1000)),
            }
        if draw(st.booleans()):
            d["shadow_mode"] = True
        children = draw(_descriptors(depth + 1))
        if children:
            d["descriptors"] = children
        out.append(d)
    return out


@given(_descriptors(), st.lists(st.tuples(_keys, st.text(alphabet="xy", max_size=2)), max_size=3))
def test_valid_documents_round_trip_and_match_without_raising(
    descriptors: list[dict[str, Any]], entries: list[tuple[str, str]]
) -> None:
    parsed = parse_domain({"domain": "d", "descriptors": descriptors})
    assert isinstance(parsed, DomainRules), parsed
    assert parse_domain(parsed.to_dict()) == parsed
    rule = parsed.match(entries)
    if rule is not None:
        assert rule.name.startswith("d.")
        assert len(entries) == rule.name.count(".")
