"""Envoy building blocks for rate limiting: local token buckets and the global RLS filter.

These are pure functions that return Envoy protobuf messages. ``routing`` composes them
into listeners and routes; nothing here knows about proxies or streams.

How to use them
===============

Local (per endpoint, per class; SPEC ``inferlane.io/rate-limit``), on the *inbound*
sidecar of each backend endpoint:

1. Put :func:`local_ratelimit_http_filter` in the HTTP connection manager's filter list,
   before the router. It carries only a ``stat_prefix``: without ``filter_enabled`` it is
   off, and limits only where a route's own config turns it on.
2. On each per-class route, set
   ``route.typed_per_filter_config[LOCAL_RATELIMIT_FILTER].CopyFrom(bucket)`` with the
   ``bucket`` that :func:`class_buckets` (or :func:`per_route_bucket`) returns. Classes
   without a bucket are not limited: critical, unless the annotation names it.

Global (per calling identity and class, across all endpoints; SPEC
``inferlane.io/global-rate-limit``), on the *caller's outbound* sidecar (or gateway):

1. Put :func:`global_ratelimit_http_filter` in the filter list, before the router, with
   the name of a cluster that reaches the rate-limit service (:func:`rls_cluster` builds
   one; it must speak HTTP/2).
2. On each per-class route of a Service with a global limit, put
   :func:`route_rate_limits` in the filter's per-route ``RateLimitPerRoute.rate_limits``
   (with any token-budget descriptors, :mod:`ratelimit.tokens`: a route with per-route
   rate limits ignores its own ``route.rate_limits``). Each request then sends one
   descriptor ``[("service", "NS/NAME"), ("caller", "NS/SA"), ("priority", CLASS)]`` to
   the service, which ``ratelimit.rules`` matches.

The caller's identity is constant per proxy (config is generated per proxy), so it is a
``generic_key``. The priority is the *route's* class, also a ``generic_key``: routes are
already split by class (after lower-casing, defaulting and the caller clamp), so the
descriptor carries the class the request is actually served as, whatever the spelling
or absence of its ``x-inference-priority`` header.

Fractional rates
================

Envoy's token bucket takes whole ``tokens_per_fill`` per ``fill_interval``, and Envoy
reads the interval in whole milliseconds and rejects intervals under 50 ms. A rate
``p/q`` (the decimal the annotation spelled, as an exact fraction in lowest terms) is
turned into ``tokens_per_fill = t`` and ``fill_interval = t*q/p`` seconds with the
smallest ``t`` for which that interval is a whole number of milliseconds and at least
50 ms. Then ``tokens_per_fill / fill_interval == p/q`` exactly: 20 rps is one token per
50 ms, 2.5 rps one token per 400 ms, 0.5 rps one token per 2 s, 1000 rps 50 tokens per
50 ms, 0.7 rps 7 tokens per 10 s. Envoy 1.40 refills continuously at that ratio, so a
long interval does not make a rate bursty; the bucket's depth (``max_tokens``) is the
burst, one second's worth unless given.

An annotation spells a decimal, which this handles exactly. A computed float with no
short decimal form (1/3) gets the nearest fraction that fits (see :func:`bucket_shape`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.ratelimit.v3 import rls_pb2 as rls_config_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_ratelimit_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import http_status_pb2, percent_pb2, token_bucket_pb2
from google.protobuf import any_pb2, duration_pb2

from mesh.model import Priority, ServiceConfig
from ratelimit.adaptive import class_limits

log = logging.getLogger(__name__)

#: The local rate-limit HTTP filter's name; also the ``typed_per_filter_config`` key.
LOCAL_RATELIMIT_FILTER = "envoy.filters.http.local_ratelimit"
#: The global rate-limit HTTP filter's name.
GLOBAL_RATELIMIT_FILTER = "envoy.filters.http.ratelimit"
#: The rate-limit domain of every descriptor inferlane sends, and of its rules.
DOMAIN = "inferlane"
#: Descriptor keys, in the order the actions emit them.
SERVICE_KEY = "service"
CALLER_KEY = "caller"
PRIORITY_KEY = "priority"
#: Added to every response the local bucket refuses; Envoy's router knows this header.
RATELIMITED_HEADER = "x-envoy-ratelimited"

#: Envoy refuses token-bucket fill intervals under 50 ms.
MIN_FILL_INTERVAL_MS = 50
#: ``tokens_per_fill`` and ``max_tokens`` are uint32 in Envoy's API.
MAX_UINT32 = 2**32 - 1
#: The longest google.protobuf.Duration (10,000 years).
MAX_DURATION_S = 315_576_000_000
#: How long Envoy waits for the rate-limit service before applying failure_mode_deny.
#: Envoy's default is 20 ms; a Python service on a busy node needs more headroom.
DEFAULT_RLS_TIMEOUT_S = 0.1

_HUNDRED_PERCENT = base_pb2.RuntimeFractionalPercent(
    default_value=percent_pb2.FractionalPercent(
        numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED
    )
)


class BucketError(ValueError):
    """A rate that no Envoy token bucket can express (not positive, not finite, too large)."""


@dataclass(frozen=True)
class BucketShape:
    """An exact bucket: ``tokens_per_fill`` every ``fill_interval_ms``, ``max_tokens`` deep."""

    tokens_per_fill: int
    fill_interval_ms: int
    max_tokens: int

    @property
    def rate(self) -> Fraction:
        """Tokens per second, exactly."""
        return Fraction(self.tokens_per_fill * 1000, self.fill_interval_ms)


def exact_rate(rps: float | int | str | Decimal | Fraction) -> Fraction:
    """``rps`` as an exact fraction.

    A float becomes the shortest decimal that prints as it (``0.1`` is 1/10, not the
    binary float nearest to it), which is what an annotation like ``sheddable=0.1``
    meant.
    """
    if isinstance(rps, Fraction):
        return rps
    if isinstance(rps, float):
        if not math.isfinite(rps):
            raise BucketError(f"rate {rps!r} is not a finite number")
        return Fraction(repr(rps))
    try:
        return Fraction(rps)
    except (ValueError, ArithmeticError) as exc:
        raise BucketError(f"rate {rps!r} is not a number: {exc}") from None


def _exact_shape(rate: Fraction) -> tuple[int, int] | None:
    """``(tokens_per_fill, fill_interval_ms)`` with exactly ``rate``, or None if none fits."""
    p, q = rate.numerator, rate.denominator
    # interval_ms = t * q * 1000 / p must be whole: t must be a multiple of t0.
    t0 = p // math.gcd(p, q * 1000)
    # interval_ms >= MIN_FILL_INTERVAL_MS  <=>  t >= MIN * p / (q * 1000)
    t_min = math.ceil(Fraction(MIN_FILL_INTERVAL_MS * p, q * 1000))
    tokens = t0 * max(1, math.ceil(Fraction(t_min, t0)))
    interval_ms = tokens * q * 1000 // p
    if tokens > MAX_UINT32 or interval_ms > MAX_DURATION_S * 1000:
        return None
    return tokens, interval_ms


def bucket_shape(
    rps: float | int | str | Decimal | Fraction, burst: int | None = None
) -> BucketShape:
    """The exact token bucket for ``rps`` requests per second (see the module docstring).

    A rate with so many digits that no bucket holds it exactly (a computed float such as
    1/3 = 0.333...) gets the nearest fraction with a denominator up to a million, then a
    thousand, that fits.

    ``burst`` is the bucket depth (``max_tokens``): how many requests may arrive at once
    after a quiet spell. The default is one second's worth (at least one). Envoy 1.40
    refills its buckets continuously at ``tokens_per_fill / fill_interval``, so the depth
    does not change the rate even when it is smaller than one fill.
    """
    rate = exact_rate(rps)
    if rate <= 0:
        raise BucketError(f"rate {rps!r} must be greater than zero")
    for candidate in (rate, rate.limit_denominator(10**6), rate.limit_denominator(1000)):
        shape = _exact_shape(candidate) if candidate > 0 else None
        if shape is not None:
            break
    else:
        raise BucketError(f"rate {rps!r} cannot be expressed as an Envoy token bucket")
    if candidate != rate:
        log.debug("rate %r has no exact token bucket; using %s", rps, candidate)
    tokens, interval_ms = shape
    depth = burst if burst is not None else max(1, math.ceil(candidate))
    if not 0 < depth <= MAX_UINT32:
        raise BucketError(f"burst {depth!r} must be between 1 and {MAX_UINT32}")
    return BucketShape(tokens_per_fill=tokens, fill_interval_ms=interval_ms, max_tokens=depth)


def _pack(message: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def local_ratelimit_http_filter(
    stat_prefix: str = "inferlane_local_rate_limit", *, optional: bool = False
) -> Any:
    """The listener-level local_ratelimit filter: only a ``stat_prefix``, no bucket.

    It limits nothing by itself; per-route buckets (:func:`per_route_bucket`) turn it on
    route by route. ``optional`` marks it ``is_optional`` for gRPC proxyless clients,
    which reject filters they do not implement otherwise.
    """
    config = local_rate_limit_pb2.LocalRateLimit(stat_prefix=stat_prefix)
    return hcm_pb2.HttpFilter(
        name=LOCAL_RATELIMIT_FILTER, typed_config=_pack(config), is_optional=optional
    )


def local_rate_limit(
    rps: float | int | str | Decimal | Fraction,
    burst: int | None = None,
    *,
    stat_prefix: str = "inferlane_local_rate_limit",
) -> Any:
    """The unpacked ``LocalRateLimit`` message that :func:`per_route_bucket` packs."""
    shape = bucket_shape(rps, burst)
    return local_rate_limit_pb2.LocalRateLimit(
        stat_prefix=stat_prefix,
        status=http_status_pb2.HttpStatus(code=http_status_pb2.TooManyRequests),
        token_bucket=token_bucket_pb2.TokenBucket(
            max_tokens=shape.max_tokens,
            tokens_per_fill={"value": shape.tokens_per_fill},
            fill_interval=duration_pb2.Duration(
                seconds=shape.fill_interval_ms // 1000,
                nanos=(shape.fill_interval_ms % 1000) * 1_000_000,
            ),
        ),
        filter_enabled=_HUNDRED_PERCENT,
        filter_enforced=_HUNDRED_PERCENT,
        response_headers_to_add=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=RATELIMITED_HEADER, value="true"),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        ],
        enable_x_ratelimit_headers=common_ratelimit_pb2.DRAFT_VERSION_03,
    )


def per_route_bucket(
    rps: float | int | str | Decimal | Fraction,
    burst: int | None = None,
    *,
    stat_prefix: str = "inferlane_local_rate_limit",
) -> Any:
    """A route's ``typed_per_filter_config[LOCAL_RATELIMIT_FILTER]``: a token bucket.

    Requests over ``rps`` (with ``burst`` depth, see :func:`bucket_shape`) get 429 with
    ``x-envoy-ratelimited: true``; every response carries the draft-03
    ``X-RateLimit-*`` headers. Raises :class:`BucketError` for a rate no bucket can hold.
    """
    return _pack(local_rate_limit(rps, burst, stat_prefix=stat_prefix))


def class_buckets(
    rate_limit: Mapping[Priority, float], *, stat_prefix: str = "inferlane_local"
) -> dict[Priority, Any]:
    """Per-class buckets for a Service's ``rate_limit`` (or adaptive limits derived from it).

    Only the classes the mapping names get a bucket: critical is never limited unless
    the annotation names it. A rate no bucket can express is logged and left out, so
    one bad value never breaks the rest of the config.
    """
    buckets: dict[Priority, Any] = {}
    for priority, rps in rate_limit.items():
        try:
            buckets[priority] = per_route_bucket(rps, stat_prefix=f"{stat_prefix}_{priority}")
        except BucketError as exc:
            log.warning("no local rate limit for class %s: %s", priority, exc)
    return buckets


def endpoint_buckets(
    config: ServiceConfig, multipliers: Mapping[Priority, float] | None = None
) -> dict[Priority, Any]:
    """One endpoint's per-class buckets, for its inbound sidecar's per-class routes.

    The Service's ``rate-limit``, scaled by the adaptive controller's ``multipliers`` for
    that endpoint when the Service is adaptive (:func:`ratelimit.adaptive.class_limits`).
    """
    return class_buckets(class_limits(config, multipliers).rate)


def _duration(seconds: float) -> Any:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def global_ratelimit_http_filter(
    cluster_name: str,
    *,
    failure_mode_deny: bool = False,
    timeout_s: float = DEFAULT_RLS_TIMEOUT_S,
    domain: str = DOMAIN,
    stat_prefix: str = "inferlane",
    optional: bool = False,
) -> Any:
    """The global rate-limit filter, asking the service at ``cluster_name`` (gRPC, v3).

    ``failure_mode_deny``: when the service errs or does not answer within
    ``timeout_s``, refuse the request (True) or let it through (False, Envoy's default).
    Responses carry the draft-03 ``X-RateLimit-*`` headers computed from the service's
    answer.
    """
    config = rate_limit_pb2.RateLimit(
        domain=domain,
        timeout=_duration(timeout_s),
        failure_mode_deny=failure_mode_deny,
        rate_limit_service=rls_config_pb2.RateLimitServiceConfig(
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=cluster_name),
                timeout=_duration(timeout_s),
            ),
            transport_api_version=config_source_pb2.V3,
        ),
        enable_x_ratelimit_headers=rate_limit_pb2.RateLimit.DRAFT_VERSION_03,
        stat_prefix=stat_prefix,
    )
    return hcm_pb2.HttpFilter(
        name=GLOBAL_RATELIMIT_FILTER, typed_config=_pack(config), is_optional=optional
    )


def generic_key_action(key: str, value: str) -> Any:
    """A rate-limit action that adds the entry ``(key, value)`` to its descriptor."""
    return route_components_pb2.RateLimit.Action(
        generic_key=route_components_pb2.RateLimit.Action.GenericKey(
            descriptor_key=key, descriptor_value=value
        )
    )


def descriptor_entries(
    service: str, caller: str, priority: Priority
) -> tuple[tuple[str, str], ...]:
    """The descriptor :func:`route_rate_limits` makes Envoy send, as (key, value) pairs."""
    return ((SERVICE_KEY, service), (CALLER_KEY, caller), (PRIORITY_KEY, str(priority)))


def route_rate_limits(
    service: str,
    caller: str,
    priority: Priority,
    global_rate_limit: Mapping[Priority, float],
) -> list[Any]:
    """The ``rate_limits`` of one per-class route, for :func:`global_ratelimit_http_filter`.

    ``service`` is ``NS/NAME``, ``caller`` the proxy's identity (``NS/SA``), ``priority``
    the route's class. Empty when ``global_rate_limit`` does not name the class, so no
    call to the service is made for unlimited classes.
    """
    if priority not in global_rate_limit or not service or not caller:
        return []
    actions = [generic_key_action(k, v) for k, v in descriptor_entries(service, caller, priority)]
    return [route_components_pb2.RateLimit(actions=actions)]


def rls_cluster(name: str, host: str, port: int, *, connect_timeout_s: float = 1.0) -> Any:
    """A STATIC cluster that reaches the rate-limit service over HTTP/2 (gRPC needs it)."""
    options = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=host, port_value=port)
            )
        )
    )
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=_duration(connect_timeout_s),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])],
        ),
    )
    cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].Pack(options)
    return cluster
