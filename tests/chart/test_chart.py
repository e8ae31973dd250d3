"""charts/inferlane: rendered by the real Helm engine, checked against Kubernetes 1.33.

The default render is kept in snapshots/default.yaml. After an intended change, regenerate
it and review the diff:

    INFERLANE_UPDATE_SNAPSHOTS=1 .venv/bin/pytest tests/chart/test_chart.py -k snapshot
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from tests.chart.render import (
    CUSTOM_KINDS,
    NAMESPACE,
    RELEASE,
    Obj,
    kinds,
    lint,
    one,
    render,
    render_files,
    snapshot_text,
    validate,
)
from xds_server.cli import build_parser

SNAPSHOT = Path(__file__).parent / "snapshots" / "default.yaml"
DASHBOARD = (
    Path(__file__).resolve().parents[2] / "charts" / "inferlane" / "dashboards" / "inferlane.json"
)
UPDATE_ENV = "INFERLANE_UPDATE_SNAPSHOTS"

#: SPEC.md "The control plane's ports".
SPEC_PORTS = {
    "grpc-xds": 15010,
    "https-xds-mtls": 15011,
    "https-xds": 15012,
    "http-monitoring": 15014,
    "grpc-rls": 8081,
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "existing-ca": {"ca": {"existingSecret": "cert-manager-issued-ca"}},
    "single-replica": {"replicaCount": 1},
    "monitoring": {
        "serviceMonitor": {
            "enabled": True,
            "namespace": "monitoring",
            "labels": {"release": "prometheus"},
            "interval": "15s",
            "scrapeTimeout": "5s",
            "honorLabels": True,
        }
    },
    "own-account": {
        "serviceAccount": {"create": False, "name": "mesh-admin"},
        "rbac": {"create": False},
    },
    "scheduling": {
        "replicaCount": 3,
        "image": {
            "repository": "registry.example/inferlane",
            "digest": "sha256:" + "ab" * 32,
            "pullPolicy": "Always",
        },
        "imagePullSecrets": ["registry-credentials"],
        "topologySpread": {
            "topologyKeys": ["topology.kubernetes.io/zone", "kubernetes.io/hostname"],
            "whenUnsatisfiable": "DoNotSchedule",
        },
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mesh"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]}
                    ]
                }
            }
        },
        "nodeSelector": {"kubernetes.io/arch": "amd64"},
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/team": "mesh"},
        "podLabels": {"team": "mesh"},
        "commonLabels": {"cost-center": "ml"},
        "service": {"annotations": {"example.com/internal": "true"}},
        "serviceAccount": {"annotations": {"example.com/role": "inferlane"}},
        "resources": {"requests": {"cpu": 1, "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
    },
    "settings": {
        "config": {
            "logLevel": "debug",
            "logFormat": "json",
            "trustDomain": "mesh.example.org",
            "certificateTTLSeconds": 3600,
            "debounceQuietSeconds": 0.25,
            "debounceMaxSeconds": 5,
        },
        "podDisruptionBudget": {"minAvailable": "", "maxUnavailable": "50%"},
        "terminationGracePeriodSeconds": 10,
    },
    "names": {"fullnameOverride": "mesh-cp", "namespace": "mesh-system"},
    "dashboard": {
        "grafanaDashboard": {
            "enabled": True,
            "namespace": "monitoring",
            "annotations": {"grafana_folder": "Mesh"},
        }
    },
    "global-rate-limit": {
        "globalRateLimit": {
            "enabled": True,
            "failureMode": "closed",
            "redis": {"existingSecret": "ratelimit-redis", "existingSecretKey": "uri"},
        }
    },
    "global-rate-limit-url": {
        "replicaCount": 3,
        "globalRateLimit": {
            "enabled": True,
            "address": "ratelimit.mesh.example",
            "redis": {"url": "redis://redis.mesh-system.svc:6379/2"},
        },
    },
    "global-rate-limit-one-replica": {"replicaCount": 1, "globalRateLimit": {"enabled": True}},
}


def check_service_monitor(monitor: Obj, objects: list[Obj]) -> None:
    """No schema ships for the Prometheus Operator's CRD: check what it must point at."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = one(objects, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "honorLabels"}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_value_set_renders_objects_valid_for_kubernetes(name: str) -> None:
    objects = render(VALUE_SETS[name])
    assert objects
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            check_service_monitor(obj, objects)
        else:
            validate(obj)
    assert lint(VALUE_SETS[name]) == []


def test_default_render_matches_snapshot() -> None:
    text = snapshot_text()
    if os.environ.get(UPDATE_ENV):
        SNAPSHOT.write_text(text, encoding="utf-8")
    assert SNAPSHOT.exists(), f"no snapshot; run with {UPDATE_ENV}=1 to write it"
    assert text == SNAPSHOT.read_text(encoding="utf-8"), (
        f"the default render changed; if intended, run with {UPDATE_ENV}=1 and review the diff"
    )


def test_default_objects() -> None:
    assert kinds(render()) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    for obj in render():
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE


def _container(objects: list[Obj]) -> Obj:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return dict(container)


def _port_number(container: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == port)


def test_deployment_is_replicated_spread_probed_and_locked_down() -> None:
    objects = render()
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0

    container = _container(objects)
    probes = {
        kind: (
            container[kind]["httpGet"]["path"],
            _port_number(container, container[kind]["httpGet"]["port"]),
        )
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes == {
        "startupProbe": ("/healthz", 15014),
        "livenessProbe": ("/healthz", 15014),
        "readinessProbe": ("/readyz", 15014),
    }
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "add" not in security["capabilities"]
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == SPEC_PORTS


def test_service_has_the_spec_ports() -> None:
    service = one(render(), "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == SPEC_PORTS
    assert all(p["targetPort"] == p["name"] for p in service["spec"]["ports"])
    deployment = one(render(), "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_disruption_budget_only_with_several_replicas() -> None:
    budget = one(render(), "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert "PodDisruptionBudget" not in kinds(render({"replicaCount": 1}))
    assert "PodDisruptionBudget" not in kinds(render({"podDisruptionBudget": {"enabled": False}}))
    budget = one(render(VALUE_SETS["settings"]), "PodDisruptionBudget")
    assert budget["spec"] == {**budget["spec"], "maxUnavailable": "50%"}
    assert "minAvailable" not in budget["spec"]


def expanded_args(objects: list[Obj]) -> list[str]:
    """The container's arguments as the kubelet expands ``$(VAR)`` from its environment."""
    container = _container(objects)
    config = one(objects, "ConfigMap")
    env: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"].get("configMapKeyRef")
        if ref is not None:
            assert ref["name"] == config["metadata"]["name"]
            env[var["name"]] = config["data"][ref["key"]]
    expanded = []
    for arg in container["args"]:
        for name in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
            assert name in env, f"{arg} refers to ${name}, which the container does not define"
        expanded.append(re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m[1]], arg))
    return expanded


def test_settings_flow_from_the_configmap_to_the_arguments() -> None:
    args = expanded_args(render(VALUE_SETS["settings"]))
    assert "--log-level=debug" in args
    assert "--log-format=json" in args
    assert "--trust-domain=mesh.example.org" in args
    assert "--cert-ttl=3600" in args
    assert "--debounce-quiet=0.25" in args
    assert "--debounce-max=5" in args

    # A settings change changes the pods' checksum, so helm upgrade rolls them.
    def checksum(values: Mapping[str, Any]) -> str:
        pod = one(render(values), "Deployment")["spec"]["template"]
        return str(pod["metadata"]["annotations"]["checksum/config"])

    assert checksum({}) != checksum(VALUE_SETS["settings"])


def test_the_cli_understands_the_container_arguments() -> None:
    """The chart runs flags that ``inferlane serve`` has (SPEC.md "Command line")."""
    args = expanded_args(render())
    parser = build_parser()
    parsed, unknown = parser.parse_known_args(args)
    assert unknown == [], f"inferlane does not know these flags: {unknown}"
    assert parsed.command == "serve"
    assert parsed.kubernetes is True
    assert (parsed.xds_port, parsed.admin_port) == (15010, 15014)
    assert (parsed.xds_mtls_port, parsed.xds_tls_port) == (15011, 15012)
    # No Redis by default, so no global rate-limit service (two replicas could not share
    # its counters).
    assert parsed.rls_port is None
    assert parsed.ca_secret == f"{RELEASE}-ca"
    assert parsed.trust_domain == "cluster.local"


def test_the_dashboard_is_off_by_default_and_loadable_by_grafana() -> None:
    assert "ConfigMap" not in {
        o["kind"] for o in render() if o["metadata"]["name"].endswith("-dashboard")
    }
    objects = render(VALUE_SETS["dashboard"])
    (config_map,) = [o for o in objects if o["metadata"]["name"] == f"{RELEASE}-dashboard"]
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Mesh"}
    (text,) = config_map["data"].values()
    assert json.loads(text) == json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _env(objects: list[Obj]) -> dict[str, Any]:
    return {e["name"]: e.get("valueFrom", e.get("value")) for e in _container(objects)["env"]}


def test_global_rate_limit_service_is_reachable_and_shares_its_counters() -> None:
    """Sidecars get the chart's Service as the service's address, and every replica the same
    Redis: from a Secret (kept out of the arguments) or a URL."""
    objects = render(VALUE_SETS["global-rate-limit"])
    parsed = build_parser().parse_args(expanded_args(objects))
    assert parsed.rls_port == 8081
    assert parsed.rls_address == f"{RELEASE}.{NAMESPACE}.svc"
    service = one(objects, "Service")
    assert parsed.rls_address == f"{service['metadata']['name']}.{NAMESPACE}.svc"
    assert parsed.rate_limit_failure_mode == "closed"
    assert _env(objects)["INFERLANE_REDIS_URL"] == {
        "secretKeyRef": {"name": "ratelimit-redis", "key": "uri"}
    }
    assert not any("redis" in arg for arg in _container(objects)["args"])

    objects = render(VALUE_SETS["global-rate-limit-url"])
    parsed = build_parser().parse_args(expanded_args(objects))
    assert (parsed.rls_port, parsed.rls_address) == (8081, "ratelimit.mesh.example")
    assert parsed.rate_limit_failure_mode == "open"
    config = one(objects, "ConfigMap")["data"]
    assert config["INFERLANE_REDIS_URL"] == "redis://redis.mesh-system.svc:6379/2"
    ref = _env(objects)["INFERLANE_REDIS_URL"]["configMapKeyRef"]
    assert ref == {"name": f"{RELEASE}-config", "key": "INFERLANE_REDIS_URL"}

    # One replica may count in memory.
    objects = render(VALUE_SETS["global-rate-limit-one-replica"])
    assert build_parser().parse_args(expanded_args(objects)).rls_port == 8081
    assert "INFERLANE_REDIS_URL" not in _env(objects)


@pytest.mark.parametrize("replicas", [2, 5])
def test_several_replicas_with_counters_in_memory_are_refused(replicas: int) -> None:
    with pytest.raises(
        helm.HelmError, match=r"globalRateLimit\.enabled with replicaCount \d+ needs Redis"
    ):
        render({"replicaCount": replicas, "globalRateLimit": {"enabled": True}})


def test_existing_ca_secret_is_only_read() -> None:
    """cert-manager's Secret is only read; the key epoch lives in a ConfigMap of ours."""
    objects = render(VALUE_SETS["existing-ca"])
    assert "--ca-secret=cert-manager-issued-ca" in _container(objects)["args"]
    role = one(objects, "Role")
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["cert-manager-issued-ca"],
            "verbs": ["get"],
        },
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["cert-manager-issued-ca-key-epoch"],
            "verbs": ["get", "update"],
        },
    ]


def test_names_follow_the_overrides() -> None:
    objects = render(VALUE_SETS["names"])
    assert {o["metadata"]["name"] for o in objects} == {"mesh-cp", "mesh-cp-config"}
    for obj in objects:
        if "namespace" in obj["metadata"]:
            assert obj["metadata"]["namespace"] == "mesh-system"
    binding = one(objects, "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "mesh-cp", "namespace": "mesh-system"}
    ]


def test_own_service_account_without_rbac() -> None:
    objects = render(VALUE_SETS["own-account"])
    assert not {"ServiceAccount", "ClusterRole", "Role"} & set(kinds(objects))
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "mesh-admin"
    with pytest.raises(helm.HelmError, match=re.escape("serviceAccount.name is required")):
        render({"serviceAccount": {"create": False}})


def test_notes_tell_how_to_inject_and_watch() -> None:
    notes = render_files()[f"{RELEASE}/templates/NOTES.txt"]
    assert f"{RELEASE}.{NAMESPACE}.svc:15012" in notes
    assert "inferlane status --admin http://127.0.0.1:15014" in notes
    # The inject command in the notes is one that `inferlane inject` accepts.
    command = notes[notes.index("inferlane inject") : notes.index("| kubectl apply")]
    words = shlex.split(command.replace("\\\n", " "))
    parsed = build_parser().parse_args(words[1:])
    assert parsed.xds == f"{RELEASE}.{NAMESPACE}.svc:15012"


BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"replicaCont": 3}, "replicaCont"),
    ({"replicaCount": "two"}, "replicaCount"),
    ({"replicaCount": 0}, "replicaCount"),
    ({"ca": {"existingSecert": "x"}}, "existingSecert"),
    ({"config": {"loglevel": "debug"}}, "loglevel"),
    ({"config": {"logLevel": "verbose"}}, "logLevel"),
    ({"config": {"logFormat": "yaml"}}, "logFormat"),
    ({"grafanaDashboard": {"enable": True}}, "enable"),
    ({"config": {"trustDomain": "Not A Domain"}}, "trustDomain"),
    ({"image": {"tag": "1", "registry": "x"}}, "registry"),
    ({"resources": {"request": {"cpu": 1}}}, "request"),
    ({"resources": {"requests": {"cpu": "lots"}}}, "cpu"),
    ({"topologySpread": {"whenUnsatisfiable": "Never"}}, "whenUnsatisfiable"),
    ({"tolerations": [{"key": "a", "operatr": "Exists"}]}, "operatr"),
    ({"serviceMonitor": {"enable": True}}, "enable"),
    ({"podDisruptionBudget": {"minAvailable": "half"}}, "minAvailable"),
    ({"globalRateLimit": {"failureMode": "maybe"}}, "failureMode"),
    ({"globalRateLimit": {"redis": {"url": "http://redis:6379"}}}, "url"),
    ({"globalRateLimit": {"redis": {"password": "x"}}}, "password"),
    ({"globalRateLimit": {"address": "not an address"}}, "address"),
]


@pytest.mark.parametrize(("values", "key"), BAD_VALUES, ids=[k for _, k in BAD_VALUES])
def test_schema_refuses_mistakes(values: dict[str, Any], key: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(key)):
        render(values)
