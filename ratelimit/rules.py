"""Rate-limit rules for the global service, in envoyproxy/ratelimit's format and semantics.

A *domain* holds a tree of descriptor nodes. Each node has a ``key``, an optional
``value``, an optional ``rate_limit`` (``unit`` and ``requests_per_unit``, or
``unlimited``), an optional ``shadow_mode`` and nested ``descriptors``. A request's
descriptor, a list of (key, value) entries, walks the tree one level per entry:

- at each level the most specific node wins: ``key_value`` first, then a value ending
  in ``*`` that prefixes the entry's value, then the bare ``key`` (any value);
- the limit applies only if the node reached by the *last* entry carries one; a
  descriptor shorter or longer than the rule's depth matches nothing;
- an unmatched descriptor is not limited.

A node without a value counts each distinct value separately: the counter key holds the
request's values, so ``caller`` with no value gives every caller its own counter. Rule
names (for metrics) follow envoyproxy/ratelimit: ``domain.key_value.key...``, with the
value left out where the node has none, so metrics stay bounded by the rules, not the
callers.

:func:`rules_from_world` builds inferlane's rules. Under ``service=NS/NAME``: for a
``global_rate_limit``, ``caller (any) -> priority=CLASS`` with the class's limit; for a
``token-budget``, ``tokens=TIER -> caller`` with each entry's tokens per window, the
caller node's value as the entry names it (``ns/sa`` exactly, ``ns/*`` as a prefix, ``*``
as any value), so that the most specific entry wins as
:meth:`mesh.model.ServiceConfig.token_budget_for` chooses it. A budget's limit is named
``NS/NAME:ENTRY`` (``default/llama:critical:default/chat``), the name Envoy's
``x-ratelimit-limit`` header and the token metrics show. :func:`parse_domain` reads the
YAML-shaped format (as envoyproxy/ratelimit loads it) and returns a :class:`RuleError`
value instead of raising.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Any

from mesh.model import PRIORITIES, BudgetTier, InferenceService, TokenBudget, World
from ratelimit.local import CALLER_KEY, DOMAIN, PRIORITY_KEY, SERVICE_KEY
from ratelimit.tokens import TOKENS_KEY

#: requests_per_unit is a uint32 in Envoy's API.
MAX_REQUESTS_PER_UNIT = 2**32 - 1

Entry = tuple[str, str]


class Unit(enum.StrEnum):
    """A fixed window's length, as envoyproxy/ratelimit and Envoy's RLS API name them."""

    SECOND = "second"
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    #: As envoyproxy/ratelimit counts them: a week of 7 days, a month of 30, a year of 365.
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"

    @property
    def seconds(self) -> int:
        return _UNIT_SECONDS[self]


_UNIT_SECONDS = {
    Unit.SECOND: 1,
    Unit.MINUTE: 60,
    Unit.HOUR: 3600,
    Unit.DAY: 86400,
    Unit.WEEK: 7 * 86400,
    Unit.MONTH: 30 * 86400,
    Unit.YEAR: 365 * 86400,
}
#: The windows :func:`limit_for_rate` chooses from, shortest first.
_RATE_UNITS = (Unit.SECOND, Unit.MINUTE, Unit.HOUR, Unit.DAY)
_UNIT_OF_SECONDS = {unit.seconds: unit for unit in _RATE_UNITS}


@dataclass(frozen=True)
class RateLimit:
    """``requests_per_unit`` per fixed ``unit`` window, or no limit at all (``unlimited``)."""

    requests_per_unit: int
    unit: Unit = Unit.SECOND
    unlimited: bool = False
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        if self.unlimited:
            return {"unlimited": True}
        out: dict[str, Any] = {"unit": str(self.unit), "requests_per_unit": self.requests_per_unit}
        if self.name:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class Rule:
    """What one descriptor matched: the limit, and the name it is counted under."""

    name: str
    limit: RateLimit
    shadow_mode: bool = False


@dataclass(frozen=True)
class Descriptor:
    """One node of a domain's descriptor tree."""

    key: str
    value: str = ""
    rate_limit: RateLimit | None = None
    shadow_mode: bool = False
    descriptors: tuple[Descriptor, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key}
        if self.value:
            out["value"] = self.value
        if self.rate_limit is not None:
            out["rate_limit"] = self.rate_limit.to_dict()
        if self.shadow_mode:
            out["shadow_mode"] = True
        if self.descriptors:
            out["descriptors"] = [d.to_dict() for d in self.descriptors]
        return out


@dataclass(frozen=True)
class RuleError:
    """Why a rule document was refused, and where (a dotted path into it)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass(frozen=True)
class _Node:
    """A compiled descriptor: children indexed as envoyproxy/ratelimit looks them up."""

    name: str
    rule: Rule | None
    exact: Mapping[str, _Node]  # "key_value" and bare "key"
    wildcards: tuple[tuple[str, str, _Node], ...]  # (key, value prefix, node), longest first


def _compile(parent_name: str, descriptors: Sequence[Descriptor]) -> _Node:
    exact: dict[str, _Node] = {}
    wildcards: list[tuple[str, str, _Node]] = []
    for d in descriptors:
        name = f"{parent_name}.{d.key}_{d.value}" if d.value else f"{parent_name}.{d.key}"
        child = _compile(name, d.descriptors)
        rule = None
        if d.rate_limit is not None:
            rule = Rule(name=name, limit=d.rate_limit, shadow_mode=d.shadow_mode)
        node = _Node(name=name, rule=rule, exact=child.exact, wildcards=child.wildcards)
        if d.value.endswith("*"):
            wildcards.append((d.key, d.value[:-1], node))
        else:
            exact[f"{d.key}_{d.value}" if d.value else d.key] = node
    wildcards.sort(key=lambda w: len(w[1]), reverse=True)
    return _Node(
        name=parent_name, rule=None, exact=MappingProxyType(exact), wildcards=tuple(wildcards)
    )


@dataclass(frozen=True)
class DomainRules:
    """One domain's descriptor tree, compiled for lookups. Immutable: swap, never mutate."""

    domain: str
    descriptors: tuple[Descriptor, ...] = ()
    _root: _Node = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_root", _compile(self.domain, self.descriptors))

    def match(self, entries: Sequence[Entry]) -> Rule | None:
        """The rule for a descriptor's (key, value) entries, or None if it has none."""
        node = self._root
        rule: Rule | None = None
        for i, (key, value) in enumerate(entries):
            nxt = node.exact.get(f"{key}_{value}")
            if nxt is None:
                nxt = next(
                    (n for k, prefix, n in node.wildcards if k == key and value.startswith(prefix)),
                    None,
                )
            if nxt is None:
                nxt = node.exact.get(key)
            if nxt is None:
                return None
            if i == len(entries) - 1:
                rule = nxt.rule
            node = nxt
        return rule

    def to_dict(self) -> dict[str, Any]:
        """The YAML-shaped form :func:`parse_domain` reads (for debug pages and dumps)."""
        return {"domain": self.domain, "descriptors": [d.to_dict() for d in self.descriptors]}


@dataclass(frozen=True)
class RuleSet:
    """The rules of every domain the service answers for."""

    domains: Mapping[str, DomainRules] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(cls, *domains: DomainRules) -> RuleSet:
        return cls(MappingProxyType({d.domain: d for d in domains}))

    def match(self, entries: Sequence[Entry], domain: str = DOMAIN) -> Rule | None:
        """The rule for ``entries`` in ``domain``; None for an unknown domain or no match."""
        rules = self.domains.get(domain)
        return rules.match(entries) if rules is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {"domains": [self.domains[d].to_dict() for d in sorted(self.domains)]}


def override_rule(
    domain: str, entries: Sequence[Entry], requests_per_unit: int, unit: Unit
) -> Rule:
    """The rule for a descriptor that carries its own limit (Envoy's ``limit`` override).

    As envoyproxy/ratelimit does, such a descriptor bypasses the configured tree and is
    counted under ``domain.key_value...`` of its own entries.
    """
    name = ".".join([domain, *(f"{k}_{v}" if v else k for k, v in entries)])
    return Rule(name=name, limit=RateLimit(requests_per_unit=requests_per_unit, unit=unit))


def limit_for_rate(rps: float) -> RateLimit | None:
    """A fixed-window limit for ``rps`` requests per second; None if not positive and finite.

    Windows hold whole requests. The shortest window (second, minute, hour, day) in which
    the rate is a whole number of requests is used, so 100 rps is 100 per second and 2.5
    rps is 150 per minute. A rate that is whole in none of them (nor is its nearest
    fraction with a denominator up to a million) gets its per-day count, rounded, at
    least 1.
    """
    if not math.isfinite(rps) or rps <= 0:
        return None
    rate = Fraction(repr(float(rps)))
    # A computed float (1/60 = 0.01666...) is tried as the nearest simple fraction too.
    for candidate in (rate, rate.limit_denominator(10**6)):
        for unit in _RATE_UNITS:
            count = candidate * unit.seconds
            if count.denominator == 1 and 0 < count <= MAX_REQUESTS_PER_UNIT:
                return RateLimit(requests_per_unit=int(count), unit=unit)
    per_day = max(1, round(rate * Unit.DAY.seconds))
    return RateLimit(requests_per_unit=min(per_day, MAX_REQUESTS_PER_UNIT), unit=Unit.DAY)


def rules_from_world(world: World, domain: str = DOMAIN) -> RuleSet:
    """inferlane's global rules: per Service, its request limits and its token budgets."""
    services: list[Descriptor] = []
    for svc in sorted(world.services, key=lambda s: s.key):
        children = [*_request_limits(svc), *_token_budgets(svc)]
        if children:
            services.append(
                Descriptor(
                    key=SERVICE_KEY,
                    value=f"{svc.namespace}/{svc.name}",
                    descriptors=tuple(children),
                )
            )
    return RuleSet.of(DomainRules(domain=domain, descriptors=tuple(services)))


def _request_limits(svc: InferenceService) -> list[Descriptor]:
    """``caller (any) -> priority=CLASS`` per class the global limit names."""
    limits = svc.config.global_rate_limit
    classes: list[Descriptor] = []
    for priority in PRIORITIES:
        if priority not in limits:
            continue
        limit = limit_for_rate(limits[priority])
        if limit is not None:
            classes.append(Descriptor(key=PRIORITY_KEY, value=str(priority), rate_limit=limit))
    return [Descriptor(key=CALLER_KEY, descriptors=tuple(classes))] if classes else []


def budget_name(svc: InferenceService, budget: TokenBudget) -> str:
    """A budget's name: ``NS/NAME:ENTRY``, where ENTRY is :attr:`TokenBudget.name`."""
    return f"{svc.namespace}/{svc.name}:{budget.name}"


def _token_budgets(svc: InferenceService) -> list[Descriptor]:
    """``tokens=TIER -> caller`` per tier the Service's budgets name."""
    out = []
    for tier in BudgetTier:
        callers = tuple(
            Descriptor(
                key=CALLER_KEY,
                value="" if budget.caller == "*" else budget.caller,
                rate_limit=RateLimit(
                    requests_per_unit=budget.tokens,
                    unit=_UNIT_OF_SECONDS[budget.window_s],
                    name=budget_name(svc, budget),
                ),
            )
            for budget in svc.config.token_budgets
            if budget.tier is tier
        )
        if callers:
            out.append(Descriptor(key=TOKENS_KEY, value=str(tier), descriptors=callers))
    return out


# --- Parsing the YAML-shaped format -----------------------------------------------------

_DESCRIPTOR_KEYS = {"key", "value", "rate_limit", "shadow_mode", "descriptors", "detailed_metric"}
_LIMIT_KEYS = {"unit", "requests_per_unit", "unlimited", "name", "replaces"}


class _Invalid(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.error = RuleError(path, message)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _mapping(obj: object, path: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise _Invalid(path, "must be a map with string keys")
    return obj


def _check_keys(obj: Mapping[str, Any], allowed: set[str], path: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _Invalid(path, f"unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")


def _string(obj: Mapping[str, Any], key: str, path: str, *, required: bool) -> str:
    raw = obj.get(key)
    if raw is None:
        if required:
            raise _Invalid(path, f"{key!r} is required")
        return ""
    if not isinstance(raw, str):
        raise _Invalid(_join(path, key), "must be a string")
    if required and not raw:
        raise _Invalid(_join(path, key), "must not be empty")
    return raw


def _bool(obj: Mapping[str, Any], key: str, path: str) -> bool:
    raw = obj.get(key, False)
    if not isinstance(raw, bool):
        raise _Invalid(_join(path, key), "must be true or false")
    return raw


def _parse_limit(obj: object, path: str) -> RateLimit:
    limit = _mapping(obj, path)
    _check_keys(limit, _LIMIT_KEYS, path)
    name = _string(limit, "name", path, required=False)
    if _bool(limit, "unlimited", path):
        return RateLimit(requests_per_unit=0, unlimited=True, name=name)
    unit_raw = _string(limit, "unit", path, required=True)
    try:
        unit = Unit(unit_raw.lower())
    except ValueError:
        raise _Invalid(
            _join(path, "unit"), f"{unit_raw!r} is not one of {', '.join(u.value for u in Unit)}"
        ) from None
    count = limit.get("requests_per_unit")
    if isinstance(count, bool) or not isinstance(count, int):
        raise _Invalid(_join(path, "requests_per_unit"), "must be a whole number")
    if not 0 <= count <= MAX_REQUESTS_PER_UNIT:
        raise _Invalid(_join(path, "requests_per_unit"), f"must be 0 to {MAX_REQUESTS_PER_UNIT}")
    return RateLimit(requests_per_unit=count, unit=unit, name=name)


def _parse_descriptors(obj: object, path: str) -> tuple[Descriptor, ...]:
    if obj is None:
        return ()
    if not isinstance(obj, list):
        raise _Invalid(path, "must be a list")
    out: list[Descriptor] = []
    seen: set[str] = set()
    for i, item in enumerate(obj):
        item_path = f"{path}[{i}]"
        d = _mapping(item, item_path)
        _check_keys(d, _DESCRIPTOR_KEYS, item_path)
        key = _string(d, "key", item_path, required=True)
        raw_value = d.get("value")
        if isinstance(raw_value, int) and not isinstance(raw_value, bool):
            value = str(raw_value)  # YAML reads `value: 5` as a number; envoyproxy as text
        else:
            value = _string(d, "value", item_path, required=False)
        composite = f"{key}_{value}" if value else key
        if composite in seen:
            raise _Invalid(item_path, f"duplicate descriptor {composite!r}")
        seen.add(composite)
        raw_limit = d.get("rate_limit")
        out.append(
            Descriptor(
                key=key,
                value=value,
                rate_limit=None
                if raw_limit is None
                else _parse_limit(raw_limit, f"{item_path}.rate_limit"),
                shadow_mode=_bool(d, "shadow_mode", item_path),
                descriptors=_parse_descriptors(d.get("descriptors"), f"{item_path}.descriptors"),
            )
        )
    return tuple(out)


def parse_domain(obj: object) -> DomainRules | RuleError:
    """Read one domain document (``{domain, descriptors: [...]}``, parsed YAML or JSON).

    Never raises: a bad document gives a :class:`RuleError` naming the offending path.
    """
    try:
        doc = _mapping(obj, "")
        _check_keys(doc, {"domain", "descriptors"}, "")
        domain = _string(doc, "domain", "", required=True)
        return DomainRules(
            domain=domain, descriptors=_parse_descriptors(doc.get("descriptors"), "descriptors")
        )
    except _Invalid as exc:
        return exc.error
    except RecursionError:
        return RuleError("", "descriptors are nested too deeply")


def parse_rule_set(docs: Iterable[object]) -> RuleSet | RuleError:
    """Several domain documents; a domain may appear only once."""
    domains: dict[str, DomainRules] = {}
    for i, doc in enumerate(docs):
        parsed = parse_domain(doc)
        if isinstance(parsed, RuleError):
            return RuleError(f"[{i}]{'.' if parsed.path else ''}{parsed.path}", parsed.message)
        if parsed.domain in domains:
            return RuleError(f"[{i}].domain", f"duplicate domain {parsed.domain!r}")
        domains[parsed.domain] = parsed
    return RuleSet(MappingProxyType(domains))
