"""The rate-limit pass over generated config (routing/ratelimits.py), without a proxy.

Table-style checks of what each kind of proxy gets: the backend sidecar's inbound buckets
(one per class, shared by the class route and the catch-all), adaptive multipliers for
one endpoint only, the caller's global filter and descriptors, and nothing for proxyless
clients. Envoy accepting all of it is checked by the end-to-end tests here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import xds
from mesh.model import Priority, ServiceConfig, World
from mesh.proxy import Proxy
from ratelimit.local import LOCAL_RATELIMIT_FILTER
from routing import generate, names
from routing.endpoints import endpoint_key
from routing.limits import (
    RLS_CLUSTER,
    RateLimitOptions,
    RlsAddress,
    apply_limits,
    limit_key,
)
from tests.routing.factories import config, endpoint, gateway, proxy, service, world

LOCAL_FILTER = "envoy.filters.http.local_ratelimit"
GLOBAL_FILTER = "envoy.filters.http.ratelimit"
RLS = RlsAddress("10.9.0.1", 8081)


def _cfg(**changes: Any) -> ServiceConfig:
    return replace(config(), **changes)


def _rates(**rates: float) -> Mapping[Priority, float]:
    return MappingProxyType({Priority(k): v for k, v in rates.items()})


def llama(cfg: ServiceConfig) -> World:
    return world(
        service(
            cfg=cfg,
            endpoints=[
                endpoint("10.0.0.1", gpu=True, pod="gpu-0"),
                endpoint("10.0.0.2", gpu=True, pod="gpu-1"),
            ],
        )
    )


def build(the_world: World, who: Proxy, options: RateLimitOptions | None = None) -> Any:
    return generate(the_world, who, {}, limits=options)


def _one(resources: Any, type_url: str, name: str) -> Any:
    found = [m for m in resources[type_url] if (getattr(m, "name", "") == name)]
    assert len(found) == 1, [getattr(m, "name", "") for m in resources[type_url]]
    return found[0]


def _managers(listener: Any) -> list[Any]:
    out = []
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            manager = hcm_pb2.HttpConnectionManager()
            network_filter.typed_config.Unpack(manager)
            out.append(manager)
    return out


def _inbound_vhost(resources: Any) -> Any:
    (vhost,) = _one(resources, xds.ROUTE, names.INBOUND_ROUTE).virtual_hosts
    return vhost


def _buckets(vhost: Any) -> dict[str, tuple[int, int]]:
    """class -> (tokens per fill, fill interval ms) of the virtual host's descriptors."""
    config = local_rate_limit_pb2.LocalRateLimit()
    vhost.typed_per_filter_config[LOCAL_RATELIMIT_FILTER].Unpack(config)
    assert config.filter_enabled.default_value.numerator == 100
    assert not config.always_consume_default_token_bucket.value
    return {
        d.entries[0].value: (
            d.token_bucket.tokens_per_fill.value,
            d.token_bucket.fill_interval.ToMilliseconds(),
        )
        for d in config.descriptors
    }


def _route_classes(vhost: Any) -> dict[str, str | None]:
    """route name -> the class descriptor it emits, or None when the filter is off there."""
    out: dict[str, str | None] = {}
    for route in vhost.routes:
        if route.route.rate_limits:
            (limit,) = route.route.rate_limits
            out[route.name] = limit.actions[0].generic_key.descriptor_value
        else:
            off = local_rate_limit_pb2.LocalRateLimit()
            route.typed_per_filter_config[LOCAL_RATELIMIT_FILTER].Unpack(off)
            assert not off.HasField("filter_enabled")
            out[route.name] = None
    return out


def test_backend_sidecar_gets_one_bucket_per_named_class() -> None:
    the_world = llama(_cfg(rate_limit=_rates(standard=20, sheddable=2.5)))
    out = build(the_world, proxy(ip="10.0.0.1", pod="gpu-0", service_account="llama"))
    vhost = _inbound_vhost(out)
    # 20 rps is a token per 50 ms, 2.5 rps a token per 400 ms (exact, see ratelimit.local).
    assert _buckets(vhost) == {"standard": (1, 50), "sheddable": (1, 400)}
    # The catch-all serves the default class (standard) and draws from its bucket.
    assert _route_classes(vhost) == {
        "critical": None,
        "standard": "standard",
        "sheddable": "sheddable",
        "default": "standard",
    }
    listener = _one(out, xds.LISTENER, names.INBOUND_LISTENER)
    for manager in _managers(listener):
        filters = [f.name for f in manager.http_filters]
        assert filters[-2:] == [LOCAL_FILTER, "envoy.filters.http.router"], filters


def test_critical_is_limited_only_when_named_and_default_follows_the_default_class() -> None:
    cfg = _cfg(rate_limit=_rates(critical=100, sheddable=5), default_priority=Priority.SHEDDABLE)
    out = build(llama(cfg), proxy(ip="10.0.0.1", pod="gpu-0"))
    assert _route_classes(_inbound_vhost(out)) == {
        "critical": "critical",
        "standard": None,
        "sheddable": "sheddable",
        "default": "sheddable",
    }


def test_no_rate_limit_leaves_config_untouched() -> None:
    the_world = llama(_cfg())
    who = proxy(ip="10.0.0.1", pod="gpu-0")
    plain = generate(the_world, who, {})
    assert apply_limits(plain, the_world, who, RateLimitOptions(rls=RLS)) == {
        t: list(m) for t, m in plain.items()
    }


def test_client_sidecar_gets_no_local_limits() -> None:
    the_world = llama(_cfg(rate_limit=_rates(sheddable=5)))
    who = proxy()
    out = build(the_world, who)
    assert not _one(out, xds.ROUTE, names.INBOUND_ROUTE).virtual_hosts
    listener = _one(out, xds.LISTENER, names.INBOUND_LISTENER)
    assert all(LOCAL_FILTER not in [f.name for f in m.http_filters] for m in _managers(listener))


def test_adaptive_multipliers_scale_only_their_endpoint() -> None:
    cfg = _cfg(rate_limit=_rates(standard=20, sheddable=10), adaptive=True)
    the_world = llama(cfg)
    gpu0 = endpoint_key(the_world.services[0].endpoints[0])
    assert gpu0 == "default/gpu-0:9000"
    options = RateLimitOptions(
        multipliers=MappingProxyType({gpu0: _rates(sheddable=0.25, standard=1.0, critical=1.0)})
    )
    p0, p1 = proxy(ip="10.0.0.1", pod="gpu-0"), proxy(ip="10.0.0.2", pod="gpu-1")
    # 10 rps * 0.25 = 2.5 rps: a token per 400 ms; gpu-1 keeps 10 rps (a token per 100 ms).
    assert _buckets(_inbound_vhost(build(the_world, p0, options)))["sheddable"] == (1, 400)
    assert _buckets(_inbound_vhost(build(the_world, p1, options)))["sheddable"] == (1, 100)
    assert limit_key(the_world, p0, options) != limit_key(the_world, p0, RateLimitOptions())
    assert limit_key(the_world, p1, options) == limit_key(the_world, p1, RateLimitOptions())
    assert limit_key(the_world, proxy(), options) == ()
    # A Service that is not adaptive ignores multipliers.
    static = llama(replace(cfg, adaptive=False))
    assert _buckets(_inbound_vhost(build(static, p0, options)))["sheddable"] == (1, 100)
    assert limit_key(static, p0, options) == ()


def _global_filter(listener: Any) -> Any:
    (manager,) = _managers(listener)
    filters = [f.name for f in manager.http_filters]
    assert filters[-2:] == [GLOBAL_FILTER, "envoy.filters.http.router"], filters
    config = rate_limit_pb2.RateLimit()
    manager.http_filters[-2].typed_config.Unpack(config)
    return config


def per_route_limits(route: Any) -> list[Any]:
    """The global filter's per-route ``rate_limits`` of ``route`` (where every global
    descriptor goes); the route's own stay empty."""
    assert not route.route.rate_limits
    if GLOBAL_FILTER not in route.typed_per_filter_config:
        return []
    config = rate_limit_pb2.RateLimitPerRoute()
    route.typed_per_filter_config[GLOBAL_FILTER].Unpack(config)
    return list(config.rate_limits)


def _descriptors(route_config: Any) -> dict[str, list[tuple[str, str]]]:
    (vhost,) = route_config.virtual_hosts
    out = {}
    for route in vhost.routes:
        entries = []
        for limit in per_route_limits(route):
            entries += [
                (a.generic_key.descriptor_key, a.generic_key.descriptor_value)
                for a in limit.actions
            ]
        out[route.name] = entries
    return out


def test_caller_gets_the_global_filter_descriptors_and_rls_cluster() -> None:
    cfg = _cfg(
        global_rate_limit=_rates(sheddable=100, critical=50),
        critical_callers=("default/chat",),
    )
    the_world = llama(cfg)
    options = RateLimitOptions(rls=RLS, failure_mode_deny=True, rls_timeout_s=0.25)
    out = build(the_world, proxy(service_account="batch"), options)
    config = _global_filter(_one(out, xds.LISTENER, names.OUTBOUND_LISTENER))
    assert config.failure_mode_deny
    assert config.domain == "inferlane"
    assert config.rate_limit_service.grpc_service.envoy_grpc.cluster_name == RLS_CLUSTER
    who = [("service", "default/llama"), ("caller", "default/batch")]
    # batch is not a critical caller: its critical route serves as standard, unlimited.
    assert _descriptors(_one(out, xds.ROUTE, names.OUTBOUND_ROUTE)) == {
        "critical": [],
        "standard": [],
        "sheddable": [*who, ("priority", "sheddable")],
        "default": [],
    }
    cluster = _one(out, xds.CLUSTER, RLS_CLUSTER)
    assert cluster.type == cluster_pb2.Cluster.STATIC
    addr = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (addr.address, addr.port_value) == ("10.9.0.1", 8081)
    cluster_names = [c.name for c in out[xds.CLUSTER]]
    assert cluster_names == sorted(cluster_names)
    # The listed caller keeps critical, and it is limited as critical.
    chat = build(the_world, proxy(service_account="chat"), options)
    chat_routes = _descriptors(_one(chat, xds.ROUTE, names.OUTBOUND_ROUTE))
    assert chat_routes["critical"][-1] == ("priority", "critical")
    assert chat_routes["critical"][1] == ("caller", "default/chat")


def test_gateway_gets_the_global_filter_and_a_dns_name_becomes_strict_dns() -> None:
    the_world = llama(_cfg(global_rate_limit=_rates(standard=10)))
    who = gateway()
    options = RateLimitOptions(rls=RlsAddress("inferlane.inferlane-system.svc", 8081))
    out = build(the_world, who, options)
    listener = _one(out, xds.LISTENER, names.gateway_listener("0.0.0.0", 8080))
    _global_filter(listener)
    route = _one(out, xds.ROUTE, names.gateway_route(8080))
    # The default class is standard: the catch-all is limited as standard too.
    assert _descriptors(route)["default"][-1] == ("priority", "standard")
    assert _one(out, xds.CLUSTER, RLS_CLUSTER).type == cluster_pb2.Cluster.STRICT_DNS


def test_no_service_address_or_no_global_limit_means_no_global_filter() -> None:
    limited = llama(_cfg(global_rate_limit=_rates(sheddable=1)))
    unlimited = llama(_cfg())
    cases = ((limited, RateLimitOptions()), (unlimited, RateLimitOptions(rls=RLS)))
    for the_world, options in cases:
        out = build(the_world, proxy(), options)
        assert RLS_CLUSTER not in [c.name for c in out[xds.CLUSTER]]
        (manager,) = _managers(_one(out, xds.LISTENER, names.OUTBOUND_LISTENER))
        assert GLOBAL_FILTER not in [f.name for f in manager.http_filters]


def test_proxyless_clients_get_nothing() -> None:
    cfg = _cfg(global_rate_limit=_rates(sheddable=1), rate_limit=_rates(sheddable=1))
    the_world = llama(cfg)
    who = proxy(proxyless=True)
    plain = generate(the_world, who, {})
    assert apply_limits(plain, the_world, who, RateLimitOptions(rls=RLS)) == {
        t: list(m) for t, m in plain.items()
    }


def _bytes(resources: Any) -> list[bytes]:
    return [
        m.SerializeToString(deterministic=True) for t in sorted(resources) for m in resources[t]
    ]


def test_the_pass_is_deterministic_and_idempotent() -> None:
    cfg = _cfg(rate_limit=_rates(sheddable=3), global_rate_limit=_rates(sheddable=7))
    the_world = llama(cfg)
    who = proxy(ip="10.0.0.1", pod="gpu-0")
    options = RateLimitOptions(rls=RLS)
    once = build(the_world, who, options)
    assert _bytes(once) == _bytes(build(the_world, who, options))
    assert _bytes(apply_limits(once, the_world, who, options)) == _bytes(once)


@settings(max_examples=60, deadline=None)
@given(
    rates=st.dictionaries(
        st.sampled_from(list(Priority)),
        st.floats(min_value=1e-6, max_value=1e12, allow_nan=False),
        min_size=1,
    ),
    multiplier=st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
)
def test_any_rates_and_multipliers_give_config_without_raising(
    rates: dict[Priority, float], multiplier: float
) -> None:
    cfg = _cfg(rate_limit=MappingProxyType(rates), adaptive=True)
    the_world = llama(cfg)
    key = endpoint_key(the_world.services[0].endpoints[0])
    options = RateLimitOptions(
        multipliers=MappingProxyType({key: MappingProxyType(dict.fromkeys(Priority, multiplier))})
    )
    out = build(the_world, proxy(ip="10.0.0.1", pod="gpu-0"), options)
    vhost = _inbound_vhost(out)
    # A bucket per class that can be expressed; routes of the rest have the filter off.
    if not vhost.typed_per_filter_config:  # no rate fits a bucket: nothing is limited
        assert all(not r.route.rate_limits and not r.typed_per_filter_config for r in vhost.routes)
        return
    for route in vhost.routes:
        assert bool(route.route.rate_limits) != bool(route.typed_per_filter_config)
    assert set(_buckets(vhost)) <= {str(p) for p in rates}
