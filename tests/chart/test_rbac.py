"""The chart's RBAC grants exactly the Kubernetes API calls that the code makes.

"The calls the code makes" is found two ways, so that the chart and the code cannot drift:

1. recorded: the Kubernetes source (mesh/kube.py) runs against the fake API server until it
   has listed, watched and posted an Event; the root certificate's publisher
   (mtls/publish.py) until it has read, created and updated its ConfigMap; the CA store
   (mtls/store.py) runs against the fake Secrets server, with the CA Secret name the chart
   passes, until it has read and created it; and the key epoch's store (mtls/epoch.py),
   for that Secret, until it has read, created and updated its ConfigMap. Every HTTP
   request becomes (apiGroup, resource, verb).
2. referenced: every method of the kubernetes client's API classes that the shipped packages
   name (as an attribute, or as a string as mesh/kube.py's RESOURCES does) becomes
   (apiGroup, resource, verb) from the request path and HTTP method the client itself uses.
   This also covers calls no test here drives, such as the TLS port's TokenReview.

Every permission needed must be granted, and every permission granted must be needed. The
CA Secret and its key epoch's ConfigMap are the only namespaced grants (a Role), each
limited to its name; so are reading and updating the root certificate's ConfigMaps.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.aio.client.api as client_api
import pytest
from aiohttp import web
from kubernetes.aio import client

from bench.wait import eventually
from mesh.build import build_world
from mesh.kube import KubernetesSource, WatchSettings
from mesh.sources import LatestWorld
from mtls.ca import CertificateAuthority
from mtls.epoch import CONFIGMAP_SUFFIX, epoch_store
from mtls.publish import CONFIGMAP_NAME, RootCertPublisher
from mtls.store import load_or_create_shared_ca
from tests.chart.render import NAMESPACE, Obj, one, render
from tests.mesh.fake_apiserver import FakeApiServer, core_v1
from tests.mesh.objects import endpoint_slice, node, pod, service, slice_endpoint
from tests.mtls.fake_kube import FakeSecretsServer

ROOT = Path(__file__).resolve().parents[2]
#: What runs in the control plane's container (bench/ is not deployed).
SHIPPED_PACKAGES = ("mesh", "mtls", "routing", "ratelimit", "xds_server")
_CLIENT_SUFFIXES = ("_with_http_info", "_without_preload_content")


@dataclass(frozen=True, order=True)
class Permission:
    group: str
    resource: str
    verb: str

    def __str__(self) -> str:
        return f"{self.verb} {self.resource}.{self.group or 'core'}"


@dataclass(frozen=True)
class Call:
    """One API request: where it goes, and whether it is scoped to one namespace."""

    permission: Permission
    namespace: str | None
    name: str | None


def call_of(method: str, path: str, query: Mapping[str, str] | None = None) -> Call | None:
    """Map an API request (or a client's path template) to the permission it needs.

    ``None`` for discovery paths, which are not resources.
    """
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest:
        return None
    resource, name = rest[0], rest[1] if len(rest) > 1 else None
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"
    watch = (query or {}).get("watch") in ("1", "true")
    read = "watch" if watch else ("get" if name else "list")
    verb = {
        "GET": read,
        "HEAD": read,
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if name else "deletecollection",
    }.get(method.upper())
    return None if verb is None else Call(Permission(group, resource, verb), namespace, name)


# --- recorded calls ---------------------------------------------------------------------


async def record_kubernetes_source() -> list[Call]:
    """Run the Kubernetes source until it has listed, watched and posted an Event."""
    fake = FakeApiServer(bookmark_interval=60.0)
    await fake.start()
    api: Any = client.ApiClient(configuration=client.Configuration(host=fake.url))
    bad = {"inferlane.io/enabled": "true", "inferlane.io/timeout": "critical=soon"}
    await fake.put(service("llama", annotations=bad))
    await fake.put(pod("llama-0", labels={"app": "llama"}, ip="10.0.0.1"))
    await fake.put(node("gpu-1", gpu=True))
    await fake.put(endpoint_slice("llama-x", "llama", [slice_endpoint("10.0.0.1")]))
    source = KubernetesSource(api, settings=WatchSettings(watch_timeout_s=30))
    task = asyncio.create_task(source.run(LatestWorld()))
    plurals = ("services", "pods", "nodes", "endpointslices")

    async def done() -> bool:
        watching = all(fake.watch_requests(p) for p in plurals)
        return watching and len(fake.objects("Event")) == 1

    try:
        await eventually(done, what="lists, watches and an Event")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await api.close()
        await fake.stop()
    calls = [call_of(r.method, r.path, r.query) for r in fake.requests]
    return [c for c in calls if c is not None]


async def record_root_cert_publisher() -> list[Call]:
    """Run the publisher until it has created a ConfigMap, then updated it for a new root."""
    fake = FakeApiServer()
    await fake.start()
    api: Any = client.ApiClient(configuration=client.Configuration(host=fake.url))
    roots = [CertificateAuthority.generate().trust_bundle_pem]
    try:
        publisher = RootCertPublisher(client.CoreV1Api(api), lambda: roots[-1])
        publisher.set_world(build_world([service("llama")]))
        assert await publisher.reconcile() == 1
        roots.append(CertificateAuthority.generate().trust_bundle_pem)
        publisher.root_changed()
        await publisher.reconcile()
    finally:
        await api.close()
        await fake.stop()
    calls = [call_of(r.method, r.path, r.query) for r in fake.requests]
    return [c for c in calls if c is not None]


@asynccontextmanager
async def _recording(fake: FakeSecretsServer, seen: list[Call]) -> AsyncIterator[str]:
    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        call = call_of(request.method, request.path, dict(request.query))
        if call is not None:
            seen.append(call)
        response: web.StreamResponse = await handler(request)
        return response

    app = fake.app()
    app.middlewares.append(record)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    try:
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def record_ca_store(namespace: str, name: str) -> list[Call]:
    """Run the CA store against an empty namespace: it reads, then creates the Secret."""
    fake = FakeSecretsServer()
    seen: list[Call] = []
    async with _recording(fake, seen) as url:
        api_client: Any = client.ApiClient(client.Configuration(host=url))
        try:
            await load_or_create_shared_ca(client.CoreV1Api(api_client), namespace, name)
            # A second replica finds it and only reads.
            await load_or_create_shared_ca(client.CoreV1Api(api_client), namespace, name)
        finally:
            await api_client.close()
    assert fake.creates == 1
    return seen


async def record_epoch_store(namespace: str, secret: str) -> list[Call]:
    """Run the key epoch's store for the CA Secret: it reads, creates, then updates."""
    async with core_v1() as (fake, api):
        epochs = epoch_store(ca_secret=f"{namespace}/{secret}", configmaps=api)
        assert epochs is not None
        assert await epochs.read() == 0
        assert await epochs.advance(0) == 1
        assert await epochs.advance(1) == 2
    calls = [call_of(r.method, r.path, r.query) for r in fake.requests]
    return [c for c in calls if c is not None]


# --- referenced calls -------------------------------------------------------------------

_SERIALIZE = re.compile(
    r"async def _(\w+)_serialize\(.*?method='(\w+)',\s*resource_path='([^']+)'", re.DOTALL
)


@functools.cache
def client_methods() -> dict[str, dict[str, Call]]:
    """Method name -> {API class: the call it makes}, from the generated client's source."""
    methods: dict[str, dict[str, Call]] = {}
    for module_path in sorted(Path(client_api.__file__).parent.glob("*_api.py")):
        source = module_path.read_text(encoding="utf-8")
        match = re.search(r"^class (\w+)", source, re.MULTILINE)
        if match is None:
            continue
        for name, http_method, path in _SERIALIZE.findall(source):
            call = call_of(http_method, path)
            if call is not None:
                methods.setdefault(name, {})[match[1]] = call
    return methods


def _names_in(paths: Iterable[Path]) -> set[str]:
    names: set[str] = set()
    for path in paths:
        for node_ in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node_, ast.Attribute):
                names.add(node_.attr)
            elif isinstance(node_, ast.Name):
                names.add(node_.id)
            elif isinstance(node_, ast.Constant) and isinstance(node_.value, str):
                names.add(node_.value)
    return names


def referenced_calls() -> dict[str, Call]:
    """Client method -> call, for every client method the shipped packages name."""
    sources = [p for pkg in SHIPPED_PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    names = _names_in(sources)
    methods = client_methods()
    calls: dict[str, Call] = {}
    for raw in names:
        name = raw
        for suffix in _CLIENT_SUFFIXES:
            name = name.removesuffix(suffix)
        by_class = methods.get(name)
        if not by_class:
            continue
        # A name several API classes define (create_namespaced_event: core/v1 and
        # events.k8s.io/v1) belongs to the class the code names.
        candidates = {cls: c for cls, c in by_class.items() if cls in names} or by_class
        assert len(candidates) == 1, f"{name} is ambiguous between {sorted(candidates)}"
        calls[name] = next(iter(candidates.values()))
    return calls


# --- granted ----------------------------------------------------------------------------


def granted(rules: Iterable[Mapping[str, Any]]) -> set[Permission]:
    return {
        Permission(group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def ca_secret_name(objects: list[Obj]) -> str:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    (arg,) = [a for a in container["args"] if a.startswith("--ca-secret=")]
    return str(arg.partition("=")[2])


@pytest.fixture(scope="module")
def recorded() -> list[Call]:
    objects = render()

    async def both() -> list[Call]:
        kube = await record_kubernetes_source()
        store = await record_ca_store(NAMESPACE, ca_secret_name(objects))
        epoch = await record_epoch_store(NAMESPACE, ca_secret_name(objects))
        published = await record_root_cert_publisher()
        return [*kube, *store, *epoch, *published]

    return asyncio.run(both())


def test_recorded_calls_are_the_expected_kinds(recorded: list[Call]) -> None:
    """The fakes saw what the modules are documented to do (guards the recording itself)."""
    perms = {c.permission for c in recorded}
    assert Permission("", "services", "watch") in perms
    assert Permission("discovery.k8s.io", "endpointslices", "list") in perms
    assert Permission("", "events", "create") in perms
    assert Permission("", "secrets", "get") in perms
    assert Permission("", "secrets", "create") in perms
    assert Permission("", "configmaps", "get") in perms
    assert Permission("", "configmaps", "create") in perms
    assert Permission("", "configmaps", "update") in perms


def test_referenced_client_methods_map_to_calls() -> None:
    calls = referenced_calls()
    assert calls["list_pod_for_all_namespaces"].permission == Permission("", "pods", "list")
    assert calls["create_namespaced_event"].permission == Permission("", "events", "create")
    assert calls["read_namespaced_secret"].permission == Permission("", "secrets", "get")


def test_rbac_grants_exactly_what_the_code_calls(recorded: list[Call]) -> None:
    objects = render()
    cluster_role = one(objects, "ClusterRole")
    role = one(objects, "Role")
    needed = {c.permission for c in recorded} | {c.permission for c in referenced_calls().values()}
    everything = granted(cluster_role["rules"]) | granted(role["rules"])
    missing = sorted(str(p) for p in needed - everything)
    unused = sorted(str(p) for p in everything - needed)
    assert missing == [], f"the code makes calls the chart does not grant: {missing}"
    assert unused == [], f"the chart grants calls the code never makes: {unused}"


def test_namespaced_grants_are_the_ca_secret_and_its_key_epoch(recorded: list[Call]) -> None:
    objects = render()
    role = one(objects, "Role")
    cluster_role = one(objects, "ClusterRole")
    secret = ca_secret_name(objects)
    epoch = secret + CONFIGMAP_SUFFIX
    assert all(p.resource != "secrets" for p in granted(cluster_role["rules"]))
    assert role["metadata"]["namespace"] == NAMESPACE
    # The store reads only the Secret the chart names, in the release's namespace; the Role
    # lets it read that one and no other.
    reads = [c for c in recorded if c.permission == Permission("", "secrets", "get")]
    assert {(c.namespace, c.name) for c in reads} == {(NAMESPACE, secret)}
    named = {r["resources"][0]: r for r in role["rules"] if "resourceNames" in r}
    assert named["secrets"]["resourceNames"] == [secret] and named["secrets"]["verbs"] == ["get"]
    # The key epoch: only its ConfigMap beside the Secret is read and updated, and the Role
    # grants exactly that.
    assert named["configmaps"]["resourceNames"] == [epoch]
    assert sorted(named["configmaps"]["verbs"]) == ["get", "update"]
    unnamed = [r for r in role["rules"] if "resourceNames" not in r]
    assert all(r["resources"] == ["secrets"] and r["verbs"] == ["create"] for r in unnamed)
    configmaps = [c for c in recorded if c.permission.resource == "configmaps"]
    by_name = {(c.namespace, c.name) for c in configmaps if c.permission.verb != "create"}
    assert {n for ns, n in by_name if ns == NAMESPACE and n == epoch} == {epoch}
    assert {n for _, n in by_name} == {CONFIGMAP_NAME, epoch}
    (root_cert,) = [
        r for r in cluster_role["rules"] if "configmaps" in r["resources"] and "get" in r["verbs"]
    ]
    assert root_cert["resourceNames"] == [CONFIGMAP_NAME]
    binding = one(objects, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    cluster_binding = one(objects, "ClusterRoleBinding")
    account = one(objects, "ServiceAccount")["metadata"]
    expected = [{"kind": "ServiceAccount", "name": account["name"], "namespace": NAMESPACE}]
    assert binding["subjects"] == cluster_binding["subjects"] == expected
