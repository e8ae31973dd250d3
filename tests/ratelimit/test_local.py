"""The Envoy building blocks: exact buckets, message shapes, and Envoy's own validation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_ratelimit_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from mesh.model import Priority, ServiceConfig
from ratelimit import local
from ratelimit.local import (
    GLOBAL_RATELIMIT_FILTER,
    LOCAL_RATELIMIT_FILTER,
    BucketError,
    bucket_shape,
    class_buckets,
    endpoint_buckets,
    global_ratelimit_http_filter,
    local_ratelimit_http_filter,
    per_route_bucket,
    rls_cluster,
    route_rate_limits,
)

ENVOY = Path(sys.executable).parent / "envoy"


def _unpack_local(packed: Any) -> Any:
    msg = local_rate_limit_pb2.LocalRateLimit()
    assert packed.Unpack(msg)
    return msg


# --- exact conversion -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rps", "tokens", "interval_ms"),
    [
        (20, 1, 50),
        (2.5, 1, 400),
        (0.5, 1, 2000),
        (1000, 50, 50),
        (0.7, 7, 10_000),
        (0.1, 1, 10_000),
        (3, 3, 1000),
        (7.3, 73, 10_000),
        ("0.25", 1, 4000),
    ],
)
def test_fractional_rates_become_exact_buckets(rps: Any, tokens: int, interval_ms: int) -> None:
    shape = bucket_shape(rps)
    assert (shape.tokens_per_fill, shape.fill_interval_ms) == (tokens, interval_ms)
    assert shape.rate == Fraction(str(rps))


@given(
    st.decimals(
        min_value=Decimal("0.001"),
        max_value=Decimal("100000"),
        places=3,
        allow_nan=False,
        allow_infinity=False,
    )
)
def test_every_decimal_rate_is_exact(rate: Decimal) -> None:
    shape = bucket_shape(rate)
    assert shape.rate == Fraction(rate)
    assert shape.fill_interval_ms >= local.MIN_FILL_INTERVAL_MS
    assert 1 <= shape.tokens_per_fill <= local.MAX_UINT32
    assert shape.max_tokens >= 1


@given(st.floats(min_value=1e-3, max_value=1e6, allow_nan=False))
def test_any_float_rate_gets_a_bucket_within_a_millionth(rate: float) -> None:
    shape = bucket_shape(rate)
    assert abs(float(shape.rate) - rate) <= rate * 1e-6
    assert shape.fill_interval_ms >= local.MIN_FILL_INTERVAL_MS


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "x", 1e-12])
def test_impossible_rates_are_refused(bad: Any) -> None:
    with pytest.raises(BucketError):
        bucket_shape(bad)


def test_burst_sets_depth_and_defaults_to_a_second() -> None:
    assert bucket_shape(20).max_tokens == 20
    assert bucket_shape(0.5).max_tokens == 1
    assert bucket_shape(20, burst=5).max_tokens == 5
    with pytest.raises(BucketError):
        bucket_shape(20, burst=0)


# --- message shapes ---------------------------------------------------------------------


def test_listener_filter_has_only_a_stat_prefix() -> None:
    f = local_ratelimit_http_filter()
    assert f.name == LOCAL_RATELIMIT_FILTER
    cfg = _unpack_local(f.typed_config)
    assert cfg.stat_prefix
    assert not cfg.HasField("token_bucket")
    assert not cfg.HasField("filter_enabled")
    assert local_ratelimit_http_filter(optional=True).is_optional


def test_per_route_bucket_enforces_and_marks_429() -> None:
    cfg = _unpack_local(per_route_bucket(2.5, stat_prefix="p"))
    assert cfg.stat_prefix == "p"
    assert cfg.status.code == 429
    assert cfg.token_bucket.tokens_per_fill.value == 1
    assert cfg.token_bucket.fill_interval.ToMilliseconds() == 400
    assert cfg.token_bucket.max_tokens == 3
    for pct in (cfg.filter_enabled, cfg.filter_enforced):
        assert pct.default_value.numerator == 100
        assert pct.default_value.denominator == 0  # HUNDRED
    headers = {h.header.key: h.header.value for h in cfg.response_headers_to_add}
    assert headers == {"x-envoy-ratelimited": "true"}
    assert cfg.enable_x_ratelimit_headers == common_ratelimit_pb2.DRAFT_VERSION_03


def test_class_buckets_leave_critical_alone_unless_named() -> None:
    buckets = class_buckets({Priority.STANDARD: 20.0, Priority.SHEDDABLE: 5.0})
    assert set(buckets) == {Priority.STANDARD, Priority.SHEDDABLE}
    assert (
        _unpack_local(buckets[Priority.SHEDDABLE]).token_bucket.fill_interval.ToMilliseconds()
        == 200
    )
    named = class_buckets({Priority.CRITICAL: 100.0})
    assert set(named) == {Priority.CRITICAL}


def test_class_buckets_skip_a_bad_rate_and_keep_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    buckets = class_buckets({Priority.STANDARD: 0.0, Priority.SHEDDABLE: 5.0})
    assert set(buckets) == {Priority.SHEDDABLE}
    assert "standard" in caplog.text


def test_endpoint_buckets_follow_the_adaptive_multipliers() -> None:
    config = ServiceConfig(
        enabled=True,
        adaptive=True,
        rate_limit=MappingProxyType({Priority.STANDARD: 20.0, Priority.SHEDDABLE: 4.0}),
    )
    buckets = endpoint_buckets(config, {Priority.SHEDDABLE: 0.25})
    shed = _unpack_local(buckets[Priority.SHEDDABLE]).token_bucket
    assert (shed.tokens_per_fill.value, shed.fill_interval.ToMilliseconds()) == (1, 1000)
    std = _unpack_local(buckets[Priority.STANDARD]).token_bucket
    assert std.fill_interval.ToMilliseconds() == 50  # 20 rps, untouched
    assert set(endpoint_buckets(config)) == {Priority.STANDARD, Priority.SHEDDABLE}


def test_global_filter_points_at_the_cluster() -> None:
    f = global_ratelimit_http_filter("rls", failure_mode_deny=True, timeout_s=0.25)
    assert f.name == GLOBAL_RATELIMIT_FILTER
    cfg = rate_limit_pb2.RateLimit()
    assert f.typed_config.Unpack(cfg)
    assert cfg.domain == "inferlane"
    assert cfg.failure_mode_deny
    assert cfg.rate_limit_service.grpc_service.envoy_grpc.cluster_name == "rls"
    assert cfg.rate_limit_service.transport_api_version == 2  # V3
    assert cfg.enable_x_ratelimit_headers == rate_limit_pb2.RateLimit.DRAFT_VERSION_03
    assert cfg.timeout.ToMilliseconds() == 250


def test_route_rate_limits_send_service_caller_and_class() -> None:
    limits = {Priority.SHEDDABLE: 100.0}
    [rl] = route_rate_limits("default/llama", "team-a/client", Priority.SHEDDABLE, limits)
    got = [(a.generic_key.descriptor_key, a.generic_key.descriptor_value) for a in rl.actions]
    assert got == [
        ("service", "default/llama"),
        ("caller", "team-a/client"),
        ("priority", "sheddable"),
    ]
    assert route_rate_limits("default/llama", "team-a/client", Priority.CRITICAL, limits) == []


# --- Envoy's own validation --------------------------------------------------------------


def _bootstrap() -> Any:
    routes = []
    limits = {Priority.STANDARD: 20.0, Priority.SHEDDABLE: 2.5}
    buckets = class_buckets(limits)
    for priority in (Priority.CRITICAL, Priority.STANDARD, Priority.SHEDDABLE):
        route = route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(cluster="backend"),
        )
        route.match.headers.add(name="x-inference-priority").string_match.exact = str(priority)
        if priority in buckets:
            route.typed_per_filter_config[LOCAL_RATELIMIT_FILTER].CopyFrom(buckets[priority])
        route.route.rate_limits.extend(
            route_rate_limits("default/llama", "team-a/client", priority, limits)
        )
        routes.append(route)
    router = hcm_pb2.HttpFilter(name="envoy.filters.http.router")
    router.typed_config.Pack(router_pb2.Router())
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="test",
        route_config=route_pb2.RouteConfiguration(
            name="local",
            virtual_hosts=[
                route_components_pb2.VirtualHost(name="llama", domains=["*"], routes=routes)
            ],
        ),
        http_filters=[
            local_ratelimit_http_filter(),
            global_ratelimit_http_filter("inferlane-rls"),
            router,
        ],
    )
    listener = listener_pb2.Listener(
        name="test",
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=0)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager"
                    )
                ]
            )
        ],
    )
    listener.filter_chains[0].filters[0].typed_config.Pack(hcm)
    boot = bootstrap_pb2.Bootstrap()
    boot.static_resources.listeners.append(listener)
    boot.static_resources.clusters.extend(
        [rls_cluster("inferlane-rls", "127.0.0.1", 8081), rls_cluster("backend", "127.0.0.1", 8000)]
    )
    return boot


@pytest.mark.envoy
def test_envoy_accepts_the_filters_buckets_and_actions(tmp_path: Path) -> None:
    envoy = str(ENVOY) if ENVOY.exists() else shutil.which("envoy")
    if envoy is None:
        pytest.skip("no envoy binary")
    config = tmp_path / "bootstrap.json"
    config.write_text(json.dumps(json_format.MessageToDict(_bootstrap())))
    proc = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(config), "--disable-hot-restart", "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout + proc.stderr


@pytest.mark.envoy
def test_envoy_rejects_a_broken_bucket(tmp_path: Path) -> None:
    """The validation above can fail: a bucket under Envoy's 50 ms minimum is refused."""
    envoy = str(ENVOY) if ENVOY.exists() else shutil.which("envoy")
    if envoy is None:
        pytest.skip("no envoy binary")
    boot = _bootstrap()
    hcm = hcm_pb2.HttpConnectionManager()
    boot.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.Unpack(hcm)
    route = hcm.route_config.virtual_hosts[0].routes[1]
    bucket = _unpack_local(route.typed_per_filter_config[LOCAL_RATELIMIT_FILTER])
    bucket.token_bucket.fill_interval.FromMilliseconds(10)
    route.typed_per_filter_config[LOCAL_RATELIMIT_FILTER].Pack(bucket)
    boot.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.Pack(hcm)
    config = tmp_path / "bootstrap.json"
    config.write_text(json.dumps(json_format.MessageToDict(boot)))
    proc = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(config), "--disable-hot-restart", "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "50ms" in proc.stdout + proc.stderr
