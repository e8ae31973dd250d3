"""Refusals say why: the local reply mapping of every sidecar and gateway listener.

SPEC "Refusals": a request that inferlane's config refuses carries
``x-inferlane-refused: REASON``, so that clients can back off. Envoy builds such a
response itself (a *local reply*), and every HTTP connection manager of a sidecar or
gateway gets the same :func:`local_reply_config`. Its mappers see local replies only,
never a model server's own responses, and the first that matches decides. Each tests
what Envoy already knows when it maps the reply (checked against Envoy 1.40):

================= =========================================================================
reason            how the mapper knows
================= =========================================================================
token-budget      the rate-limit service's answer said so: ``refused: token-budget`` in
                  the rate-limit filter's dynamic metadata (:mod:`ratelimit.tokens`)
global-rate-limit response flag ``RL``: the global rate-limit filter sets it before it
                  replies
rate-limit        response code details ``local_rate_limited``: the local filter sets
                  its flag only after replying, so a CEL expression reads the details
critical-caller   a 403 on a route the critical-callers check guards: the mTLS pass
                  (:mod:`routing.secure`) marks those routes with :data:`ROUTE_METADATA`
                  (RBAC records its own verdict only after replying)
concurrency       response flag ``UO``: a class over its share at an endpoint (a circuit
                  breaker overflowed)
================= =========================================================================

A token-budget or global-rate-limit refusal also gets ``retry-after``: the seconds until
the window resets, as the rate-limit filter's ``x-ratelimit-reset`` says.

gRPC proxyless clients get no mapping: they do not implement it, and inferlane's
refusals are made by Envoy's filters, which they do not run either.
"""

from __future__ import annotations

from typing import Any, Final

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import metadata_pb2, string_pb2, value_pb2

from mesh.model import REFUSED_HEADER, Refusal
from ratelimit.tokens import REFUSED_METADATA_KEY, RLS_METADATA_NAMESPACE
from routing.protos import pack

#: Envoy's response flags for a global rate-limit refusal and a circuit-breaker overflow.
RATE_LIMITED_FLAG: Final = "RL"
OVERFLOW_FLAG: Final = "UO"
#: The route metadata namespace, and the key naming the refusal a route's guard makes.
ROUTE_METADATA: Final = "inferlane"
REFUSES_KEY: Final = "refuses"
_CEL_FILTER: Final = "envoy.access_loggers.extension_filters.cel"
_LOCAL_RATE_LIMITED: Final = "response.code_details == 'local_rate_limited'"
_CRITICAL_CALLER: Final = (
    f"response.code == 403 && '{ROUTE_METADATA}' in xds.route_metadata.filter_metadata && "
    f"xds.route_metadata.filter_metadata['{ROUTE_METADATA}']['{REFUSES_KEY}'] == "
    f"'{Refusal.CRITICAL_CALLER}'"
)
_RETRY_AFTER: Final = ("retry-after", "%RESP(x-ratelimit-reset)%")


def _header(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _mapper(reason: Refusal, when: Any, *extra: tuple[str, str]) -> Any:
    headers = [_header(REFUSED_HEADER, str(reason)), *(_header(k, v) for k, v in extra)]
    return hcm_pb2.ResponseMapper(filter=when, headers_to_add=headers)


def _flag(flag: str) -> Any:
    return accesslog_pb2.AccessLogFilter(
        response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=[flag])
    )


def _cel(expression: str) -> Any:
    return accesslog_pb2.AccessLogFilter(
        extension_filter=accesslog_pb2.ExtensionFilter(
            name=_CEL_FILTER, typed_config=pack(cel_pb2.ExpressionFilter(expression=expression))
        )
    )


def _refused_by_service(reason: Refusal) -> Any:
    matcher = metadata_pb2.MetadataMatcher(
        filter=RLS_METADATA_NAMESPACE,
        path=[metadata_pb2.MetadataMatcher.PathSegment(key=REFUSED_METADATA_KEY)],
        value=value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact=str(reason))),
    )
    metadata = accesslog_pb2.MetadataFilter(matcher=matcher)
    metadata.match_if_key_not_found.value = False  # Envoy's default matches a missing key
    return accesslog_pb2.AccessLogFilter(metadata_filter=metadata)


def local_reply_config() -> Any:
    """The HTTP connection manager's ``local_reply_config``: see the module docstring."""
    return hcm_pb2.LocalReplyConfig(
        mappers=[
            _mapper(Refusal.TOKEN_BUDGET, _refused_by_service(Refusal.TOKEN_BUDGET), _RETRY_AFTER),
            _mapper(Refusal.GLOBAL_RATE_LIMIT, _flag(RATE_LIMITED_FLAG), _RETRY_AFTER),
            _mapper(Refusal.RATE_LIMIT, _cel(_LOCAL_RATE_LIMITED)),
            _mapper(Refusal.CRITICAL_CALLER, _cel(_CRITICAL_CALLER)),
            _mapper(Refusal.CONCURRENCY, _flag(OVERFLOW_FLAG)),
        ]
    )


def mark_route(route: Any, reason: Refusal) -> None:
    """Mark ``route`` (in place) as one whose 403s are ``reason`` refusals."""
    route.metadata.filter_metadata[ROUTE_METADATA][REFUSES_KEY] = str(reason)
