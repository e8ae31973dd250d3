"""The class passed on to the model server's own scheduler (``scheduling-policy: priority``).

vLLM started with ``--scheduling-policy priority`` orders its queue by the request body's
``priority`` (lower first) and preempts lower-priority sequences when a higher one needs
room: the one mechanism that keeps a GPU's batch full and critical first at once. For a
Service annotated ``inferlane.io/scheduling-policy: priority``, each endpoint's sidecar
writes the class its inbound route serves (after the caller check) into the body as
:data:`MODEL_PRIORITY`.

How: Envoy's Lua filter on the inbound listener, with no code of its own, and on each
inbound route of such a Service a per-route script that appends ``"priority": N`` before
the body's closing brace. Appended last, it wins over a ``priority`` the client sent
(Python's JSON parser, and so vLLM's, keeps the last of duplicate keys), so no client
can jump the queue. Only a POST whose body is a JSON object is touched, and not a body
with a ``content-encoding``. Envoy recomputes ``content-length``.

What it costs: the request body is buffered at the sidecar before it is forwarded (a
prompt is sent in one piece anyway), up to :data:`MAX_BODY_BYTES` per request (Envoy's
default of 1 MiB would refuse long prompts with 413), and one Lua call per request.

Why not by default: vLLM's default scheduler (``fcfs``) refuses any request whose
``priority`` is not 0 with 400, so the class can only be passed to servers started with
the priority policy. The Service says so.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Final

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from mesh.model import Priority
from routing.protos import pack

LUA_FILTER: Final = "envoy.filters.http.lua"

#: vLLM's ``priority`` per class: lower runs first. Critical is 0, the value vLLM gives
#: a request that names none.
MODEL_PRIORITY: Final = MappingProxyType(
    {Priority.CRITICAL: 0, Priority.STANDARD: 1, Priority.SHEDDABLE: 2}
)

#: The largest request body the sidecar rewrites, in bytes: a long prompt (a 128k-token
#: context is about 512 KB of text; images inline as base64 are larger) fits well.
MAX_BODY_BYTES: Final = 64 * 1024 * 1024

_SCRIPT: Final = """\
-- inferlane: the request's class as the model server's "priority" (lower runs first).
function envoy_on_request(handle)
  local headers = handle:headers()
  if headers:get(":method") ~= "POST" or headers:get("content-encoding") ~= nil then
    return
  end
  local body = handle:body()
  if body == nil then
    return
  end
  local size = body:length()
  local text = body:getBytes(0, size)
  local first = text:find("%S")
  if first == nil or text:byte(first) ~= 123 then
    return
  end
  local last = size
  while last > first and text:byte(last) <= 32 do
    last = last - 1
  end
  if last == first or text:byte(last) ~= 125 then
    return
  end
  local separator = ","
  if text:find("%S", first + 1) == last then
    separator = ""
  end
  body:setBytes(text:sub(1, last - 1) .. separator .. '"priority":PRIORITY' .. text:sub(last))
end
"""


def lua_filter() -> Any:
    """The Lua HTTP filter with no code of its own: only per-route scripts run."""
    return hcm_pb2.HttpFilter(name=LUA_FILTER, typed_config=pack(lua_pb2.Lua()))


def script(priority: Priority) -> str:
    """The Lua script that writes ``priority``'s :data:`MODEL_PRIORITY` into the body."""
    return _SCRIPT.replace("PRIORITY", str(MODEL_PRIORITY[priority]))


def per_route(priority: Priority) -> Any:
    """The route-level Lua config for a route served as ``priority``."""
    return pack(
        lua_pb2.LuaPerRoute(source_code=base_pb2.DataSource(inline_string=script(priority)))
    )
