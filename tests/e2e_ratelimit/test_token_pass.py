"""Token budgets and refusal marks in generated config, without a proxy.

What a caller's outbound listener and routes get for ``inferlane.io/token-budget``: the
Lua filter ahead of the rate-limit filter, per-route admission and settlement
descriptors only on routes whose class draws on a budget for that caller, and every
global descriptor in the filter's per-route config. Envoy accepting it, and doing what
it says, is shown by ``test_token_budget.py``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from mesh import xds
from mesh.annotations import parse_service_config
from mesh.model import ServiceConfig
from ratelimit.tokens import LUA_FILTER, LUA_SOURCE_NAME, TokenBudgetMode
from routing import generate, names
from routing.limits import RateLimitOptions
from tests.e2e_ratelimit.test_pass import (
    GLOBAL_FILTER,
    RLS,
    _managers,
    _one,
    build,
    llama,
    per_route_limits,
)
from tests.routing.factories import gateway, proxy

REFUSED = "x-inferlane-refused"


def _cfg(annotations: dict[str, str]) -> ServiceConfig:
    config, errors = parse_service_config({"inferlane.io/enabled": "true", **annotations})
    assert errors == ()
    return config


def _limits(route: Any) -> list[dict[str, Any]]:
    return [json_format.MessageToDict(r) for r in per_route_limits(route)]


def _routes(out: Any, name: str = names.OUTBOUND_ROUTE) -> dict[str, Any]:
    (vhost,) = _one(out, xds.ROUTE, name).virtual_hosts
    return {route.name: route for route in vhost.routes}


def _lua(route: Any) -> dict[str, Any] | None:
    if LUA_FILTER not in route.typed_per_filter_config:
        return None
    config = lua_pb2.LuaPerRoute()
    route.typed_per_filter_config[LUA_FILTER].Unpack(config)
    return json_format.MessageToDict(config)


def _filters(out: Any, listener: str = names.OUTBOUND_LISTENER) -> list[str]:
    (manager,) = _managers(_one(out, xds.LISTENER, listener))
    return [f.name for f in manager.http_filters]


BUDGETS = {
    "inferlane.io/token-budget": "default/chat=200000/m,critical:default/ops=50/s",
    "inferlane.io/default-max-tokens": "512",
}


def test_a_budgeted_caller_reserves_and_settles_on_the_classes_its_budget_charges() -> None:
    out = build(llama(_cfg(BUDGETS)), proxy(service_account="chat"), RateLimitOptions(rls=RLS))
    assert _filters(out)[-3:] == [LUA_FILTER, GLOBAL_FILTER, "envoy.filters.http.router"]
    routes = _routes(out)
    # critical is not charged: chat has no critical: entry.
    assert _lua(routes["critical"]) is None and _limits(routes["critical"]) == []
    for name in ("standard", "sheddable", "default"):
        assert _lua(routes[name]) == {
            "name": LUA_SOURCE_NAME,
            "filterContext": {"default_max_tokens": 512.0},
        }
        admission, settlement = _limits(routes[name])
        entries = [
            {"genericKey": {"descriptorKey": "service", "descriptorValue": "default/llama"}},
            {"genericKey": {"descriptorKey": "tokens", "descriptorValue": "standard"}},
            {"genericKey": {"descriptorKey": "caller", "descriptorValue": "default/chat"}},
        ]
        assert admission == {
            "actions": entries,
            "hitsAddend": {"format": "%DYNAMIC_METADATA(inferlane.token_budget:reserve)%"},
        }
        assert settlement["applyOnStreamDone"] is True
        assert settlement["hitsAddend"] == {
            "format": "%DYNAMIC_METADATA(inferlane.token_budget:used)%"
        }
        assert settlement["actions"][:3] == entries
        assert settlement["actions"][3]["metadata"] == {
            "descriptorKey": "reservation",
            "metadataKey": {
                "key": "envoy.filters.http.ratelimit",
                "path": [{"key": "token_reservation"}],
            },
            "defaultValue": "none",  # the source is DYNAMIC, the default
        }
    # ops is named for critical only: its critical route is charged, as critical.
    ops = _routes(
        build(llama(_cfg(BUDGETS)), proxy(service_account="ops"), RateLimitOptions(rls=RLS))
    )
    assert _lua(ops["standard"]) is None
    (admission, _) = _limits(ops["critical"])
    assert admission["actions"][1]["genericKey"]["descriptorValue"] == "critical"


def test_a_caller_no_entry_names_gets_neither_filter() -> None:
    out = build(llama(_cfg(BUDGETS)), proxy(service_account="batch"), RateLimitOptions(rls=RLS))
    assert LUA_FILTER not in _filters(out) and GLOBAL_FILTER not in _filters(out)
    assert all(not r.typed_per_filter_config for r in _routes(out).values())


def test_request_limits_and_budgets_share_the_per_route_config() -> None:
    annotations = {**BUDGETS, "inferlane.io/global-rate-limit": "sheddable=5"}
    out = build(llama(_cfg(annotations)), proxy(service_account="chat"), RateLimitOptions(rls=RLS))
    routes = _routes(out)
    requests, admission, settlement = _limits(routes["sheddable"])
    assert requests["actions"][-1]["genericKey"]["descriptorValue"] == "sheddable"
    assert "hitsAddend" in admission and settlement["applyOnStreamDone"]
    assert len(_limits(routes["standard"])) == 2  # the request limit names sheddable only


def test_charge_at_end_sends_no_reservation() -> None:
    options = RateLimitOptions(rls=RLS, token_budget_mode=TokenBudgetMode.CHARGE_AT_END)
    out = build(llama(_cfg(BUDGETS)), proxy(service_account="chat"), options)
    admission, settlement = _limits(_routes(out)["standard"])
    assert "hitsAddend" not in admission
    assert settlement["applyOnStreamDone"] and "hitsAddend" in settlement


def test_a_gateway_is_a_caller_too() -> None:
    cfg = _cfg({"inferlane.io/token-budget": "*=1000/h"})
    who = gateway()
    out = build(llama(cfg), who, RateLimitOptions(rls=RLS))
    listener = names.gateway_listener("0.0.0.0", 8080)
    assert _filters(out, listener)[-3:-1] == [LUA_FILTER, GLOBAL_FILTER]
    (admission, _) = _limits(_routes(out, names.gateway_route(8080))["default"])
    assert admission["actions"][2]["genericKey"]["descriptorValue"] == who.identity


def test_every_listener_but_proxyless_ones_says_why_it_refused() -> None:
    the_world = llama(_cfg(BUDGETS))
    for who, listener in (
        (proxy(ip="10.0.0.1", pod="gpu-0"), names.INBOUND_LISTENER),
        (proxy(), names.OUTBOUND_LISTENER),
        (gateway(), names.gateway_listener("0.0.0.0", 8080)),
    ):
        for manager in _managers(_one(build(the_world, who), xds.LISTENER, listener)):
            mappers = manager.local_reply_config.mappers
            reasons = [m.headers_to_add[0].header.value for m in mappers]
            assert reasons == [
                "token-budget",
                "global-rate-limit",
                "rate-limit",
                "critical-caller",
                "concurrency",
            ]
            assert all(m.headers_to_add[0].header.key == REFUSED for m in mappers)
    proxyless = generate(the_world, proxy(proxyless=True), {})
    for api in proxyless[xds.LISTENER]:
        manager = hcm_pb2.HttpConnectionManager()
        api.api_listener.api_listener.Unpack(manager)  # type: ignore[attr-defined]
        assert not manager.HasField("local_reply_config")


def test_routes_guarded_by_critical_callers_are_marked() -> None:
    cfg = replace(_cfg({}), critical_callers=("default/chat",))
    out = build(llama(cfg), proxy(ip="10.0.0.1", pod="gpu-0"))
    (vhost,) = _one(out, xds.ROUTE, names.INBOUND_ROUTE).virtual_hosts
    marked = {
        r.name: json_format.MessageToDict(r.metadata).get("filterMetadata", {})
        for r in vhost.routes
    }
    assert marked["critical"] == {"inferlane": {"refuses": "critical-caller"}}
    assert marked["standard"] == marked["default"] == {}
