"""A realistic fleet: the manifests of a cluster and the proxies that connect to it.

The default shape, scaled down in proportion by ``proxies``:

* 10,000 proxies in 100 namespaces, with 1,000 service accounts (10 per namespace);
* 50 inference Services (one in each of the first 50 namespaces), each backed by 40
  GPU pods: 2,000 proxies are model pods with an inbound listener of their own; every
  Service sets per-class rate limits, a concurrency cap, timeouts, critical callers and
  ``adaptive: "true"``, so the adaptive controller's multipliers reach the pods' config;
* 1 % of the proxies are gateways (``router~``), one per namespace;
* the rest are client sidecars, their pods spread over the namespace's service accounts;
* every pod is in the world, so every sidecar and gateway has a workload identity and
  its own certificate (mTLS on); the model and client pods carry the sidecar container
  ``inferlane inject`` adds, so endpoints are addressed through their sidecars from the
  start, as in a cluster where injection is on;
* one proxy in ``delta_every`` speaks Delta ADS, the others State of the World.

Pod addresses are loopback addresses (``127.100.0.0/14``): nothing here may address
anything but loopback. Each Service and its pods are one manifest file
(``model-K.yaml``), each namespace's other pods another (``ns-XX.yaml``), so a change to
one Service rewrites a small file, as a GitOps tool or ``kubectl apply`` would touch one
object.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mesh.model import SIDECAR_CONTAINER
from xds_server.sidecar.inject import ENVOY_IMAGE

#: The Service port every model Service exposes, and the pods' container port.
MODEL_PORT = 8000
PORT_NAME = "http"

Obj = dict[str, Any]


@dataclass(frozen=True)
class FleetShape:
    """How many of each. ``scaled(n)`` keeps the proportions for ``n`` proxies."""

    proxies: int = 10_000
    namespaces: int = 100
    accounts_per_namespace: int = 10
    services: int = 50
    pods_per_service: int = 40
    #: One gateway per this many proxies (1 %).
    gateway_every: int = 100
    #: One Delta stream per this many proxies; the rest are SotW.
    delta_every: int = 4
    #: The inference Services are ``adaptive``: the control plane scrapes every model pod's
    #: metrics each second (here nothing answers, so every scrape fails and no multiplier
    #: moves). Off, the same fleet measures the control plane without that load.
    adaptive: bool = True

    @classmethod
    def scaled(cls, proxies: int, *, adaptive: bool = True) -> FleetShape:
        """The default proportions for ``proxies`` (at least one of everything)."""
        f = proxies / cls.proxies
        return cls(
            proxies=proxies,
            adaptive=adaptive,
            namespaces=max(1, round(cls.namespaces * f)),
            services=max(1, round(cls.services * f)),
        )

    @property
    def backends(self) -> int:
        return self.services * self.pods_per_service

    @property
    def gateways(self) -> int:
        return max(1, self.proxies // self.gateway_every)

    @property
    def clients(self) -> int:
        return self.proxies - self.backends - self.gateways

    @property
    def accounts(self) -> int:
        return self.namespaces * self.accounts_per_namespace

    def problems(self) -> list[str]:
        out = []
        if self.clients < 0:
            out.append(f"{self.proxies} proxies cannot hold {self.backends} model pods")
        if self.services > self.namespaces:
            out.append("one Service per namespace at most")
        return out


@dataclass(frozen=True)
class FleetProxy:
    """One proxy of the fleet: how it identifies itself and how it speaks ADS."""

    index: int
    node_id: str
    metadata: Mapping[str, str]
    #: "client", "model" or "gateway": proxies of one role subscribe to the same names.
    role: str
    delta: bool
    namespace: str
    pod: str


@dataclass
class Fleet:
    shape: FleetShape
    #: File name -> the objects it holds.
    files: dict[str, list[Obj]] = field(default_factory=dict)
    proxies: list[FleetProxy] = field(default_factory=list)

    def write(self, directory: Path) -> None:
        for name, objects in self.files.items():
            write_manifest(directory / name, objects)

    def service_file(self, k: int) -> str:
        return f"model-{k}.yaml"

    def service(self, k: int) -> Obj:
        """The k-th inference Service object (to edit and rewrite its file)."""
        return self.files[self.service_file(k)][0]

    def model_pods(self, k: int) -> list[Obj]:
        return self.files[self.service_file(k)][1:]


def write_manifest(path: Path, objects: list[Obj]) -> None:
    """Write ``objects`` as one ``kind: List``, atomically (a rename), as a deploy tool does."""
    document = {"apiVersion": "v1", "kind": "List", "items": objects}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.dump(document, Dumper=_Dumper, sort_keys=False))
    os.replace(tmp, path)


_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def namespace(i: int) -> str:
    return f"ns-{i:02d}"


def pod_ip(i: int) -> str:
    """A loopback address per pod: 127.100.0.1 onwards."""
    n = i + 1
    return f"127.{100 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"


def _pod(name: str, ns: str, ip: str, sa: str, labels: Obj, *, gpu: bool, sidecar: bool) -> Obj:
    container: Obj = {"name": "main", "image": "example.com/app:1"}
    if gpu:
        container["resources"] = {"limits": {"nvidia.com/gpu": 1}}
        container["ports"] = [{"name": PORT_NAME, "containerPort": MODEL_PORT}]
    containers = [container]
    if sidecar:
        containers.append({"name": SIDECAR_CONTAINER, "image": ENVOY_IMAGE})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"serviceAccountName": sa, "containers": containers},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def set_ready(pod: Obj, ready: bool) -> None:
    pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]


def _annotations(k: int, shape: FleetShape) -> dict[str, str]:
    # Critical callers: one service account of two other namespaces, and one whole namespace.
    a = namespace((k + 1) % shape.namespaces)
    b = namespace((k + 2) % shape.namespaces)
    return {
        "inferlane.io/enabled": "true",
        "inferlane.io/default-priority": "standard",
        "inferlane.io/critical-callers": f"{a}/sa-1,{b}/*",
        "inferlane.io/rate-limit": "standard=20,sheddable=5",
        "inferlane.io/max-concurrency": "8",
        "inferlane.io/adaptive": "true" if shape.adaptive else "false",
        "inferlane.io/timeout": "critical=30s,sheddable=120s",
    }


def _service(k: int, shape: FleetShape) -> Obj:
    name = f"model-{k}"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace(k),
            "annotations": _annotations(k, shape),
        },
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": PORT_NAME, "port": MODEL_PORT, "targetPort": PORT_NAME}],
        },
    }


def _node_id(kind: str, ip: str, pod: str, ns: str) -> str:
    return f"{kind}~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"


def build_fleet(shape: FleetShape) -> Fleet:
    problems = shape.problems()
    if problems:
        raise ValueError("; ".join(problems))
    fleet = Fleet(shape)
    index = 0

    def add(kind: str, role: str, ns: str, pod: str, ip: str, *, sa: str) -> None:
        nonlocal index
        fleet.proxies.append(
            FleetProxy(
                index=index,
                node_id=_node_id(kind, ip, pod, ns),
                metadata={"NAMESPACE": ns, "SERVICE_ACCOUNT": sa},
                role=role,
                delta=index % shape.delta_every == shape.delta_every - 1,
                namespace=ns,
                pod=pod,
            )
        )
        index += 1

    for k in range(shape.services):
        ns, name = namespace(k), f"model-{k}"
        objects = [_service(k, shape)]
        for j in range(shape.pods_per_service):
            pod, ip = f"{name}-{j}", pod_ip(index)
            objects.append(_pod(pod, ns, ip, "sa-0", {"app": name}, gpu=True, sidecar=True))
            add("sidecar", "model", ns, pod, ip, sa="sa-0")
        fleet.files[fleet.service_file(k)] = objects
    per_ns: dict[str, list[Obj]] = {namespace(i): [] for i in range(shape.namespaces)}
    for g in range(shape.gateways):
        ns = namespace(g % shape.namespaces)
        pod, ip = f"gateway-{g}", pod_ip(index)
        per_ns[ns].append(_pod(pod, ns, ip, "sa-9", {"app": "gateway"}, gpu=False, sidecar=False))
        add("router", "gateway", ns, pod, ip, sa="sa-9")
    for c in range(shape.clients):
        ns = namespace(c % shape.namespaces)
        sa = f"sa-{(c // shape.namespaces) % shape.accounts_per_namespace}"
        pod, ip = f"client-{c}", pod_ip(index)
        per_ns[ns].append(_pod(pod, ns, ip, sa, {"app": f"client-{sa}"}, gpu=False, sidecar=True))
        add("sidecar", "client", ns, pod, ip, sa=sa)
    for ns, objects in per_ns.items():
        fleet.files[f"{ns}.yaml"] = objects
    return fleet


def roles(fleet: Fleet) -> Iterator[tuple[str, FleetProxy]]:
    """One representative proxy per role."""
    seen: set[str] = set()
    for proxy in fleet.proxies:
        if proxy.role not in seen:
            seen.add(proxy.role)
            yield proxy.role, proxy
