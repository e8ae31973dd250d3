"""Build a :class:`World` from raw Kubernetes objects (plain dicts, as YAML or the API gives).

Kinds read: Service, EndpointSlice, Pod and Node; any other kind is ignored, so a manifest
directory may hold Deployments, ConfigMaps and the like. Only Services annotated
``inferlane.io/enabled: "true"`` become :class:`InferenceService` s.

Endpoints come from the EndpointSlices labelled ``kubernetes.io/service-name``. A Service
with no EndpointSlice at all in the input gets its endpoints derived from the Pods its
selector matches, as the EndpointSlice controller would; that is what makes a plain
manifest directory usable without a cluster.

Malformed objects never raise: each is skipped with a :class:`SourceError` saying why.
The output is sorted, so the same objects in any order give an equal ``World``.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from mesh.annotations import ENABLED, PREFIX, parse_service_config
from mesh.model import (
    SIDECAR_CONTAINER,
    AnnotationError,
    Endpoint,
    InferenceService,
    ServicePort,
    SourceError,
    Workload,
    World,
)

logger = logging.getLogger(__name__)

KINDS = frozenset({"Service", "EndpointSlice", "Pod", "Node"})

#: The label that ties an EndpointSlice to its Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: Extended resources that make a Pod GPU-backed when requested (or limited) in a container.
GPU_RESOURCES = frozenset({"nvidia.com/gpu", "amd.com/gpu"})
GPU_RESOURCE_PREFIXES = ("gpu.intel.com/",)
#: A Node label (value "true") that makes every Pod on the Node GPU-backed.
GPU_NODE_LABEL = "nvidia.com/gpu.present"

DEFAULT_NAMESPACE = "default"
_FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
_QUANTITY = re.compile(r"\+?([0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
#: vLLM's flag for the sequences it runs at once; its parser takes ``_`` for ``-`` too.
_MAX_NUM_SEQS_FLAGS = frozenset({"--max-num-seqs", "--max_num_seqs"})


class Malformed(ValueError):
    """An object that cannot be read; it is skipped with a SourceError."""


# --- typed views of the objects, parsed once -------------------------------------------


@dataclass(frozen=True)
class _Meta:
    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str]
    annotations: Mapping[str, Any]


@dataclass(frozen=True)
class _Pod:
    meta: _Meta
    service_account: str
    ip: str
    node_name: str
    ready: bool
    finished: bool
    requests_gpu: bool
    #: Named container ports: name -> containerPort.
    named_ports: Mapping[str, int]
    sidecar: bool
    max_num_seqs: int | None


@dataclass(frozen=True)
class _Service:
    meta: _Meta
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str]


@dataclass(frozen=True)
class _SliceEndpoint:
    addresses: tuple[str, ...]
    ready: bool
    node_name: str
    pod: tuple[str, str] | None


@dataclass(frozen=True)
class _Slice:
    meta: _Meta
    service: str
    #: (port name, port number) pairs.
    ports: tuple[tuple[str, int], ...]
    endpoints: tuple[_SliceEndpoint, ...]


@dataclass(frozen=True)
class _Node:
    name: str
    gpu: bool


@dataclass
class _Inputs:
    services: dict[tuple[str, str], _Service]
    slices: dict[tuple[str, str], list[_Slice]]
    pods: dict[tuple[str, str], _Pod]
    nodes: dict[str, _Node]
    errors: list[SourceError]


# --- public entry points ---------------------------------------------------------------


def build_world(objects: Iterable[object], *, source_errors: Iterable[SourceError] = ()) -> World:
    """Build a World from raw objects; ``source_errors`` are carried into it as they are."""
    inputs = _parse_objects(flatten_lists(objects))
    gpu_nodes = frozenset(name for name, node in inputs.nodes.items() if node.gpu)
    by_label = _index_by_label(inputs.pods.values())
    errors = list(source_errors) + inputs.errors
    services: list[InferenceService] = []
    for key in sorted(inputs.services):
        svc = inputs.services[key]
        config, annotation_errors = parse_service_config(svc.meta.annotations)
        if not config.enabled:
            errors.extend(_not_enabled(svc.meta, annotation_errors))
            continue
        endpoints = (
            _slice_endpoints(svc, inputs.slices[key], inputs.pods, gpu_nodes)
            if key in inputs.slices
            else _derived_endpoints(svc, by_label, gpu_nodes)
        )
        services.append(
            InferenceService(
                namespace=svc.meta.namespace,
                name=svc.meta.name,
                ports=svc.ports,
                config=config,
                errors=annotation_errors,
                endpoints=endpoints,
                uid=svc.meta.uid,
            )
        )
    workloads = {key: _workload(inputs.pods[key], gpu_nodes) for key in sorted(inputs.pods)}
    return World(
        services=tuple(services),
        workloads=MappingProxyType(workloads),
        source_errors=tuple(sorted(set(errors), key=lambda e: (e.source, e.message))),
    )


def _not_enabled(meta: _Meta, annotation_errors: Sequence[AnnotationError]) -> list[SourceError]:
    """Why a Service with ``inferlane.io/*`` annotations is not in the mesh, if it looks
    unintended: a bad ``enabled`` value, or other annotations without ``enabled``."""
    where = _describe("Service", meta)
    found = [
        SourceError(where, f"not enabled: {err}")
        for err in annotation_errors
        if err.annotation == ENABLED
    ]
    keys = [k for k in meta.annotations if isinstance(k, str) and k.startswith(PREFIX)]
    if keys and ENABLED not in meta.annotations:
        found.append(
            SourceError(
                where,
                f'has {", ".join(sorted(keys))} but not {ENABLED}: "true"; they have no effect',
                warning=True,
            )
        )
    return found


def flatten_lists(objects: Iterable[object]) -> Iterator[object]:
    """Yield objects with ``kind: List`` (and typed lists such as ``PodList``) expanded.

    Items of a typed list have no ``kind`` of their own (the API leaves it out), so they
    get the list's kind without the ``List`` suffix.
    """
    for obj in objects:
        kind = obj.get("kind") if isinstance(obj, Mapping) else None
        items = obj.get("items") if isinstance(obj, Mapping) else None
        if not isinstance(kind, str) or not kind.endswith("List") or not isinstance(items, list):
            yield obj
            continue
        item_kind = kind.removesuffix("List")
        for item in items:
            if item_kind and isinstance(item, Mapping) and "kind" not in item:
                yield {**item, "kind": item_kind}
            else:
                yield from flatten_lists([item])


# --- parsing ---------------------------------------------------------------------------


def _parse_objects(objects: Iterable[object]) -> _Inputs:
    inputs = _Inputs(services={}, slices=defaultdict(list), pods={}, nodes={}, errors=[])
    for obj in objects:
        if not isinstance(obj, Mapping):
            problem = f"a {type(obj).__name__} is not a Kubernetes object; skipped"
            inputs.errors.append(SourceError("input", problem))
            continue
        kind = obj.get("kind")
        if not isinstance(kind, str):
            inputs.errors.append(SourceError("input", "an object without a kind; skipped"))
            continue
        if kind not in KINDS:
            continue
        try:
            _add(inputs, kind, obj)
        except Malformed as exc:
            inputs.errors.append(SourceError(_describe_raw(kind, obj), f"{exc}; skipped"))
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            logger.debug("unreadable %s object", kind, exc_info=True)
            inputs.errors.append(
                SourceError(_describe_raw(kind, obj), f"cannot be read ({exc}); skipped")
            )
    return inputs


def _add(inputs: _Inputs, kind: str, obj: Mapping[str, Any]) -> None:
    if kind == "Node":
        node = _parse_node(obj)
        _put(inputs, inputs.nodes, node.name, node, f"Node {node.name}")
    elif kind == "Pod":
        pod = _parse_pod(obj)
        key = (pod.meta.namespace, pod.meta.name)
        _put(inputs, inputs.pods, key, pod, _describe("Pod", pod.meta))
    elif kind == "Service":
        svc = _parse_service(obj)
        key = (svc.meta.namespace, svc.meta.name)
        _put(inputs, inputs.services, key, svc, _describe("Service", svc.meta))
    else:
        slice_ = _parse_slice(obj)
        if slice_ is not None:
            inputs.slices[(slice_.meta.namespace, slice_.service)].append(slice_)


def _put(inputs: _Inputs, table: dict[Any, Any], key: object, value: object, what: str) -> None:
    if key in table:
        inputs.errors.append(SourceError(what, "defined more than once; the first is used"))
        return
    table[key] = value


def _describe(kind: str, meta: _Meta) -> str:
    return f"{kind} {meta.namespace}/{meta.name}"


def _describe_raw(kind: str, obj: Mapping[str, Any]) -> str:
    """Name an object for an error message, without depending on its position."""
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        return f"{kind} without a name"
    if kind == "Node":
        return f"Node {name}"
    namespace = meta.get("namespace") if isinstance(meta, Mapping) else None
    ns = namespace if isinstance(namespace, str) and namespace else DEFAULT_NAMESPACE
    return f"{kind} {ns}/{name}"


def _parse_meta(obj: Mapping[str, Any], *, namespaced: bool = True) -> _Meta:
    meta = _map(obj.get("metadata"), "metadata", required=True)
    name = _str(meta.get("name"), "metadata.name")
    if not name:
        raise Malformed("metadata.name is missing")
    namespace = _str(meta.get("namespace"), "metadata.namespace") if namespaced else ""
    annotations = meta.get("annotations")
    if annotations is not None and not isinstance(annotations, Mapping):
        raise Malformed("metadata.annotations is not a map")
    return _Meta(
        namespace=(namespace or DEFAULT_NAMESPACE) if namespaced else "",
        name=name,
        uid=_str(meta.get("uid"), "metadata.uid"),
        labels=_labels(meta.get("labels"), "metadata.labels"),
        annotations=annotations or {},
    )


def _parse_node(obj: Mapping[str, Any]) -> _Node:
    meta = _parse_meta(obj, namespaced=False)
    return _Node(name=meta.name, gpu=meta.labels.get(GPU_NODE_LABEL, "").lower() == "true")


def _parse_pod(obj: Mapping[str, Any]) -> _Pod:
    meta = _parse_meta(obj)
    spec = _map(obj.get("spec"), "spec")
    status = _map(obj.get("status"), "status")
    account = _str(spec.get("serviceAccountName"), "spec.serviceAccountName") or _str(
        spec.get("serviceAccount"), "spec.serviceAccount"
    )
    requests_gpu = False
    named_ports: dict[str, int] = {}
    sidecar = False
    max_num_seqs: int | None = None
    for i, raw in enumerate(_list(spec.get("initContainers"), "spec.initContainers")):
        init = _map(raw, f"spec.initContainers[{i}]")
        sidecar = sidecar or init.get("name") == SIDECAR_CONTAINER
    for i, raw in enumerate(_list(spec.get("containers"), "spec.containers")):
        container = _map(raw, f"spec.containers[{i}]")
        requests_gpu = requests_gpu or _container_requests_gpu(container, i)
        sidecar = sidecar or container.get("name") == SIDECAR_CONTAINER
        max_num_seqs = max_num_seqs or _max_num_seqs(container)
        for j, raw_port in enumerate(_list(container.get("ports"), f"containers[{i}].ports")):
            port = _map(raw_port, f"containers[{i}].ports[{j}]")
            name = _str(port.get("name"), f"containers[{i}].ports[{j}].name")
            number = _port(port.get("containerPort"), f"containers[{i}].ports[{j}].containerPort")
            if name and name not in named_ports:
                named_ports[name] = number
    metadata = _map(obj.get("metadata"), "metadata")
    terminating = metadata.get("deletionTimestamp") is not None
    phase = _str(status.get("phase"), "status.phase")
    return _Pod(
        meta=meta,
        service_account=account or "default",
        ip=_pod_ip(status),
        node_name=_str(spec.get("nodeName"), "spec.nodeName"),
        ready=_condition_true(status, "Ready") and not terminating,
        finished=phase in _FINISHED_PHASES,
        requests_gpu=requests_gpu,
        named_ports=MappingProxyType(named_ports),
        sidecar=sidecar,
        max_num_seqs=max_num_seqs,
    )


def _max_num_seqs(container: Mapping[str, Any]) -> int | None:
    """vLLM's ``--max-num-seqs N`` (or ``=N``) in a container's command or arguments."""
    words = [
        w
        for key in ("command", "args")
        if isinstance(container.get(key), list)
        for w in container[key]
        if isinstance(w, str)
    ]
    for i, word in enumerate(words):
        flag, eq, value = word.partition("=")
        if flag not in _MAX_NUM_SEQS_FLAGS:
            continue
        if not eq:
            value = words[i + 1] if i + 1 < len(words) else ""
        if _is_number(value) and int(value) > 0:
            return int(value)
    return None


def _pod_ip(status: Mapping[str, Any]) -> str:
    ip = _str(status.get("podIP"), "status.podIP")
    if ip:
        return ip
    for i, raw in enumerate(_list(status.get("podIPs"), "status.podIPs")):
        entry = _map(raw, f"status.podIPs[{i}]")
        ip = _str(entry.get("ip"), f"status.podIPs[{i}].ip")
        if ip:
            return ip
    return ""


def _condition_true(status: Mapping[str, Any], kind: str) -> bool:
    for i, raw in enumerate(_list(status.get("conditions"), "status.conditions")):
        condition = _map(raw, f"status.conditions[{i}]")
        if condition.get("type") == kind:
            return _scalar(condition.get("status"), "status") == "True"
    return False


def _container_requests_gpu(container: Mapping[str, Any], index: int) -> bool:
    resources = _map(container.get("resources"), f"containers[{index}].resources")
    for section in ("requests", "limits"):
        amounts = _map(resources.get(section), f"containers[{index}].resources.{section}")
        for name, amount in amounts.items():
            if _is_gpu_resource(name) and _positive_quantity(amount):
                return True
    return False


def _is_gpu_resource(name: object) -> bool:
    return isinstance(name, str) and (
        name in GPU_RESOURCES or name.startswith(GPU_RESOURCE_PREFIXES)
    )


def _positive_quantity(amount: object) -> bool:
    """Whether a resource quantity (``1``, ``"2"``, ``"500m"``) is above zero.

    A quantity this cannot read counts as a request: the resource is named, and a Pod
    that names a GPU is far more likely to want one than not.
    """
    if isinstance(amount, bool):
        return amount
    if isinstance(amount, int | float):
        return amount > 0
    if isinstance(amount, str):
        match = _QUANTITY.match(amount.strip())
        return match is None or float(match.group(1)) > 0
    return True


def _parse_service(obj: Mapping[str, Any]) -> _Service:
    meta = _parse_meta(obj)
    spec = _map(obj.get("spec"), "spec")
    ports: list[ServicePort] = []
    for i, raw in enumerate(_list(spec.get("ports"), "spec.ports")):
        entry = _map(raw, f"spec.ports[{i}]")
        number = _port(entry.get("port"), f"spec.ports[{i}].port")
        ports.append(
            ServicePort(
                port=number,
                name=_str(entry.get("name"), f"spec.ports[{i}].name"),
                target_port=_target_port(entry.get("targetPort"), number, i),
                protocol=_str(entry.get("protocol"), f"spec.ports[{i}].protocol") or "TCP",
                app_protocol=_str(entry.get("appProtocol"), f"spec.ports[{i}].appProtocol"),
            )
        )
    return _Service(
        meta=meta,
        ports=tuple(ports),
        selector=_labels(spec.get("selector"), "spec.selector"),
    )


def _target_port(raw: object, default: int, index: int) -> int | str:
    where = f"spec.ports[{index}].targetPort"
    if raw in (None, 0, ""):
        return default
    if isinstance(raw, str) and not _is_number(raw):
        return raw
    return _port(raw, where)


def _parse_slice(obj: Mapping[str, Any]) -> _Slice | None:
    meta = _parse_meta(obj)
    service = meta.labels.get(SERVICE_NAME_LABEL, "")
    address_type = _str(obj.get("addressType"), "addressType")
    if not service or address_type == "FQDN":
        return None
    ports: list[tuple[str, int]] = []
    for i, raw in enumerate(_list(obj.get("ports"), "ports")):
        entry = _map(raw, f"ports[{i}]")
        if entry.get("port") is None:
            continue
        ports.append((_str(entry.get("name"), f"ports[{i}].name"), _port(entry["port"], "port")))
    endpoints: list[_SliceEndpoint] = []
    for i, raw in enumerate(_list(obj.get("endpoints"), "endpoints")):
        entry = _map(raw, f"endpoints[{i}]")
        addresses = tuple(
            _str(a, f"endpoints[{i}].addresses")
            for a in _list(entry.get("addresses"), f"endpoints[{i}].addresses")
        )
        conditions = _map(entry.get("conditions"), f"endpoints[{i}].conditions")
        ready = conditions.get("ready")
        if ready is not None and not isinstance(ready, bool):
            raise Malformed(f"endpoints[{i}].conditions.ready is not true or false")
        target = _map(entry.get("targetRef"), f"endpoints[{i}].targetRef")
        pod: tuple[str, str] | None = None
        if target.get("kind") == "Pod" and target.get("name"):
            pod_ns = _str(target.get("namespace"), "targetRef.namespace") or meta.namespace
            pod = (pod_ns, _str(target.get("name"), "targetRef.name"))
        endpoints.append(
            _SliceEndpoint(
                addresses=tuple(a for a in addresses if a),
                # The API: "a nil value should be interpreted as true".
                ready=ready is not False,
                node_name=_str(entry.get("nodeName"), f"endpoints[{i}].nodeName"),
                pod=pod,
            )
        )
    return _Slice(meta=meta, service=service, ports=tuple(ports), endpoints=tuple(endpoints))


# --- endpoints and workloads -----------------------------------------------------------


def _slice_endpoints(
    svc: _Service,
    slices: Sequence[_Slice],
    pods: Mapping[tuple[str, str], _Pod],
    gpu_nodes: frozenset[str],
) -> tuple[Endpoint, ...]:
    by_name = {p.name: p for p in svc.ports}
    found: list[Endpoint] = []
    for slice_ in slices:
        for port_name, port in slice_.ports:
            service_port = by_name.get(port_name)
            if service_port is None:
                continue
            for entry in slice_.endpoints:
                pod = pods.get(entry.pod) if entry.pod else None
                node = entry.node_name or (pod.node_name if pod else "")
                gpu = node in gpu_nodes or (pod is not None and pod.requests_gpu)
                found.extend(
                    Endpoint(
                        address=address,
                        port=port,
                        service_port=service_port.port,
                        ready=entry.ready,
                        gpu=gpu,
                        pod_namespace=entry.pod[0] if entry.pod else "",
                        pod_name=entry.pod[1] if entry.pod else "",
                        node_name=node,
                    )
                    for address in entry.addresses
                )
    return _dedupe(found)


_LabelIndex = Mapping[tuple[str, str, str], Sequence[_Pod]]


def _index_by_label(pods: Iterable[_Pod]) -> _LabelIndex:
    """Pods by (namespace, label key, label value), so selectors need not scan every Pod."""
    index: dict[tuple[str, str, str], list[_Pod]] = defaultdict(list)
    for pod in pods:
        for key, value in pod.meta.labels.items():
            index[(pod.meta.namespace, key, value)].append(pod)
    return index


def _derived_endpoints(
    svc: _Service, by_label: _LabelIndex, gpu_nodes: frozenset[str]
) -> tuple[Endpoint, ...]:
    """What the EndpointSlice controller would publish for ``svc``."""
    if not svc.selector:
        return ()
    namespace = svc.meta.namespace
    candidates = min(
        (by_label.get((namespace, k, v), ()) for k, v in svc.selector.items()), key=len
    )
    found: list[Endpoint] = []
    for pod in candidates:
        if (
            not pod.ip
            or pod.finished
            or any(pod.meta.labels.get(k) != v for k, v in svc.selector.items())
        ):
            continue
        for service_port in svc.ports:
            target = service_port.target_port
            port = pod.named_ports.get(target) if isinstance(target, str) else target
            if not port:
                continue
            found.append(
                Endpoint(
                    address=pod.ip,
                    port=port,
                    service_port=service_port.port,
                    ready=pod.ready,
                    gpu=pod.requests_gpu or pod.node_name in gpu_nodes,
                    pod_namespace=pod.meta.namespace,
                    pod_name=pod.meta.name,
                    node_name=pod.node_name,
                )
            )
    return _dedupe(found)


def _dedupe(endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    """One endpoint per (service port, address, port), sorted; ready if any copy is."""
    chosen: dict[tuple[int, str, int], Endpoint] = {}
    for endpoint in endpoints:
        key = (endpoint.service_port, endpoint.address, endpoint.port)
        current = chosen.get(key)
        if current is None or (endpoint.ready and not current.ready):
            chosen[key] = endpoint
    return tuple(chosen[key] for key in sorted(chosen))


def _workload(pod: _Pod, gpu_nodes: frozenset[str]) -> Workload:
    return Workload(
        namespace=pod.meta.namespace,
        name=pod.meta.name,
        service_account=pod.service_account,
        ip=pod.ip,
        node_name=pod.node_name,
        labels=pod.meta.labels,
        gpu=pod.requests_gpu or pod.node_name in gpu_nodes,
        ready=pod.ready,
        sidecar=pod.sidecar,
        max_num_seqs=pod.max_num_seqs,
    )


# --- checked accessors -----------------------------------------------------------------


def _map(value: object, where: str, *, required: bool = False) -> Mapping[str, Any]:
    if type(value) is dict:  # the common case, without the slower ABC check
        return value
    if value is None:
        if required:
            raise Malformed(f"{where} is missing")
        return {}
    if not isinstance(value, Mapping):
        raise Malformed(f"{where} is not a map")
    return value


def _list(value: object, where: str) -> Sequence[Any]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise Malformed(f"{where} is not a list")
    return value


def _str(value: object, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Malformed(f"{where} is not a string")
    return value


def _scalar(value: object, where: str) -> str:
    """A string-valued field that YAML may have read as a bool or a number."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise Malformed(f"{where} is not a string")


def _labels(value: object, where: str) -> Mapping[str, str]:
    labels = _map(value, where)
    result: dict[str, str] = {}
    for key in sorted(labels, key=str):
        if not isinstance(key, str):
            raise Malformed(f"{where} has a key that is not a string")
        result[key] = _scalar(labels[key], f"{where}[{key}]")
    return MappingProxyType(result)


def _port(value: object, where: str) -> int:
    if isinstance(value, str) and _is_number(value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise Malformed(f"{where} is not a port number (1-65535)")
    return value


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()
