"""The global rate-limit service: Envoy's ``envoy.service.ratelimit.v3.RateLimitService``.

Envoy's ``envoy.filters.http.ratelimit`` filter calls ``ShouldRateLimit`` with a domain
and one or more descriptors. Each descriptor is matched against the current
:class:`~ratelimit.rules.RuleSet` (or carries its own ``limit`` override), counted in
fixed windows by :class:`~ratelimit.counters.Counters` (in memory, or in a Redis shared
by every replica), and answered as envoyproxy/ratelimit answers:

- one status per descriptor, in order: ``code``, ``current_limit``, ``limit_remaining``
  and ``duration_until_reset`` (Envoy builds its draft-03 ``X-RateLimit-*`` headers from
  these); unmatched descriptors are ``OK`` with no limit;
- ``overall_code`` is ``OVER_LIMIT`` if any descriptor is over (shadow-mode rules never
  are; with the service-wide ``shadow_mode`` nothing is refused, but it is counted);
- with ``limit_headers``, ``RateLimit-Limit``, ``RateLimit-Remaining`` and
  ``RateLimit-Reset`` from the descriptor with the least remaining
  (envoyproxy/ratelimit's ``LIMIT_RESPONSE_HEADERS_ENABLED``);
- an empty domain or descriptor list is ``INVALID_ARGUMENT``.

Rules are swapped whole with :meth:`RateLimitService.set_rules` when the world changes;
a call in flight keeps the rules it started with. Counters survive a swap: a rule that
keeps its descriptor keeps counting in the same window.

Who is counted
==============

The control plane serves the service over mutual TLS (:func:`start_rls_server` with
credentials that require a client certificate from the mesh CA; sidecars present their
SDS certificate) and with :class:`PeerCallers`: the ``caller`` of every descriptor is the
SPIFFE identity of the call's certificate, whatever the descriptor says. A descriptor that
names another caller, or none, is counted as the peer's (so no pod can drain another
caller's budget or step outside its own), and a descriptor's own ``limit`` is ignored:
limits come from the rules alone. Both are counted in
``inferlane_rls_descriptors_corrected_total``.

Without ``callers`` (a service that only trusted peers reach, as envoyproxy/ratelimit
assumes) descriptors are counted as sent, ``limit`` overrides included.

Token budgets
=============

A descriptor with a ``tokens`` entry draws on a token budget (:mod:`ratelimit.tokens`).
At admission its ``hits_addend`` is the request's worst case: it is reserved only if it
fits, and the answer carries the reservation's id in its dynamic metadata
(``token_reservation``), which Envoy keeps and sends back with the settlement when the
stream ends (the same entries plus ``reservation=ID``, the usage as ``hits_addend``).
The service then replaces the reservation by the usage. A request that any descriptor
refuses keeps no reservation (they are undone at once), and the answer names the reason
in its dynamic metadata (``refused``: ``token-budget`` or ``global-rate-limit``), for the
proxy's local reply mapping (:mod:`routing.refusals`); a token refusal also gets a JSON
error body saying what the request reserves and what remains.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import duration_pb2
from prometheus_client import Counter, Histogram

from mesh.model import Refusal
from mtls.ca import MtlsError, parse_spiffe_id
from ratelimit.budgets import BudgetLedger, BudgetMetrics, budget_labels
from ratelimit.counters import Check, Counters, Decision, Result, Settled, Settlement
from ratelimit.local import CALLER_KEY, SERVICE_KEY
from ratelimit.rules import Entry, Rule, RuleSet, Unit, override_rule
from ratelimit.tokens import (
    NO_RESERVATION,
    REFUSED_METADATA_KEY,
    RESERVATION_METADATA_KEY,
    is_token_descriptor,
    split_settlement,
)

log = logging.getLogger(__name__)

#: The port Istio-style deployments expect the service on (SPEC).
DEFAULT_RLS_PORT = 8081

#: envoyproxy/ratelimit's default header names.
LIMIT_HEADER = "RateLimit-Limit"
REMAINING_HEADER = "RateLimit-Remaining"
RESET_HEADER = "RateLimit-Reset"

_Code = rls_pb2.RateLimitResponse.Code
_ProtoLimit = rls_pb2.RateLimitResponse.RateLimit

_UNIT_TO_PROTO = {
    Unit.SECOND: _ProtoLimit.SECOND,
    Unit.MINUTE: _ProtoLimit.MINUTE,
    Unit.HOUR: _ProtoLimit.HOUR,
    Unit.DAY: _ProtoLimit.DAY,
    Unit.WEEK: _ProtoLimit.WEEK,
    Unit.MONTH: _ProtoLimit.MONTH,
    Unit.YEAR: _ProtoLimit.YEAR,
}
_PROTO_TO_UNIT = {v: k for k, v in _UNIT_TO_PROTO.items()}

#: Latency buckets from 0.1 ms to 250 ms: Envoy's own timeout is typically 20 to 100 ms.
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class InvalidRequest(ValueError):
    """A request the service cannot answer (empty domain, no descriptors)."""


class PeerCallers:
    """The caller of a call is its client certificate's SPIFFE identity, ``NS/SA``.

    gRPC has verified the certificate against the mesh roots in the handshake (the port
    requires one); this reads the SPIFFE ID gRPC found in it and checks that it is one of
    ours, in ``trust_domain``.
    """

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = trust_domain

    def __call__(self, context: Any) -> str | None:
        """``NS/SA`` of the call's peer, or None when it has no SPIFFE ID of ours."""
        found = (context.auth_context() or {}).get("peer_spiffe_id") or []
        if len(found) != 1:
            return None
        try:
            spiffe = parse_spiffe_id(bytes(found[0]).decode("ascii"))
        except (MtlsError, UnicodeDecodeError):
            return None
        if spiffe.trust_domain != self.trust_domain:
            return None
        return f"{spiffe.namespace}/{spiffe.service_account}"


def as_caller(entries: tuple[Entry, ...], caller: str) -> tuple[Entry, ...]:
    """``entries`` counted as ``caller``'s: every ``caller`` entry names it, and a descriptor
    without one gets it after its ``service`` entry (or first), so that leaving the caller
    out does not step outside the per-caller rules."""
    if any(key == CALLER_KEY for key, _ in entries):
        return tuple((key, caller if key == CALLER_KEY else value) for key, value in entries)
    at = next((i + 1 for i, (key, _) in enumerate(entries) if key == SERVICE_KEY), 0)
    return (*entries[:at], (CALLER_KEY, caller), *entries[at:])


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    """``ShouldRateLimit`` over swappable rules and shared counters."""

    def __init__(
        self,
        counters: Counters,
        rules: RuleSet | None = None,
        *,
        limit_headers: bool = False,
        shadow_mode: bool = False,
        callers: PeerCallers | None = None,
    ) -> None:
        self.counters = counters
        #: Who each call is counted as; None trusts the descriptors as sent.
        self.callers = callers
        self._rules = rules or RuleSet()
        self.limit_headers = limit_headers
        #: Service-wide shadow mode: decide and count as usual, never refuse.
        self.shadow_mode = shadow_mode
        registry = counters.metrics.registry
        self._requests = Counter(
            "inferlane_rls_requests_total",
            "ShouldRateLimit calls by overall code (or invalid).",
            ["code"],
            registry=registry,
        )
        self._shadowed = Counter(
            "inferlane_rls_shadow_mode_total",
            "Over-limit answers turned into OK by the service-wide shadow mode.",
            registry=registry,
        )
        self._corrected = Counter(
            "inferlane_rls_descriptors_corrected_total",
            "Descriptors counted other than sent: a caller that was not the authenticated "
            "peer (caller), or a limit sent by the client (limit), which is ignored.",
            ["field"],
            registry=registry,
        )
        self._latency = Histogram(
            "inferlane_rls_request_seconds",
            "Time to answer one ShouldRateLimit call.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.budget_metrics = BudgetMetrics(registry)
        #: Token budgets per caller, as this replica saw them (``/debug/ratelimits``).
        self.ledger = BudgetLedger()

    @property
    def rules(self) -> RuleSet:
        return self._rules

    def set_rules(self, rules: RuleSet) -> None:
        """Replace the rules in one step (an attribute swap; calls in flight keep theirs)."""
        if rules != self._rules:
            log.info("rate-limit rules replaced: %d domain(s)", len(rules.domains))
        self._rules = rules

    def debug(self) -> dict[str, Any]:
        """A JSON-ready view for a debug page: the rules and the counter store's state."""
        return {
            "backend": self.counters.backend,
            "backend_up": self.counters.up,
            "failure_mode": str(self.counters.failure_mode),
            "shadow_mode": self.shadow_mode,
            "limit_headers": self.limit_headers,
            **self._rules.to_dict(),
            "token_budgets": self.ledger.snapshot(),
        }

    async def ShouldRateLimit(self, request: Any, context: Any) -> Any:
        caller = None
        if self.callers is not None:
            caller = self.callers(context)
            if caller is None:
                self._requests.labels("unauthenticated").inc()
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "the rate-limit service counts callers by their mesh certificate; this "
                    "one carries no SPIFFE ID of the mesh's trust domain",
                )
                raise AssertionError("context.abort returned")
        try:
            return await self.should_rate_limit(request, caller)
        except InvalidRequest as exc:
            self._requests.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # abort raises; this line is never reached

    async def should_rate_limit(self, request: Any, caller: str | None = None) -> Any:
        """Answer one ``RateLimitRequest``; raises :class:`InvalidRequest` for a bad one.

        With ``caller`` (the authenticated peer), every descriptor is counted as that
        caller's and its own ``limit`` is ignored.
        """
        started = time.perf_counter()
        domain = request.domain
        if not domain:
            raise InvalidRequest("rate limit domain must not be empty")
        if not request.descriptors:
            raise InvalidRequest("rate limit descriptor list must not be empty")
        rules = self._rules  # one snapshot for the whole call
        parsed = [
            self._descriptor(rules, domain, d, request.hits_addend, caller)
            for d in request.descriptors
        ]
        checks = [p for p in parsed if isinstance(p, Check)]
        settlements = [p for p in parsed if isinstance(p, Settlement)]
        counted = await self.counters.check(domain, checks) if checks else []
        if settlements:
            await self._settle(domain, settlements)
        over = any(d.result is Result.OVER_LIMIT for d in counted)
        if over and self.shadow_mode:
            self._shadowed.inc()
            over = False
        if over:
            await self._release(domain, checks, counted)
        self._account(checks, counted, refused=over)
        decided = iter(counted)
        decisions = [next(decided) if isinstance(p, Check) else _SETTLED for p in parsed]
        response = rls_pb2.RateLimitResponse(statuses=[_status(d) for d in decisions])
        response.overall_code = _Code.OVER_LIMIT if over else _Code.OK
        _answer_tokens(response, checks, counted, over)
        if self.limit_headers:
            response.response_headers_to_add.extend(_limit_headers(response.statuses))
        self._requests.labels(_Code.Name(response.overall_code)).inc()
        self._latency.observe(time.perf_counter() - started)
        return response

    def _descriptor(
        self, rules: RuleSet, domain: str, descriptor: Any, request_hits: int, caller: str | None
    ) -> Check | Settlement:
        """What one descriptor asks: a count (a reservation, for a token admission that
        carries its cost) or a token settlement."""
        entries: tuple[Entry, ...] = tuple((e.key, e.value) for e in descriptor.entries)
        if caller is not None:
            counted = as_caller(entries, caller)
            if counted != entries:
                self._corrected.labels("caller").inc()
                log.debug("descriptor %s counted as caller %s", entries, caller)
                entries = counted
            if descriptor.HasField("limit"):
                self._corrected.labels("limit").inc()
        explicit = descriptor.HasField("hits_addend")
        hits = min(int(descriptor.hits_addend.value if explicit else request_hits), MAX_HITS)
        settlement = split_settlement(entries)
        if settlement is not None:
            counter, reservation = settlement
            return Settlement(
                counter,
                rules.match(counter, domain),
                None if reservation == NO_RESERVATION else reservation,
                used=hits,
            )
        rule: Rule | None
        if (
            caller is None
            and descriptor.HasField("limit")
            and descriptor.limit.unit in _PROTO_TO_UNIT
        ):
            rule = override_rule(
                domain,
                entries,
                descriptor.limit.requests_per_unit,
                _PROTO_TO_UNIT[descriptor.limit.unit],
            )
        else:
            rule = rules.match(entries, domain)
        if explicit and hits > 0 and is_token_descriptor(entries):
            return Check(entries=entries, rule=rule, hits=hits, reserve=True)
        return Check(entries=entries, rule=rule, hits=max(1, hits))

    async def _settle(self, domain: str, settlements: list[Settlement]) -> None:
        results = await self.counters.settle(domain, settlements)
        for settlement, result in zip(settlements, results, strict=True):
            self.budget_metrics.settlements.labels(str(result.outcome)).inc()
            rule = settlement.rule
            if rule is None or result.outcome not in (Settled.REPLACED, Settled.CHARGED):
                continue
            labels = budget_labels(rule)
            self.budget_metrics.used.labels(*labels).inc(settlement.used)
            reserved = result.reserved if result.outcome is Settled.REPLACED else None
            if reserved is not None:
                self.budget_metrics.returned.labels(*labels).inc(max(0, reserved - settlement.used))
            self.ledger.settled(rule, _caller_of(settlement.entries), settlement.used, reserved)

    async def _release(self, domain: str, checks: list[Check], decisions: list[Decision]) -> None:
        """Undo the reservations of a refused request: it will use nothing."""
        made = [(c, d) for c, d in zip(checks, decisions, strict=True) if d.reservation]
        if not made:
            return
        await self.counters.settle(
            domain, [Settlement(c.entries, c.rule, d.reservation, used=0) for c, d in made]
        )

    def _account(self, checks: list[Check], decisions: list[Decision], *, refused: bool) -> None:
        for check, decision in zip(checks, decisions, strict=True):
            rule = check.rule
            if not check.reserve or rule is None:
                continue
            labels = budget_labels(rule)
            caller = _caller_of(check.entries)
            if decision.reservation and not refused:
                self.budget_metrics.reserved.labels(*labels).inc(check.hits)
                self.ledger.reserved(rule, caller, check.hits, decision.count)
            elif refused and decision.result is Result.OVER_LIMIT:
                self.budget_metrics.refused.labels(*labels).inc()
                self.ledger.refused(rule, caller, decision.count)


#: The status of a settlement: Envoy does not read the answer to a stream-done call.
_SETTLED = Decision(Result.OK)

#: Hits one descriptor may carry: a limit is a uint32, so more never fits anyway, and
#: Redis counters stay far from overflowing.
MAX_HITS = 2**32


def _caller_of(entries: tuple[Entry, ...]) -> str:
    return next((value for key, value in entries if key == CALLER_KEY), "")


def _answer_tokens(response: Any, checks: list[Check], counted: list[Decision], over: bool) -> None:
    """What Envoy reads of an answer for token budgets: the reservation's id, or why the
    request was refused (its local reply names the reason), and for a token refusal an
    OpenAI-style error body. ``counted`` are the decisions on ``checks``."""
    metadata: dict[str, str] = {}
    if over:
        refused = [
            (c, d)
            for c, d in zip(checks, counted, strict=True)
            if c.reserve and d.result is Result.OVER_LIMIT
        ]
        reason = Refusal.TOKEN_BUDGET if refused else Refusal.GLOBAL_RATE_LIMIT
        metadata[REFUSED_METADATA_KEY] = str(reason)
        if refused and not refused[0][1].backend_error:
            check, decision = refused[0]
            response.raw_body = _token_refusal_body(check, decision)
            response.response_headers_to_add.append(
                base_pb2.HeaderValue(key="content-type", value="application/json")
            )
    else:
        reservation = next((d.reservation for d in counted if d.reservation), None)
        if reservation is not None:
            metadata[RESERVATION_METADATA_KEY] = reservation
    if metadata:
        response.dynamic_metadata.update(metadata)


def _token_refusal_body(check: Check, decision: Decision) -> bytes:
    assert decision.rule is not None
    limit = decision.rule.limit
    message = (
        f"token budget {limit.name} ({limit.requests_per_unit} tokens a {limit.unit}) for "
        f"{_caller_of(check.entries)}: this request reserves {check.hits} tokens (its prompt"
        f" and max_tokens) and {decision.remaining} remain; the window resets in "
        f"{math.ceil(decision.reset_after_s)}s"
    )
    if check.hits > limit.requests_per_unit:
        message += "; the request is larger than the whole budget: lower its max_tokens"
    error = {"message": message, "type": "token_budget_exceeded", "code": "token_budget"}
    return json.dumps({"error": error}).encode()


def _duration(seconds: float) -> Any:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(max(0, round(seconds * 1e9)))
    return duration


def _status(decision: Decision) -> Any:
    status = rls_pb2.RateLimitResponse.DescriptorStatus(
        code=_Code.OVER_LIMIT if decision.result is Result.OVER_LIMIT else _Code.OK,
        limit_remaining=min(decision.remaining, 2**32 - 1),
    )
    rule = decision.rule
    if rule is not None and not rule.limit.unlimited:
        status.current_limit.CopyFrom(
            _ProtoLimit(
                name=rule.limit.name,
                requests_per_unit=rule.limit.requests_per_unit,
                unit=_UNIT_TO_PROTO[rule.limit.unit],
            )
        )
        status.duration_until_reset.CopyFrom(_duration(decision.reset_after_s))
    return status


def _limit_headers(statuses: Any) -> list[Any]:
    limited = [s for s in statuses if s.HasField("current_limit")]
    if not limited:
        return []
    tightest = min(limited, key=lambda s: s.limit_remaining)
    reset_s = math.ceil(tightest.duration_until_reset.ToNanoseconds() / 1e9)
    values = (
        (LIMIT_HEADER, str(tightest.current_limit.requests_per_unit)),
        (REMAINING_HEADER, str(tightest.limit_remaining)),
        (RESET_HEADER, str(reset_s)),
    )
    return [base_pb2.HeaderValue(key=k, value=v) for k, v in values]


def add_rls_servicer(server: Any, service: RateLimitService) -> None:
    """Register ``service`` on a ``grpc.aio.Server`` (before it starts)."""
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(service, server)


async def start_rls_server(
    service: RateLimitService,
    host: str = "127.0.0.1",
    port: int = DEFAULT_RLS_PORT,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[Any, int]:
    """Start a ``grpc.aio`` server with only the rate-limit service; returns it and its port.

    ``port`` 0 binds any free port; ``credentials`` serve TLS (the control plane's require
    a client certificate from the mesh CA), plaintext without. Stop it with
    ``await server.stop(grace)``.
    """
    server = grpc.aio.server()
    add_rls_servicer(server, service)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # gRPC raises when it cannot bind the port.
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    await server.start()
    log.info(
        "rate-limit service listening on %s:%d (%s)",
        host,
        bound,
        "plaintext" if credentials is None else "TLS",
    )
    return server, bound
