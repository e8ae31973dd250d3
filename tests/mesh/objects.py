"""Builders for raw Kubernetes objects (plain dicts, as the API and YAML give them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Obj = dict[str, Any]

ENABLED = {"inferlane.io/enabled": "true"}


def service(
    name: str,
    *,
    namespace: str = "default",
    annotations: Mapping[str, Any] | None = None,
    selector: Mapping[str, str] | None = None,
    ports: Sequence[Mapping[str, Any]] = ({"name": "http", "port": 8000, "targetPort": 8000},),
    uid: str = "",
) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace}
    meta["annotations"] = dict(ENABLED if annotations is None else annotations)
    if uid:
        meta["uid"] = uid
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "selector": dict(selector if selector is not None else {"app": name}),
            "ports": [dict(p) for p in ports],
        },
    }


def pod(
    name: str,
    *,
    namespace: str = "default",
    labels: Mapping[str, str] | None = None,
    ip: str = "",
    ready: bool = True,
    node: str = "",
    service_account: str | None = None,
    resources: Mapping[str, Any] | None = None,
    ports: Sequence[Mapping[str, Any]] = (),
    phase: str = "Running",
    args: Sequence[str] = (),
    sidecar: bool = False,
) -> Obj:
    container: Obj = {"name": "main", "image": "example.com/app:1"}
    if resources is not None:
        container["resources"] = dict(resources)
    if ports:
        container["ports"] = [dict(p) for p in ports]
    if args:
        container["args"] = list(args)
    spec: Obj = {"containers": [container]}
    if sidecar:  # as inferlane inject adds it: a native sidecar
        proxy = {"name": "inferlane-proxy", "image": "envoyproxy/envoy", "restartPolicy": "Always"}
        spec["initContainers"] = [proxy]
    if node:
        spec["nodeName"] = node
    if service_account is not None:
        spec["serviceAccountName"] = service_account
    status: Obj = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": spec,
        "status": status,
    }


def gpu_limits(resource: str = "nvidia.com/gpu", amount: Any = 1) -> Obj:
    return {"limits": {resource: amount}}


def node(name: str, *, gpu: bool = False) -> Obj:
    labels = {"nvidia.com/gpu.present": "true"} if gpu else {}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def endpoint_slice(
    name: str,
    service_name: str,
    endpoints: Sequence[Mapping[str, Any]],
    *,
    namespace: str = "default",
    ports: Sequence[Mapping[str, Any]] = ({"name": "http", "port": 8000, "protocol": "TCP"},),
) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [dict(p) for p in ports],
        "endpoints": [dict(e) for e in endpoints],
    }


def slice_endpoint(
    ip: str, *, pod_name: str = "", ready: bool | None = True, node: str = ""
) -> Obj:
    entry: Obj = {"addresses": [ip], "conditions": {}}
    if ready is not None:
        entry["conditions"]["ready"] = ready
    if pod_name:
        entry["targetRef"] = {"kind": "Pod", "name": pod_name, "namespace": "default"}
    if node:
        entry["nodeName"] = node
    return entry
