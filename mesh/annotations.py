"""Parse a Service's ``inferlane.io/*`` annotations into a :class:`ServiceConfig`.

docs/reference.md, "Service annotations", is the contract. The parser never raises:
each bad value becomes one :class:`AnnotationError` (naming the annotation, the value
and what is wrong) and that annotation alone falls back to its default. Unknown
``inferlane.io/`` keys are errors too, so a typo is visible rather than silently
ignored.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, TypeVar

from mesh.model import (
    AnnotationError,
    BudgetTier,
    MtlsMode,
    Priority,
    SchedulingPolicy,
    ServiceConfig,
    TokenBudget,
)

PREFIX = "inferlane.io/"

ENABLED = PREFIX + "enabled"
DEFAULT_PRIORITY = PREFIX + "default-priority"
CRITICAL_CALLERS = PREFIX + "critical-callers"
RATE_LIMIT = PREFIX + "rate-limit"
MAX_CONCURRENCY = PREFIX + "max-concurrency"
ADAPTIVE = PREFIX + "adaptive"
GLOBAL_RATE_LIMIT = PREFIX + "global-rate-limit"
MTLS = PREFIX + "mtls"
TIMEOUT = PREFIX + "timeout"
SCHEDULING_POLICY = PREFIX + "scheduling-policy"
TOKEN_BUDGET = PREFIX + "token-budget"
DEFAULT_MAX_TOKENS = PREFIX + "default-max-tokens"

#: Longest value quoted back in an error message; the rest is elided.
MAX_QUOTED_VALUE = 200

#: Largest max-concurrency: Envoy's circuit-breaker thresholds are uint32.
MAX_CONCURRENCY_LIMIT = 2**32 - 1

#: Largest token budget per window: the rate-limit service's limits are uint32 in Envoy's
#: API (``requests_per_unit``).
MAX_BUDGET_TOKENS = 2**32 - 1

#: Largest default-max-tokens: beyond any model's context, and far inside a budget.
MAX_DEFAULT_MAX_TOKENS = 10_000_000

#: Token-budget windows (SPEC), in seconds.
BUDGET_WINDOWS = {"s": 1, "m": 60, "h": 3600}

#: Longest timeout accepted: a week. Longer request timeouts are mistakes, and the cap keeps
#: every value far inside what an Envoy Duration can hold.
MAX_TIMEOUT_S = 7 * 24 * 3600.0

# ASCII digits only: float() and int() would also take other scripts' digits.
_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[0-9]+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
#: RFC 1123 label: a Namespace name.
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
#: RFC 1123 subdomain: a ServiceAccount name.
_DNS_SUBDOMAIN = re.compile(
    r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
)
_SPIFFE = re.compile(r"spiffe://([a-z0-9._-]+)/ns/([^/]+)/sa/([^/]+)")


_V = TypeVar("_V")


class _Invalid(ValueError):
    """Raised inside one value parser; turned into an AnnotationError by the caller."""


@dataclass(frozen=True)
class _Fields:
    """What a parser returns when one annotation sets several ServiceConfig fields."""

    values: Mapping[str, Any]


@dataclass(frozen=True)
class _Annotation:
    field: str
    parse: Callable[[str], Any]
    #: An empty value means the default, with no error (an explicitly empty list).
    empty_is_default: bool = False


def parse_service_config(
    annotations: Mapping[str, object],
) -> tuple[ServiceConfig, tuple[AnnotationError, ...]]:
    """Parse ``annotations`` (a Service's metadata.annotations) without ever raising.

    Keys outside ``inferlane.io/`` are ignored. Values that are not strings (YAML's
    unquoted ``true`` or ``5``) are read as Kubernetes would print them.
    """
    config = ServiceConfig()
    if not isinstance(annotations, Mapping):
        return config, (AnnotationError("metadata.annotations", _quote(annotations), "not a map"),)
    errors: list[AnnotationError] = []
    items = sorted(
        ((k, v) for k, v in annotations.items() if isinstance(k, str) and k.startswith(PREFIX)),
        key=lambda item: item[0],
    )
    for key, raw in items:
        spec = _ANNOTATIONS.get(key)
        if spec is None:
            errors.append(AnnotationError(key, _quote(raw), _unknown_message(key)))
            continue
        value = _text(raw)
        if value is None:
            errors.append(AnnotationError(key, _quote(raw), "value must be a string"))
            continue
        value = value.strip()
        if not value and spec.empty_is_default:
            continue
        try:
            parsed = spec.parse(value)
        except _Invalid as exc:
            errors.append(AnnotationError(key, _quote(value), str(exc)))
            continue
        updates = parsed.values if isinstance(parsed, _Fields) else {spec.field: parsed}
        config = replace(config, **updates)
    if config.adaptive and not config.rate_limit and not config.caps_concurrency:
        errors.append(
            AnnotationError(
                ADAPTIVE,
                "true",
                f"has nothing to steer without {MAX_CONCURRENCY} or {RATE_LIMIT}",
            )
        )
        config = replace(config, adaptive=False)
    return config, tuple(sorted(errors, key=lambda e: e.annotation))


def _text(raw: object) -> str | None:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int | float):
        return str(raw)
    return None


def _quote(raw: object) -> str:
    text = raw if isinstance(raw, str) else repr(raw)
    if len(text) > MAX_QUOTED_VALUE:
        return text[:MAX_QUOTED_VALUE] + "..."
    return text


def _unknown_message(key: str) -> str:
    close = difflib.get_close_matches(key, list(_ANNOTATIONS), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    known = ", ".join(sorted(k.removeprefix(PREFIX) for k in _ANNOTATIONS))
    return f"unknown inferlane.io annotation{hint} (known: {known})"


# --- value parsers: each takes a stripped, non-empty string and raises _Invalid ---------


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    raise _Invalid('must be "true" or "false"')


def _parse_priority(value: str) -> Priority:
    try:
        return Priority(value.lower())
    except ValueError:
        raise _Invalid(f"unknown class; expected one of {_class_names()}") from None


def _class_names() -> str:
    return ", ".join(p.value for p in Priority)


def _parse_mtls(value: str) -> MtlsMode:
    try:
        return MtlsMode(value.lower())
    except ValueError:
        raise _Invalid('must be "strict" or "permissive"') from None


def _parse_count(value: str) -> int:
    if not _INTEGER.fullmatch(value):
        raise _Invalid("must be a positive whole number")
    number = int(value)
    if number <= 0:
        raise _Invalid("must be a positive whole number")
    if number > MAX_CONCURRENCY_LIMIT:
        raise _Invalid(f"must be at most {MAX_CONCURRENCY_LIMIT}")
    return number


def _parse_max_concurrency(value: str) -> _Fields:
    """``N``, ``N,CLASS=M,...`` or ``CLASS=M,...``: the endpoint's total, and caps for the
    classes named (which replace their share of the total; naming critical caps it)."""
    total: int | None = None
    rest = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        if "=" in item:
            rest.append(item)
        elif total is not None:
            raise _Invalid("gives the total twice")
        else:
            total = _parse_count(item)
    per_class = _per_class(_parse_count)(",".join(rest)) if rest else MappingProxyType({})
    if total is None and not per_class:
        raise _Invalid("must be a positive whole number")
    return _Fields({"max_concurrency": total, "class_concurrency": per_class})


def _parse_scheduling(value: str) -> SchedulingPolicy:
    try:
        return SchedulingPolicy(value.lower())
    except ValueError:
        raise _Invalid('must be "fcfs" or "priority"') from None


def _parse_rate(value: str) -> float:
    if not _NUMBER.fullmatch(value):
        raise _Invalid(f"{value!r} is not a number of requests per second")
    rate = float(value)
    if not math.isfinite(rate) or rate <= 0:
        raise _Invalid(f"{value!r} must be a positive, finite number of requests per second")
    return rate


def _parse_duration(value: str) -> float:
    """Go-style durations with s/ms/m/h units: ``30s``, ``1.5m``, ``500ms``, ``1m30s``."""
    lowered = value.lower()
    pos = 0
    total = 0.0
    while pos < len(lowered):
        match = _DURATION_PART.match(lowered, pos)
        if match is None:
            raise _Invalid(f"{value!r} is not a duration such as 30s, 1.5m or 500ms")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not math.isfinite(total) or total <= 0:
        raise _Invalid(f"{value!r} must be a positive duration")
    if total > MAX_TIMEOUT_S:
        raise _Invalid(f"{value!r} is longer than the maximum of {MAX_TIMEOUT_S:.0f}s")
    return total


def _per_class(parse_value: Callable[[str], _V]) -> Callable[[str], Mapping[Priority, _V]]:
    """A parser for ``class=value[,class=value]`` lists (classes case-insensitive)."""

    def parse(value: str) -> Mapping[Priority, _V]:
        result: dict[Priority, _V] = {}
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            name, eq, number = item.partition("=")
            if not eq:
                raise _Invalid(f"{item!r} is not class=value")
            try:
                priority = Priority(name.strip().lower())
            except ValueError:
                raise _Invalid(
                    f"{name.strip()!r} is not a class; expected one of {_class_names()}"
                ) from None
            if priority in result:
                raise _Invalid(f"class {priority.value} is given twice")
            result[priority] = parse_value(number.strip())
        return MappingProxyType(result)

    return parse


def _parse_callers(value: str) -> tuple[str, ...]:
    callers: list[str] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        caller = _normalise_caller(item)
        if caller not in callers:
            callers.append(caller)
    return tuple(callers)


def _normalise_caller(item: str) -> str:
    spiffe = _SPIFFE.fullmatch(item)
    if spiffe is not None:
        _, namespace, account = spiffe.groups()
        if not _DNS_LABEL.fullmatch(namespace) or not _valid_account(account):
            raise _Invalid(f"{item!r}: the namespace or service account is not a valid name")
        return item
    if item.lower().startswith("spiffe://"):
        raise _Invalid(f"{item!r} is not spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT")
    namespace, slash, account = item.partition("/")
    namespace, account = namespace.strip(), account.strip()
    if not slash or not namespace or not account:
        raise _Invalid(f"{item!r} is not namespace/serviceaccount, namespace/* or a SPIFFE ID")
    if not _DNS_LABEL.fullmatch(namespace):
        raise _Invalid(f"{item!r}: {namespace!r} is not a valid namespace name")
    if account != "*" and not _valid_account(account):
        raise _Invalid(f"{item!r}: {account!r} is not a valid service account name")
    return f"{namespace}/{account}"


def _valid_account(name: str) -> bool:
    return len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name) is not None


def _parse_token_budgets(value: str) -> tuple[TokenBudget, ...]:
    """``[critical:]CALLER=TOKENS/WINDOW`` entries, comma-separated; CALLER is ``ns/sa``,
    ``ns/*``, a SPIFFE ID (read as its ``ns/sa``) or ``*``; WINDOW is ``s``, ``m`` or
    ``h``. Each tier names a caller at most once."""
    budgets: list[TokenBudget] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        head, eq, size = item.partition("=")
        if not eq:
            raise _Invalid(f"{item!r} is not CALLER=TOKENS/WINDOW")
        head = head.strip()
        tier = BudgetTier.STANDARD
        if head.lower().startswith("critical:"):
            tier = BudgetTier.CRITICAL
            head = head[len("critical:") :].strip()
        caller = _budget_caller(head)
        tokens, slash, unit = (p.strip() for p in size.partition("/"))
        if not slash or unit.lower() not in BUDGET_WINDOWS:
            raise _Invalid(f"{item!r}: the window must be /s, /m or /h")
        if not _INTEGER.fullmatch(tokens) or not 0 < int(tokens) <= MAX_BUDGET_TOKENS:
            raise _Invalid(f"{item!r}: tokens must be a whole number, 1 to {MAX_BUDGET_TOKENS}")
        budget = TokenBudget(caller, int(tokens), BUDGET_WINDOWS[unit.lower()], tier)
        if any(b.tier is tier and b.caller == caller for b in budgets):
            raise _Invalid(f"{budget.name} is given twice")
        budgets.append(budget)
    return tuple(budgets)


def _budget_caller(text: str) -> str:
    if text == "*":
        return text
    try:
        caller = _normalise_caller(text)
    except _Invalid as exc:
        raise _Invalid(f"{exc}, or *") from None
    identity = entry_identity(caller)
    assert identity is not None  # _normalise_caller accepted it
    return f"{identity[0]}/{identity[1]}"


def _parse_default_max_tokens(value: str) -> int:
    if not _INTEGER.fullmatch(value) or not 0 < int(value) <= MAX_DEFAULT_MAX_TOKENS:
        raise _Invalid(f"must be a whole number, 1 to {MAX_DEFAULT_MAX_TOKENS}")
    return int(value)


_ANNOTATIONS: dict[str, _Annotation] = {
    ENABLED: _Annotation("enabled", _parse_bool),
    DEFAULT_PRIORITY: _Annotation("default_priority", _parse_priority),
    CRITICAL_CALLERS: _Annotation("critical_callers", _parse_callers, empty_is_default=True),
    RATE_LIMIT: _Annotation("rate_limit", _per_class(_parse_rate), empty_is_default=True),
    MAX_CONCURRENCY: _Annotation("max_concurrency", _parse_max_concurrency),
    ADAPTIVE: _Annotation("adaptive", _parse_bool),
    GLOBAL_RATE_LIMIT: _Annotation(
        "global_rate_limit", _per_class(_parse_rate), empty_is_default=True
    ),
    MTLS: _Annotation("mtls", _parse_mtls),
    TIMEOUT: _Annotation("timeouts", _per_class(_parse_duration), empty_is_default=True),
    SCHEDULING_POLICY: _Annotation("scheduling", _parse_scheduling),
    TOKEN_BUDGET: _Annotation("token_budgets", _parse_token_budgets, empty_is_default=True),
    DEFAULT_MAX_TOKENS: _Annotation("default_max_tokens", _parse_default_max_tokens),
}

# --- reading critical-callers entries -----------------------------------------------------

_SPIFFE_SCHEME = "spiffe://"


def entry_identity(entry: str) -> tuple[str, str] | None:
    """``(namespace, service_account)`` of one critical-callers entry; None if malformed.

    Accepts ``ns/sa``, ``ns/*`` (service account ``*``) and
    ``spiffe://TRUST_DOMAIN/ns/NS/sa/SA`` (any trust domain: it is matched on its
    namespace and service account).
    """
    entry = entry.strip()
    if entry.startswith(_SPIFFE_SCHEME):
        parts = entry[len(_SPIFFE_SCHEME) :].split("/")
        if len(parts) != 5 or not parts[0] or parts[1] != "ns" or parts[3] != "sa":
            return None
        namespace, account = parts[2], parts[4]
    else:
        namespace, slash, account = entry.partition("/")
        if not slash or "/" in account:
            return None
    if not namespace or not account:
        return None
    return namespace, account


def caller_matches(entry: str, namespace: str, service_account: str) -> bool:
    """Whether one critical-callers entry names the caller ``namespace/service_account``."""
    identity = entry_identity(entry)
    if identity is None:
        return False
    entry_ns, entry_sa = identity
    return entry_ns == namespace and entry_sa in ("*", service_account)


#: Every annotation this parser knows, for docs and debug pages.
KNOWN_ANNOTATIONS: tuple[str, ...] = tuple(_ANNOTATIONS)
