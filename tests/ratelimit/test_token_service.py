"""The rate-limit service answering token budgets over real gRPC: what Envoy is told."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import json_format

from mesh.annotations import parse_service_config
from mesh.model import InferenceService, World
from ratelimit.counters import InMemoryCounters
from ratelimit.rules import rules_from_world
from ratelimit.tokens import NO_RESERVATION
from xds_server.rls.service import RateLimitService

from .test_rls import Running, _request, _start, _stop

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
TOKENS = (("service", "default/llama"), ("tokens", "standard"), ("caller", "default/chat"))
REQUESTS = (("service", "default/llama"), ("caller", "default/chat"), ("priority", "sheddable"))
LABELS = {"service": "default/llama", "budget": "default/chat"}


def world() -> World:
    config, errors = parse_service_config(
        {
            "inferlane.io/enabled": "true",
            "inferlane.io/token-budget": "default/chat=1000/h",
            "inferlane.io/global-rate-limit": f"sheddable={3 / 3600}",  # 3 an hour
        }
    )
    assert errors == ()
    return World(services=(InferenceService("default", "llama", (), config),))


@pytest.fixture
async def rls() -> AsyncIterator[Running]:
    running = await _start(RateLimitService(InMemoryCounters(), rules_from_world(world())))
    try:
        yield running
    finally:
        await _stop(running)


def admission(tokens: int | None, *, requests: bool = False) -> Any:
    """A request-time call: the token descriptor (with its reservation as hits_addend),
    and the request-count descriptor when ``requests``."""
    request = _request(TOKENS, REQUESTS) if requests else _request(TOKENS)
    if tokens is not None:
        request.descriptors[0].hits_addend.value = tokens
    return request


def settlement(reservation: str, used: int) -> Any:
    request = _request((*TOKENS, ("reservation", reservation)))
    request.descriptors[0].hits_addend.value = used
    return request


def metadata(response: Any) -> dict[str, Any]:
    return json_format.MessageToDict(response.dynamic_metadata)


def sample(rls: Running, name: str, **labels: str) -> float:
    value = rls.service.counters.metrics.registry.get_sample_value(name, labels or LABELS)
    return 0.0 if value is None else value


async def test_a_reservation_is_answered_with_its_id_and_named_limit(rls: Running) -> None:
    response = await rls.stub.ShouldRateLimit(admission(600))
    assert response.overall_code == OK
    reservation = metadata(response)["token_reservation"]
    [status] = response.statuses
    assert status.limit_remaining == 400
    assert status.current_limit.name == "default/llama:default/chat"
    assert status.current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.HOUR
    # Nothing for Envoy to add to the response when it is admitted.
    assert not response.response_headers_to_add and not response.raw_body
    await rls.stub.ShouldRateLimit(settlement(reservation, 50))
    assert sample(rls, "inferlane_token_budget_reserved_tokens_total") == 600
    assert sample(rls, "inferlane_token_budget_used_tokens_total") == 50
    assert sample(rls, "inferlane_token_budget_returned_tokens_total") == 550
    again = await rls.stub.ShouldRateLimit(admission(600))
    assert again.statuses[0].limit_remaining == 350


async def test_a_reservation_that_does_not_fit_is_refused_with_the_reason(rls: Running) -> None:
    await rls.stub.ShouldRateLimit(admission(900))
    response = await rls.stub.ShouldRateLimit(admission(200))
    assert response.overall_code == OVER
    assert metadata(response) == {"refused": "token-budget"}
    headers = {h.key: h.value for h in response.response_headers_to_add}
    assert headers == {"content-type": "application/json"}
    error = json.loads(response.raw_body)["error"]
    assert error["type"] == "token_budget_exceeded"
    assert "reserves 200 tokens" in error["message"] and "100 remain" in error["message"]
    huge = await rls.stub.ShouldRateLimit(admission(5000))
    assert "larger than the whole budget" in json.loads(huge.raw_body)["error"]["message"]
    assert sample(rls, "inferlane_token_budget_refused_total") == 2
    [budget] = rls.service.debug()["token_budgets"]
    assert budget["budget"] == "default/chat" and budget["tokens"] == 1000
    [caller] = budget["callers"]
    assert (caller["caller"], caller["reserved"], caller["refused"]) == ("default/chat", 900, 2)
    assert caller["charged"] == 900 and caller["open_reservations"] == 1


async def test_a_request_refused_by_its_request_limit_keeps_no_tokens(rls: Running) -> None:
    codes = [(await rls.stub.ShouldRateLimit(admission(100, requests=True))) for _ in range(4)]
    assert [r.overall_code for r in codes] == [OK, OK, OK, OVER]
    assert metadata(codes[-1]) == {"refused": "global-rate-limit"}
    assert "token_reservation" not in metadata(codes[-1])
    # The refused request's 100 tokens were given back: three reservations stand.
    response = await rls.stub.ShouldRateLimit(admission(700))
    assert response.overall_code == OK and response.statuses[0].limit_remaining == 0


async def test_ends_without_a_reservation_charge_the_usage(rls: Running) -> None:
    # Charge at the end: no hits_addend at admission (one token counted, no reservation).
    response = await rls.stub.ShouldRateLimit(admission(None))
    assert response.overall_code == OK and "token_reservation" not in metadata(response)
    await rls.stub.ShouldRateLimit(settlement(NO_RESERVATION, 400))
    assert sample(rls, "inferlane_token_budget_used_tokens_total") == 400
    assert sample(rls, "inferlane_token_budget_settlements_total", outcome="charged") == 1
    assert (await rls.stub.ShouldRateLimit(admission(599))).statuses[0].limit_remaining == 0
    # A settlement that names no reservation of ours changes nothing.
    await rls.stub.ShouldRateLimit(settlement("123.0123456789abcdef", 0))
    assert sample(rls, "inferlane_token_budget_settlements_total", outcome="unknown") == 1
