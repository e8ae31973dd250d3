"""Token budgets in Envoy: reserve at admission, settle at the end of the stream.

``inferlane.io/token-budget`` gives each calling identity LLM tokens per window. The
caller's own sidecar (or gateway) enforces it through the global rate-limit service,
with no call beyond the one the rate-limit filter already makes, and these building
blocks:

1. **Extraction, in Envoy.** A Lua filter (:func:`token_lua_http_filter`, switched on per
   route by :func:`token_lua_route_config`) reads the request body and writes the
   request's worst case into dynamic metadata (``inferlane.token_budget: reserve``): its
   prompt (``x-inferlane-prompt-tokens`` when the caller sends it, else the body's size
   over :data:`BYTES_PER_TOKEN`) plus ``max_tokens`` (or ``max_completion_tokens``, or
   the Service's ``default-max-tokens``) times the choices asked for (``n``,
   ``best_of``). On the way back it scans the response, streamed or not, chunk by chunk
   and without holding any back, for the ``usage`` the model server reports, and writes
   its ``total_tokens`` (``used``). A response that is not 2xx and reports no usage used
   nothing.
2. **Admission.** The route's first token descriptor,
   ``[service, tokens=TIER, caller]``, goes to the service with the reservation as its
   ``hits_addend``. The service adds it to the caller's window only if it fits, and then
   records it under a fresh id, which it hands back in the response's dynamic metadata
   (``envoy.filters.http.ratelimit: token_reservation``). If it does not fit: 429.
3. **Settlement.** The second descriptor is sent when the stream ends
   (``apply_on_stream_done``): the same entries plus ``reservation=ID``, with the usage as
   its ``hits_addend``. The service replaces the reservation by the usage, so unused
   tokens return to the budget at once.

Where Envoy falls short, and how this works around it
=====================================================

- ``hits_addend`` is unsigned, so a settlement cannot say "minus the unused part". The
  service keeps each reservation under an id it chose itself and applies ``used -
  reserved``. A settlement that names an id the service does not hold for that caller
  (forged, replayed, or from a window that has ended) changes nothing.
- Envoy 1.40 accepts ``hits_addend`` on a route's own ``rate_limits`` but does not send
  it; only the filter's per-route ``RateLimitPerRoute.rate_limits`` do. And a route with
  per-route rate limits ignores its own. So every descriptor of the global filter,
  request limits included, goes into the per-route config (see :mod:`routing.limits`).
- A ``hits_addend`` format that yields no number drops its descriptor. A stream that dies
  before the model server reports usage therefore sends no settlement, and its
  reservation stands: it is settled at its reservation, as it should be.
- A streamed completion reports ``usage`` only when asked to
  (``stream_options.include_usage``). Without it there is nothing to settle with, and the
  request is charged its reservation.

Charge at the end
=================

:attr:`TokenBudgetMode.CHARGE_AT_END` is Envoy AI Gateway's method, for comparison: the
admission descriptor carries no reservation (the service counts one token, as
envoyproxy/ratelimit does for a request without ``hits_addend``, and refuses once the
window is spent), and the settlement charges the usage. Every stream admitted before
the budget is seen to be spent is free, so a window overshoots by about the caller's
concurrency times a request's cost.
"""

from __future__ import annotations

import enum
from typing import Any, Final

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.metadata.v3 import metadata_pb2
from google.protobuf import any_pb2

from mesh.model import BudgetTier
from ratelimit.local import (
    CALLER_KEY,
    GLOBAL_RATELIMIT_FILTER,
    SERVICE_KEY,
    generic_key_action,
)

#: Descriptor keys: the budget's tier, and (settlements only) the reservation's id.
TOKENS_KEY: Final = "tokens"
RESERVATION_KEY: Final = "reservation"
#: The reservation a settlement names when admission made none (charge-at-end, or the
#: service let the request through without counting it): the usage is charged as is.
NO_RESERVATION: Final = "none"

#: The Lua filter, and the name of its token-budget script.
LUA_FILTER: Final = "envoy.filters.http.lua"
LUA_SOURCE_NAME: Final = "inferlane.token_budget"
#: Where the script writes what a request may cost (``reserve``) and did cost (``used``).
METADATA_NAMESPACE: Final = "inferlane.token_budget"
RESERVE_KEY: Final = "reserve"
USED_KEY: Final = "used"
#: Where Envoy's rate-limit filter keeps the dynamic metadata a service answer carries,
#: and the keys the service uses in it.
RLS_METADATA_NAMESPACE: Final = GLOBAL_RATELIMIT_FILTER
RESERVATION_METADATA_KEY: Final = "token_reservation"
REFUSED_METADATA_KEY: Final = "refused"

#: A request header in which a caller that counted its prompt's tokens may say so. It is
#: believed up to the body's size in bytes (no token is shorter than a byte).
PROMPT_TOKENS_HEADER: Final = "x-inferlane-prompt-tokens"
#: Prompt tokens estimated from the body: one per this many bytes of it, JSON included.
#: OpenAI's rule of thumb for English; the JSON around the prompt keeps it on the high side.
BYTES_PER_TOKEN: Final = 4
#: Most choices (``n``, ``best_of``) a reservation multiplies the completion by.
MAX_CHOICES: Final = 128
#: Bytes of one response chunk kept to find a ``usage`` object split across two chunks.
USAGE_TAIL_BYTES: Final = 1024


class TokenBudgetMode(enum.StrEnum):
    """How a proxy charges token budgets (``inferlane serve --token-budget-mode``)."""

    #: Reserve the worst case at admission, replace it by the usage at the end.
    RESERVE = "reserve"
    #: Check at admission, charge the usage at the end (Envoy AI Gateway's method).
    CHARGE_AT_END = "charge-at-end"


LUA_SOURCE: Final = f"""\
-- inferlane token budgets: what a request may cost, then what it did cost.
local NS = "{METADATA_NAMESPACE}"

local function largest(text, key)
  local found = 0
  for value in string.gmatch(text, '"' .. key .. '"%s*:%s*(%d+)') do
    local n = tonumber(value)
    if n > found then found = n end
  end
  return found
end

local function setting(handle, key, default)
  for name, value in pairs(handle:filterContext()) do
    if name == key then return tonumber(value) or default end
  end
  return default
end

function envoy_on_request(handle)
  local body = handle:body()
  if body == nil or body:length() == 0 then return end
  local size = body:length()
  local text = body:getBytes(0, size)
  local completion = math.max(largest(text, "max_tokens"), largest(text, "max_completion_tokens"))
  if completion == 0 then completion = setting(handle, "default_max_tokens", 0) end
  local choices = math.min(math.max(1, largest(text, "n"), largest(text, "best_of")), {MAX_CHOICES})
  local prompt = math.ceil(size / {BYTES_PER_TOKEN})
  local claimed = tonumber(handle:headers():get("{PROMPT_TOKENS_HEADER}") or "")
  if claimed ~= nil and claimed >= 1 and claimed <= size then prompt = math.floor(claimed) end
  handle:streamInfo():dynamicMetadata():set(NS, "{RESERVE_KEY}", prompt + completion * choices)
end

local function usage_in(text)
  local used = nil
  local from = 1
  while true do
    local start, stop = string.find(text, '"usage"%s*:%s*{{', from)
    if start == nil then return used end
    local object = string.sub(text, stop, stop + {USAGE_TAIL_BYTES})
    local total = string.match(object, '"total_tokens"%s*:%s*(%d+)')
    if total ~= nil then used = tonumber(total) end
    from = stop + 1
  end
end

function envoy_on_response(handle)
  local reserved = handle:streamInfo():dynamicMetadata():get(NS)
  if reserved == nil then return end
  local status = handle:headers():get(":status") or ""
  local used = nil
  local tail = ""
  for chunk in handle:bodyChunks() do
    local text = tail .. chunk:getBytes(0, chunk:length())
    used = usage_in(text) or used
    tail = string.sub(text, -{USAGE_TAIL_BYTES})
  end
  if used == nil and string.sub(status, 1, 1) ~= "2" then used = 0 end
  if used ~= nil then handle:streamInfo():dynamicMetadata():set(NS, "{USED_KEY}", used) end
end
"""


def _pack(message: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def token_lua_http_filter() -> Any:
    """The listener's Lua filter, before the rate-limit filter. It carries the script but
    runs it only on routes that :func:`token_lua_route_config` switches it on for."""
    config = lua_pb2.Lua(
        source_codes={LUA_SOURCE_NAME: base_pb2.DataSource(inline_string=LUA_SOURCE)}
    )
    return hcm_pb2.HttpFilter(name=LUA_FILTER, typed_config=_pack(config))


def token_lua_route_config(default_max_tokens: int) -> Any:
    """A budgeted route's ``typed_per_filter_config[LUA_FILTER]``: the script, with the
    Service's ``default-max-tokens`` for requests that name none."""
    config = lua_pb2.LuaPerRoute(name=LUA_SOURCE_NAME)
    config.filter_context["default_max_tokens"] = default_max_tokens
    return _pack(config)


def _metadata(namespace: str, key: str) -> str:
    return f"%DYNAMIC_METADATA({namespace}:{key})%"


def budget_entries(service: str, tier: BudgetTier, caller: str) -> tuple[tuple[str, str], ...]:
    """The entries of a token descriptor, as (key, value) pairs: the budget's counter."""
    return ((SERVICE_KEY, service), (TOKENS_KEY, str(tier)), (CALLER_KEY, caller))


def budget_rate_limits(
    service: str, tier: BudgetTier, caller: str, mode: TokenBudgetMode = TokenBudgetMode.RESERVE
) -> list[Any]:
    """The admission and settlement descriptors of a route whose requests draw from a
    budget of ``tier``, for the filter's per-route ``rate_limits`` (see the module
    docstring). ``service`` is ``NS/NAME`` and ``caller`` the proxy's ``NS/SA``."""
    actions = [generic_key_action(k, v) for k, v in budget_entries(service, tier, caller)]
    admission = route_components_pb2.RateLimit(actions=actions)
    if mode is TokenBudgetMode.RESERVE:
        admission.hits_addend.format = _metadata(METADATA_NAMESPACE, RESERVE_KEY)
    reservation = route_components_pb2.RateLimit.Action(
        metadata=route_components_pb2.RateLimit.Action.MetaData(
            descriptor_key=RESERVATION_KEY,
            metadata_key=metadata_pb2.MetadataKey(
                key=RLS_METADATA_NAMESPACE,
                path=[metadata_pb2.MetadataKey.PathSegment(key=RESERVATION_METADATA_KEY)],
            ),
            default_value=NO_RESERVATION,
            source=route_components_pb2.RateLimit.Action.MetaData.DYNAMIC,
        )
    )
    settlement = route_components_pb2.RateLimit(
        actions=[*actions, reservation], apply_on_stream_done=True
    )
    settlement.hits_addend.format = _metadata(METADATA_NAMESPACE, USED_KEY)
    return [admission, settlement]


def split_settlement(
    entries: tuple[tuple[str, str], ...],
) -> tuple[tuple[tuple[str, str], ...], str] | None:
    """``(counter entries, reservation)`` when ``entries`` are a settlement's (the budget's
    entries followed by ``reservation=ID``), else None."""
    if len(entries) < 2 or entries[-1][0] != RESERVATION_KEY:
        return None
    counter = entries[:-1]
    if not any(key == TOKENS_KEY for key, _ in counter):
        return None
    return counter, entries[-1][1]


def is_token_descriptor(entries: tuple[tuple[str, str], ...]) -> bool:
    """Whether ``entries`` name a token budget (an admission or a settlement)."""
    return any(key == TOKENS_KEY for key, _ in entries)
