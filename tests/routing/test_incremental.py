"""Incremental translation (routing.incremental, through MeshGenerator) gives what a full
translation (routing.generate) gives, change after change; and shares what it can."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import routing
from mesh import xds
from mesh.model import (
    BudgetTier,
    Endpoint,
    InferenceService,
    MtlsMode,
    Priority,
    SchedulingPolicy,
    ServiceConfig,
    ServicePort,
    TokenBudget,
    Workload,
    World,
)
from mesh.proxy import Proxy
from mtls.identity import Identity
from mtls.secrets import SecretBundle
from routing import generate, incremental
from routing.endpoints import endpoint_key
from routing.generator import MeshGenerator
from routing.incremental import Recent, Translation
from routing.limits import RateLimitOptions, RlsAddress
from routing.secure import SecurityOptions
from tests.routing.factories import config, endpoint, gateway, proxy, service, world

NAMESPACES = ("a", "b")
#: (namespace, pod, ip): the pods endpoints may name, and whose sidecars may connect.
PODS = tuple(
    (ns, f"p{i}", f"10.0.{NAMESPACES.index(ns)}.{i + 1}") for ns in NAMESPACES for i in range(3)
)
ACCOUNTS = ("sa0", "sa1")
#: Endpoints that name no pod, at an address a proxy may have.
BARE_IPS = ("10.9.0.1", "10.9.0.2")


class FakeSecrets:
    """A bundle per identity with no secrets: the generator adds an empty SDS group."""

    def bundle(self, identity: Identity) -> SecretBundle:
        return SecretBundle(identity, 0, datetime(2030, 1, 1, tzinfo=UTC), ())


def _proxies() -> list[Proxy]:
    """Every kind of proxy translation tells apart, several of them alike."""
    found = []
    for ns, pod, ip in PODS:
        found.append(proxy(namespace=ns, pod=pod, ip=ip, service_account="sa0"))
    found += [
        proxy(namespace="a", pod="p0", ip="10.0.0.1", service_account="sa0", inbound_port=15106),
        proxy(namespace="a", pod="client", ip="10.5.0.1", service_account="sa1"),
        proxy(namespace="b", pod="stranger", ip="10.5.0.2", service_account="sa0"),
        proxy(namespace="a", pod="bare", ip=BARE_IPS[0], service_account="sa0"),
        gateway(namespace="a"),
        gateway(namespace="b", gateway_port=9090),
        proxy(namespace="a", pod="grpc", proxyless=True),
        proxy(namespace="b", pod="grpc", proxyless=True, service_account="sa1"),
        dataclasses.replace(proxy(namespace="b", pod="p1", ip="10.0.1.2"), secrets_allowed=False),
    ]
    return found


_budgets = st.lists(
    st.builds(
        TokenBudget,
        caller=st.sampled_from(["a/sa1", "b/*", "*", "a/sa0"]),
        tokens=st.sampled_from([100, 5000]),
        window_s=st.sampled_from([60, 3600]),
        tier=st.sampled_from(list(BudgetTier)),
    ),
    max_size=2,
    unique_by=lambda b: (b.caller, b.tier),
)

_rates = st.dictionaries(
    st.sampled_from(list(Priority)), st.sampled_from([0.5, 5.0, 20.0]), max_size=2
)


@st.composite
def _configs(draw: st.DrawFn) -> ServiceConfig:
    return ServiceConfig(
        enabled=draw(st.booleans()) or draw(st.booleans()),
        default_priority=draw(st.sampled_from(list(Priority))),
        critical_callers=tuple(
            draw(st.lists(st.sampled_from(["a/sa1", "b/*", "spiffe://x/ns/a/sa/sa0"]), max_size=2))
        ),
        rate_limit=MappingProxyType(draw(_rates)),
        max_concurrency=draw(st.none() | st.integers(1, 16)),
        adaptive=draw(st.booleans()),
        global_rate_limit=MappingProxyType(draw(_rates)),
        mtls=draw(st.sampled_from(list(MtlsMode))),
        timeouts=MappingProxyType(
            draw(
                st.dictionaries(
                    st.sampled_from(list(Priority)), st.sampled_from([10.0, 60.0]), max_size=1
                )
            )
        ),
        scheduling=draw(st.sampled_from(list(SchedulingPolicy))),
        token_budgets=tuple(draw(_budgets)),
    )


@st.composite
def _endpoints(draw: st.DrawFn, ports: tuple[int, ...]) -> tuple[Endpoint, ...]:
    found = []
    for _ in range(draw(st.integers(0, 4))):
        bare = draw(st.booleans()) and draw(st.booleans())
        ns, pod, ip = draw(st.sampled_from(PODS))
        found.append(
            Endpoint(
                address=draw(st.sampled_from(BARE_IPS)) if bare else ip,
                port=draw(st.sampled_from([9000, 9001])),
                service_port=draw(st.sampled_from(ports)),
                ready=draw(st.booleans()),
                gpu=draw(st.booleans()),
                pod_namespace="" if bare else ns,
                pod_name="" if bare else pod,
            )
        )
    return tuple(found)


@st.composite
def _services(draw: st.DrawFn, namespace: str, name: str) -> InferenceService:
    ports = tuple(
        draw(st.lists(st.sampled_from([8000, 8001]), min_size=1, max_size=2, unique=True))
    )
    return InferenceService(
        namespace,
        name,
        tuple(ServicePort(p) for p in ports),
        draw(_configs()),
        endpoints=draw(_endpoints(ports)),
    )


@st.composite
def _workloads(draw: st.DrawFn) -> dict[tuple[str, str], Workload]:
    found = {}
    for ns, pod, ip in PODS:
        if draw(st.integers(0, 4)) == 0:
            continue  # not in the world: no identity
        found[(ns, pod)] = Workload(
            ns,
            pod,
            service_account=draw(st.sampled_from(ACCOUNTS)),
            ip=ip,
            sidecar=draw(st.booleans()),
        )
    for ns, pod, ip in (("a", "client", "10.5.0.1"), ("a", "bare", BARE_IPS[0])):
        found[(ns, pod)] = Workload(ns, pod, service_account="sa1", ip=ip)
    for ns in NAMESPACES:
        found[(ns, "gateway-0")] = Workload(ns, "gateway-0", service_account="gateway")
    return found


@dataclasses.dataclass
class Step:
    world: World
    sidecars: dict[tuple[str, str], Proxy]
    limits: RateLimitOptions


@st.composite
def _limits(draw: st.DrawFn, the_world: World) -> RateLimitOptions:
    keys = sorted({endpoint_key(e) for s in the_world.services for e in s.endpoints})
    multipliers = (
        draw(
            st.dictionaries(
                st.sampled_from(keys),
                st.fixed_dictionaries({Priority.SHEDDABLE: st.sampled_from([0.25, 0.5])}),
                max_size=2,
            )
        )
        if keys
        else {}
    )
    weights = (
        draw(st.dictionaries(st.sampled_from(keys), st.sampled_from([8, 64]), max_size=2))
        if keys
        else {}
    )
    return RateLimitOptions(
        rls=draw(st.none() | st.just(RlsAddress("10.99.0.1", 8081, tls=True))),
        multipliers=MappingProxyType(multipliers),
        weights=MappingProxyType(weights),
    )


@st.composite
def _sidecars(draw: st.DrawFn) -> dict[tuple[str, str], Proxy]:
    connected = {}
    for ns, pod, ip in PODS:
        if draw(st.booleans()):
            connected[(ns, pod)] = proxy(
                namespace=ns, pod=pod, ip=ip, inbound_port=draw(st.sampled_from([15006, 15106]))
            )
    return connected


@st.composite
def _histories(draw: st.DrawFn) -> list[Step]:
    """A world, then changes to it: each step changes a few things and keeps the rest."""
    names = draw(
        st.lists(
            st.tuples(st.sampled_from(NAMESPACES), st.sampled_from(["m", "n", "o"])),
            min_size=1,
            max_size=4,
            unique=True,
        )
    )
    services = {key: draw(_services(*key)) for key in names}
    workloads = draw(_workloads())
    sidecars = draw(_sidecars())
    the_world = World(services=tuple(services.values()), workloads=MappingProxyType(workloads))
    steps = [Step(the_world, sidecars, draw(_limits(the_world)))]
    for _ in range(draw(st.integers(1, 4))):
        change = draw(
            st.sampled_from(
                ["config", "endpoints", "service", "workloads", "sidecars", "limits", "nothing"]
            )
        )
        key = draw(st.sampled_from(names))
        if key not in services or change == "service":
            if key in services and len(services) > 1:
                del services[key]
            else:
                services[key] = draw(_services(*key))
        elif change == "config":
            services[key] = dataclasses.replace(services[key], config=draw(_configs()))
        elif change == "endpoints":
            ports = tuple(p.port for p in services[key].ports)
            services[key] = dataclasses.replace(services[key], endpoints=draw(_endpoints(ports)))
        elif change == "workloads":
            workloads = draw(_workloads())
        elif change == "sidecars":
            sidecars = draw(_sidecars())
        the_world = World(services=tuple(services.values()), workloads=MappingProxyType(workloads))
        limits = draw(_limits(the_world)) if change == "limits" else steps[-1].limits
        steps.append(Step(the_world, dict(sidecars), limits))
    return steps


def _serialized(resources: Mapping[str, Any]) -> dict[str, list[bytes]]:
    return {
        t: [m.SerializeToString(deterministic=True) for m in messages]
        for t, messages in resources.items()
        if t != xds.SECRET
    }


TLS = SecurityOptions(trust_domain="mesh.test", connection_lifetime_s=600)


@settings(max_examples=60, deadline=None)
@given(history=_histories())
def test_incremental_translation_equals_full_translation(history: list[Step]) -> None:
    generator: MeshGenerator | None = None
    for step in history:
        generator = MeshGenerator(
            step.world,
            step.sidecars,
            FakeSecrets(),
            tls=TLS,
            limits=step.limits,
            previous=generator,
        )
        for who in _proxies():
            subject = (
                who
                if generator.identity(who) is not None
                else dataclasses.replace(who, secrets_allowed=False)
            )
            full = generate(step.world, subject, step.sidecars, tls=TLS, limits=step.limits)
            assert _serialized(generator.generate(who)) == _serialized(full), who.node_id


# --- what is shared, and what is kept -------------------------------------------------------


def _two_services(timeout: float = 60.0, *, ready: bool = True) -> World:
    """``a/m`` (pods p0, p1) and ``b/n`` (pod p0 of b); every pod declares its sidecar."""
    m = service(
        "m",
        "a",
        cfg=config(callers=["b/*"], max_concurrency=4, timeouts={Priority.SHEDDABLE: timeout}),
        endpoints=[
            endpoint("10.0.0.1", pod="p0", namespace="a", gpu=True),
            endpoint("10.0.0.2", pod="p1", namespace="a", gpu=True, ready=ready),
        ],
    )
    n = service("n", "b", endpoints=[endpoint("10.0.1.1", pod="p0", namespace="b")])
    workloads = {
        (ns, pod): Workload(ns, pod, service_account="sa0", ip=ip, sidecar=True)
        for ns, pod, ip in PODS
    }
    return dataclasses.replace(world(m, n), workloads=MappingProxyType(workloads))


def _generations(*worlds: World) -> list[list[dict[str, Any]]]:
    """Each proxy's output (in :func:`_proxies`' order) per generation, through one chain of
    generators."""
    out = []
    generator: MeshGenerator | None = None
    for the_world in worlds:
        generator = MeshGenerator(the_world, {}, FakeSecrets(), tls=TLS, previous=generator)
        out.append([dict(generator.generate(p)) for p in _proxies()])
    return out


def test_an_endpoint_turning_unready_shares_every_object_but_its_load_assignment() -> None:
    before, after = _generations(_two_services(), _two_services(ready=False))
    changed = "outbound|8000|standard|m.a.svc.cluster.local"
    for who, resources, earlier in zip(_proxies(), after, before, strict=True):
        for type_url in (xds.CLUSTER, xds.ROUTE, xds.LISTENER):
            assert resources[type_url] is earlier[type_url], (who.node_id, type_url)
        old = {m.cluster_name: m for m in earlier[xds.ENDPOINT]}
        for assignment in resources[xds.ENDPOINT]:
            same = assignment is old[assignment.cluster_name]
            assert same == ("|m.a." not in assignment.cluster_name), assignment.cluster_name
        assert any(a.cluster_name == changed for a in resources[xds.ENDPOINT])


def test_an_annotation_translates_that_service_again_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    translated: list[str] = []
    real = routing.service_vhosts

    def counting(svc: InferenceService, proxy: Proxy) -> list[Any]:
        translated.append(svc.name)
        return real(svc, proxy)

    monkeypatch.setattr(routing, "service_vhosts", counting)
    generator = MeshGenerator(_two_services(), {}, FakeSecrets(), tls=TLS)
    for who in _proxies():
        generator.generate(who)
    assert set(translated) == {"m", "n"}
    translated.clear()
    generator = MeshGenerator(
        _two_services(timeout=30), {}, FakeSecrets(), tls=TLS, previous=generator
    )
    for who in _proxies():
        generator.generate(who)
    # Once per kind of caller of m (namespace, clamp, gateway or not), never for n.
    assert translated and set(translated) == {"m"}
    assert len(translated) <= 4


def test_a_sidecar_connecting_as_declared_translates_nothing_again() -> None:
    declared = _two_services()
    generator = MeshGenerator(declared, {}, FakeSecrets(), tls=TLS)
    first = [generator.generate(p) for p in _proxies()]
    connected = {("a", "p0"): proxy(namespace="a", pod="p0", ip="10.0.0.1")}
    generator = MeshGenerator(declared, connected, FakeSecrets(), tls=TLS, previous=generator)
    for who, earlier in zip(_proxies(), first, strict=True):
        again = generator.generate(who)
        assert all(again[t] is earlier[t] for t in again if t != xds.SECRET), who.node_id


def test_entries_are_kept_for_the_services_of_the_current_world_only() -> None:
    translation = Translation()
    both = _two_services()
    view = translation.view(both, {})
    for who in _proxies():
        view.generate(who)
    assert set(translation.entries) == {("a", "m"), ("b", "n")}
    kept = translation.entries[("b", "n")]
    only_n = dataclasses.replace(both, services=both.services[1:])
    translation.view(only_n, {})
    assert set(translation.entries) == {("b", "n")}
    assert translation.entries[("b", "n")] is kept  # unchanged: its parts are kept too
    changed = dataclasses.replace(
        only_n, services=(dataclasses.replace(both.services[1], uid="other"),)
    )
    translation.view(changed, {})
    assert translation.entries[("b", "n")] is not kept


def test_a_services_parts_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client claiming ever new identities adds parts to a globally limited Service, up
    to the bound."""
    monkeypatch.setattr(incremental, "MAX_PARTS_PER_SERVICE", 8)
    svc = service(
        "m",
        "a",
        cfg=dataclasses.replace(
            config(), global_rate_limit=MappingProxyType({Priority.SHEDDABLE: 1.0})
        ),
    )
    limits = RateLimitOptions(rls=RlsAddress("10.99.0.1", 8081))
    view = Translation().view(world(svc), {}, limits=limits)
    for i in range(40):
        view.generate(proxy(namespace="a", pod=f"c{i}", service_account=f"sa{i}"))
    (entry,) = view.entries
    assert 0 < len(entry.parts) <= 8


def test_recent_keeps_what_the_last_two_generations_used() -> None:
    recent = Recent(maxsize=4)
    recent.put("old", 1)
    recent.put("used", 2)
    recent.rotate()
    assert recent.get("used") == 2  # used again: kept into this generation
    recent.rotate()
    assert recent.get("old") is None
    assert recent.get("used") == 2
    for i in range(20):
        recent.put(i, i)
    assert len(recent) <= 8


def test_sidecars_that_move_no_endpoint_make_no_new_routing() -> None:
    """What lets a storm of reconnecting sidecars cost no generation per debounce."""
    declared = _two_services()
    undeclared = dataclasses.replace(declared, workloads=MappingProxyType({}))
    p0 = proxy(namespace="a", pod="p0", ip="10.0.0.1")

    def same(the_world: World, before: dict[Any, Proxy], after: dict[Any, Proxy]) -> bool:
        first = MeshGenerator(the_world, before, tls=TLS)
        return MeshGenerator(the_world, after, tls=TLS, previous=first).same_routing_as(first)

    client = {("a", "client"): proxy(namespace="a", pod="client", ip="10.5.0.1")}
    assert same(declared, {}, client)
    assert same(undeclared, {}, client)
    assert same(declared, {}, {("a", "p0"): p0})
    assert not same(undeclared, {}, {("a", "p0"): p0})
    moved = dataclasses.replace(p0, inbound_port=15106)
    assert not same(declared, {("a", "p0"): p0}, {("a", "p0"): moved})
    first = MeshGenerator(declared, {}, tls=TLS)
    assert not MeshGenerator(_two_services(timeout=1), {}, tls=TLS).same_routing_as(first)
    assert not MeshGenerator(declared, {}, tls=SecurityOptions()).same_routing_as(first)
