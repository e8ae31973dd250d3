"""``inferlane inject``: valid output, one sidecar per Pod template, other documents untouched.

The sidecar's bootstrap is checked the way the kubelet would run it: its ``$(VAR)``
references are expanded from the container's environment (with downward-API values a
kubelet would fill in), then the real Envoy validates it and, in the end-to-end test,
connects over TLS to an ADS server that records the token and the node it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from envoy.service.discovery.v3 import ads_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.wait import eventually
from mesh.proxy import ProxyKind, proxy_from_node
from mtls.ca import CertificateAuthority
from mtls.publish import CONFIGMAP_NAME, ROOT_CERT_KEY
from mtls.tokens import TOKEN_AUDIENCE
from tests.chart.render import Obj, one, render, validate
from tests.e2e.harness import free_ports
from tests.support.envoy import require_envoy
from xds_server.auth.settings import DEFAULT_SERVER_NAMES
from xds_server.cli import main
from xds_server.sidecar.inject import (
    CA_PATH,
    CA_VOLUME,
    PROMETHEUS_PORT,
    SIDECAR_NAME,
    TEMPLATE_PATHS,
    TOKEN_DIR,
    TOKEN_PATH,
    TOKEN_VOLUME,
    InjectOptions,
    ManifestLoader,
    inject_text,
    split_documents,
)

HERE = Path(__file__).parent
WORKLOADS = (HERE / "manifests" / "workloads.yaml").read_text(encoding="utf-8")
EXAMPLES = sorted((HERE.parents[1] / "examples" / "cluster").glob("*.yaml"))
XDS_HOST = "inferlane.inferlane.svc"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


@pytest.fixture(scope="module")
def opts() -> InjectOptions:
    """The default: the sidecar mounts the root certificate's ConfigMap."""
    return InjectOptions()


@pytest.fixture(scope="module")
def inline(ca: CertificateAuthority) -> InjectOptions:
    """``--ca-file``: the root inlined in every sidecar's bootstrap."""
    return InjectOptions(ca_pem=ca.trust_bundle_pem.decode())


def load(text: str) -> list[Obj]:
    return [d for d in yaml.load_all(text, Loader=ManifestLoader) if d is not None]


def injected(text: str, opts: InjectOptions) -> str:
    result = inject_text(text, opts)
    assert result.errors == ()
    return result.text


def objects(docs: list[Obj]) -> Iterator[Obj]:
    """Every object, with List items flattened."""
    for doc in docs:
        if doc.get("kind") == "List":
            yield from doc["items"]
        else:
            yield doc


def template_of(obj: Obj) -> Obj | None:
    path = TEMPLATE_PATHS.get(obj["kind"])
    if path is None:
        return None
    template = obj
    for key in path:
        template = template[key]
    return template


def sidecars(template: Obj) -> list[Obj]:
    spec = template["spec"]
    return [
        c
        for c in [*spec.get("initContainers", []), *spec["containers"]]
        if c["name"] == SIDECAR_NAME
    ]


# --- what is added ------------------------------------------------------------------------


def test_every_pod_template_gets_one_sidecar(opts: InjectOptions) -> None:
    result = inject_text(WORKLOADS, opts)
    assert result.errors == ()
    assert sorted(result.injected) == [
        "CronJob apps/nightly",
        "DaemonSet apps/agent",
        "Deployment apps/chat",
        "Job apps/batch",
        "Pod apps/debug",
        "Pod apps/listed",
        "ReplicaSet apps/embedder",
        "StatefulSet apps/llama",
    ]
    assert sorted(result.skipped) == [
        "Pod apps/legacy: inferlane.io/inject is false",
        "Pod apps/node-exporter: uses the host network",
    ]
    before = {(o["kind"], o["metadata"]["name"]): o for o in objects(load(WORKLOADS))}
    for obj in objects(load(result.text)):
        template = template_of(obj)
        if template is None:
            continue
        name = obj["metadata"]["name"]
        expected = 0 if name in ("legacy", "node-exporter") else 1
        assert len(sidecars(template)) == expected, f"{obj['kind']} {name}"
        if expected:
            spec = template["spec"]
            # First among the init containers, so it starts before everything else.
            assert spec["initContainers"][0]["name"] == SIDECAR_NAME
            original = template_of(before[(obj["kind"], name)])
            assert original is not None
            assert spec["containers"] == original["spec"]["containers"]
            assert spec["initContainers"][1:] == original["spec"].get("initContainers", [])
            original_volumes = original["spec"].get("volumes", [])
            assert spec["volumes"][: len(original_volumes)] == original_volumes
            added = [v["name"] for v in spec["volumes"][len(original_volumes) :]]
            assert added == [TOKEN_VOLUME, CA_VOLUME]


def test_output_is_valid_kubernetes(opts: InjectOptions) -> None:
    texts = [WORKLOADS, *(p.read_text(encoding="utf-8") for p in EXAMPLES)]
    checked = 0
    for text in texts:
        for obj in objects(load(injected(text, opts))):
            validate(obj)
            checked += 1
    assert checked > 20


def added_policy(chunk: Any) -> bool:
    """Whether a document is a NetworkPolicy that inject added."""
    docs = load(chunk.separator + chunk.body)
    return (
        len(docs) == 1
        and (doc := docs[0]).get("kind") == "NetworkPolicy"
        and doc["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by") == "inferlane"
    )


def without_added_policies(text: str) -> list[Any]:
    return [c for c in split_documents(text) if not added_policy(c)]


def test_documents_without_pod_templates_are_kept_byte_for_byte(opts: InjectOptions) -> None:
    out = without_added_policies(injected(WORKLOADS, opts))
    original = split_documents(WORKLOADS)
    assert len(out) == len(original)
    kept = 0
    for before, after in zip(original, out, strict=True):
        docs = load(before.separator + before.body)
        has_template = any(
            template_of(o) is not None and not _skipped(o) for o in objects(docs) if o
        )
        if not has_template:
            assert (after.separator, after.body) == (before.separator, before.body)
            kept += 1
    # ConfigMap, Service, the two skipped Pods, the comment, the trailing ServiceAccount.
    assert kept == 6


def _skipped(obj: Obj) -> bool:
    return obj["metadata"]["name"] in ("legacy", "node-exporter")


def test_injecting_twice_adds_one_sidecar(opts: InjectOptions) -> None:
    once = injected(WORKLOADS, opts)
    twice = inject_text(once, opts)
    assert twice.text == once
    assert twice.injected == ()
    assert len(twice.skipped) == len(inject_text(WORKLOADS, opts).skipped) + 8


def test_the_sidecar_needs_no_privileges(opts: InjectOptions) -> None:
    for obj in objects(load(injected(WORKLOADS, opts))):
        template = template_of(obj)
        if template is None or _skipped(obj):
            continue
        (sidecar,) = sidecars(template)
        security = sidecar["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] != 0
        assert security["allowPrivilegeEscalation"] is False
        assert security["privileged"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert sidecar["restartPolicy"] == "Always"
        assert sidecar["image"] == "envoyproxy/envoy:v1.40.0"
        # No iptables: nothing else was added, and the pod's own settings are unchanged.
        added = [c["name"] for c in template["spec"]["initContainers"]]
        assert added.count(SIDECAR_NAME) == 1


def test_the_token_is_projected_for_inferlane_only(opts: InjectOptions) -> None:
    deployment = next(o for o in load(injected(WORKLOADS, opts)) if o.get("kind") == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == TOKEN_VOLUME]
    (source,) = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == TOKEN_AUDIENCE == "inferlane"
    (sidecar,) = sidecars(deployment["spec"]["template"])
    (mount,) = [m for m in sidecar["volumeMounts"] if m["name"] == TOKEN_VOLUME]
    assert mount["readOnly"] is True
    assert f"{mount['mountPath']}/{token['path']}" == TOKEN_PATH
    assert mount["mountPath"] == TOKEN_DIR
    # The app containers do not see the token.
    assert all("volumeMounts" not in c for c in spec["containers"])


def test_the_root_certificate_comes_from_the_published_configmap(
    opts: InjectOptions, inline: InjectOptions
) -> None:
    """Istio's convention: no CA in the manifests; the control plane keeps the ConfigMap."""
    deployment = next(o for o in load(injected(WORKLOADS, opts)) if o.get("kind") == "Deployment")
    template = deployment["spec"]["template"]
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == CA_VOLUME]
    assert volume == {"name": CA_VOLUME, "configMap": {"name": CONFIGMAP_NAME}}
    assert CONFIGMAP_NAME == "inferlane-ca-root-cert"
    (sidecar,) = sidecars(template)
    (mount,) = [m for m in sidecar["volumeMounts"] if m["name"] == CA_VOLUME]
    assert mount["readOnly"] is True
    assert f"{mount['mountPath']}/{ROOT_CERT_KEY}" == CA_PATH
    grpc_config = config_of(sidecar_args(opts))["dynamic_resources"]["ads_config"]["grpc_services"][
        0
    ]["google_grpc"]
    assert grpc_config["channel_credentials"]["ssl_credentials"]["root_certs"] == {
        "filename": CA_PATH
    }
    # With --ca-file, the root is inlined and nothing is mounted for it.
    inline_config = config_of(sidecar_args(inline))["dynamic_resources"]["ads_config"]
    root = inline_config["grpc_services"][0]["google_grpc"]["channel_credentials"]
    assert root["ssl_credentials"]["root_certs"] == {"inline_string": inline.ca_pem}
    inline_dep = next(o for o in load(injected(WORKLOADS, inline)) if o.get("kind") == "Deployment")
    assert CA_VOLUME not in {v["name"] for v in inline_dep["spec"]["template"]["spec"]["volumes"]}


def policies(text: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects(load(text)) if o["kind"] == "NetworkPolicy"}


def test_each_workload_is_reachable_only_through_its_sidecar(opts: InjectOptions) -> None:
    """Its NetworkPolicy admits other pods on the sidecar's inbound port alone, and the
    control plane's pods on the workload's own ports (for /metrics)."""
    result = inject_text(WORKLOADS, opts)
    found = policies(result.text)
    assert sorted(found) == [
        "agent-inferlane",
        "batch-inferlane",
        "chat-inferlane",
        "debug-inferlane",
        "embedder-inferlane",
        "llama-inferlane",
        "nightly-inferlane",
    ]
    assert result.unprotected == ("Pod apps/listed: its pods carry no labels to select them by",)
    control_plane = one(render(), "Deployment")["spec"]["template"]["metadata"]
    workloads = {o["metadata"]["name"]: o for o in objects(load(result.text)) if template_of(o)}
    for name, policy in found.items():
        validate(policy)
        workload = workloads[name.removesuffix("-inferlane")]
        template = template_of(workload)
        assert template is not None
        assert policy["metadata"]["namespace"] == workload["metadata"]["namespace"]
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert selector.items() <= template["metadata"]["labels"].items(), name
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        anyone, from_control_plane = policy["spec"]["ingress"]
        # Anyone, but only on the port the sidecar's inbound listener binds (the one its
        # readiness probe checks and its node metadata leaves at the default)
        (sidecar,) = sidecars(template)
        config = json.loads(sidecar["args"][sidecar["args"].index("--config-yaml") + 1])
        overrides = {k: v for k, v in config["node"]["metadata"].items() if "INFERLANE" in k}
        inbound = proxy_from_node(
            "sidecar~10.0.0.1~p.apps~apps.svc.cluster.local", overrides
        ).inbound_port
        # and the port that serves the sidecar's Prometheus stats alone.
        assert anyone == {
            "ports": [
                {"protocol": "TCP", "port": inbound},
                {"protocol": "TCP", "port": PROMETHEUS_PORT},
            ]
        }
        assert sidecar["readinessProbe"]["tcpSocket"]["port"] == inbound
        # The control plane, as the chart labels its pods, in its namespace.
        (peer,) = from_control_plane["from"]
        ns = peer["namespaceSelector"]["matchLabels"]
        assert ns == {"kubernetes.io/metadata.name": "inferlane"}
        pod_labels = peer["podSelector"]["matchLabels"]
        assert pod_labels.items() <= control_plane["labels"].items()
        declared = [
            p["containerPort"]
            for c in template["spec"]["containers"]
            if c["name"] != SIDECAR_NAME
            for p in c.get("ports", [])
        ]
        allowed = [p["port"] for p in from_control_plane.get("ports", [])]
        assert allowed == declared, name
    assert found["chat-inferlane"]["spec"]["ingress"][1]["ports"] == [
        {"protocol": "TCP", "port": 8080}
    ]


def test_network_policy_options(ca: CertificateAuthority) -> None:
    pem = ca.trust_bundle_pem.decode()
    off = inject_text(WORKLOADS, InjectOptions(ca_pem=pem, network_policy=False))
    assert policies(off.text) == {} and off.unprotected == ()
    for options, namespace in (
        (InjectOptions(ca_pem=pem, xds_host="cp.mesh-system.svc.cluster.local"), "mesh-system"),
        (InjectOptions(ca_pem=pem, xds_host="10.0.0.5", control_plane_namespace="x"), "x"),
        (InjectOptions(ca_pem=pem, xds_host="10.0.0.5"), "inferlane"),
    ):
        (peer,) = policies(inject_text(POD_WITH_LABELS, options).text)["p-inferlane"]["spec"][
            "ingress"
        ][1]["from"]
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": namespace
        }


# --- the bootstrap, as the kubelet runs it -------------------------------------------------

DOWNWARD = {
    "metadata.name": "chat-7d4b9-x2x9z",
    "metadata.namespace": "apps",
    "status.podIP": "10.1.2.3",
    "spec.serviceAccountName": "chat",
}
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def kubelet_expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names are replaced, ``$$`` is ``$``."""

    def one(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name = match[1]
        return env[name] if name in env else match[0]

    return _VAR.sub(one, text)


def sidecar_args(opts: InjectOptions) -> list[str]:
    deployment = next(o for o in load(injected(WORKLOADS, opts)) if o.get("kind") == "Deployment")
    (sidecar,) = sidecars(deployment["spec"]["template"])
    env = {e["name"]: DOWNWARD[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in sidecar["env"]}
    args = [kubelet_expand(a, env) for a in sidecar["args"]]
    assert not any("$(" in a for a in args), "a $(VAR) the container does not define"
    assert sidecar["command"] == ["envoy"]
    return args


def config_of(args: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(args[args.index("--config-yaml") + 1])
    return config


def with_config(args: list[str], config: Mapping[str, Any]) -> list[str]:
    out = list(args)
    out[out.index("--config-yaml") + 1] = json.dumps(config)
    return out


def test_bootstrap_names_the_pod_and_its_identity(opts: InjectOptions) -> None:
    config = config_of(sidecar_args(opts))
    node = config["node"]
    assert node["id"] == "sidecar~10.1.2.3~chat-7d4b9-x2x9z.apps~apps.svc.cluster.local"
    proxy = proxy_from_node(node["id"], node["metadata"])
    assert proxy.kind is ProxyKind.SIDECAR
    assert (proxy.ip, proxy.pod_name, proxy.namespace) == ("10.1.2.3", "chat-7d4b9-x2x9z", "apps")
    assert proxy.service_account == "chat"
    assert dict(proxy.labels) == {"app": "chat", "tier": "frontend"}
    (service,) = config["dynamic_resources"]["ads_config"]["grpc_services"]
    grpc_config = service["google_grpc"]
    assert grpc_config["target_uri"] == f"{XDS_HOST}:15012"
    override = grpc_config["channel_args"]["args"]["grpc.ssl_target_name_override"]
    assert override["string_value"] in DEFAULT_SERVER_NAMES
    (credentials,) = grpc_config["call_credentials"]
    plugin = credentials["from_plugin"]["typed_config"]
    assert plugin["secret_data"] == {"filename": TOKEN_PATH}
    assert plugin["header_prefix"] == "Bearer "
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


@pytest.mark.envoy
def test_bootstrap_passes_envoy_validation(
    opts: InjectOptions, ca: CertificateAuthority, tmp_path: Path
) -> None:
    envoy = require_envoy()
    args = sidecar_args(opts)
    config = config_of(args)
    grpc_config = config["dynamic_resources"]["ads_config"]["grpc_services"][0]["google_grpc"]
    # Envoy reads the root at start, as the kubelet will have mounted it: put it there.
    (tmp_path / ROOT_CERT_KEY).write_bytes(ca.trust_bundle_pem)
    grpc_config["channel_credentials"]["ssl_credentials"]["root_certs"]["filename"] = str(
        tmp_path / ROOT_CERT_KEY
    )
    done = subprocess.run(
        [envoy, "--mode", "validate", *with_config(args, config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "OK" in done.stdout + done.stderr


@dataclass
class AdsRecorder(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """An ADS server that records each stream's metadata and first node, and answers nothing."""

    metadata: list[dict[str, str]] = field(default_factory=list)
    nodes: list[Any] = field(default_factory=list)

    async def StreamAggregatedResources(self, requests: Any, context: Any) -> None:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
        async for request in requests:
            if request.HasField("node"):
                self.nodes.append(request.node)


@contextlib.asynccontextmanager
async def tls_ads_server(ca: CertificateAuthority, recorder: AdsRecorder) -> AsyncIterator[int]:
    # The names every control-plane replica's TLS certificate carries.
    cert = ca.issue_server(list(DEFAULT_SERVER_NAMES))
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(recorder, server)
    port = server.add_secure_port(
        "127.0.0.1:0", grpc.ssl_server_credentials([(cert.key_pem, cert.chain_pem)])
    )
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


@pytest.mark.envoy
@pytest.mark.parametrize("root", ["mounted", "inline"])
async def test_envoy_sends_the_token_over_tls(
    root: str,
    opts: InjectOptions,
    inline: InjectOptions,
    ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    """The injected Envoy dials TLS, checks the server's name and CA (read from the mounted
    ConfigMap's file, or inline with --ca-file), and sends the token."""
    envoy = require_envoy()
    token = "eyJhbGciOiJSUzI1NiJ9.test-token.signature"
    (tmp_path / "token").write_text(token)
    recorder = AdsRecorder()
    async with tls_ads_server(ca, recorder) as port:
        args = sidecar_args(opts if root == "mounted" else inline)
        config = config_of(args)
        # Only what a test host needs: the Service's address, the token's place, the
        # admin port. TLS settings, server name and credentials stay as injected.
        grpc_config = config["dynamic_resources"]["ads_config"]["grpc_services"][0]["google_grpc"]
        grpc_config["target_uri"] = f"127.0.0.1:{port}"
        plugin = grpc_config["call_credentials"][0]["from_plugin"]["typed_config"]
        plugin["secret_data"]["filename"] = str(tmp_path / "token")
        roots = grpc_config["channel_credentials"]["ssl_credentials"]["root_certs"]
        if root == "mounted":  # where the kubelet would mount the ConfigMap's key
            (tmp_path / ROOT_CERT_KEY).write_bytes(ca.trust_bundle_pem)
            assert roots == {"filename": CA_PATH}
            roots["filename"] = str(tmp_path / ROOT_CERT_KEY)
        # Ports free on this host, in place of the pod's own 15000 and 15090.
        admin_port, stats_port = free_ports("127.0.0.1", 2)
        config["admin"]["address"]["socket_address"]["port_value"] = admin_port
        static = config["static_resources"]
        (stats_cluster,) = static["clusters"]
        stats_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
            "socket_address"
        ]["port_value"] = admin_port
        (stats_listener,) = static["listeners"]
        assert stats_listener["address"]["socket_address"] == {
            "address": "0.0.0.0",
            "port_value": 15090,
        }
        stats_listener["address"]["socket_address"] = {
            "address": "127.0.0.1",
            "port_value": stats_port,
        }
        # This ADS server answers nothing: do not wait Envoy's default 15 s for it before
        # the listeners accept.
        for source in ("cds_config", "lds_config"):
            config["dynamic_resources"][source]["initial_fetch_timeout"] = "0.2s"
        proc = await asyncio.create_subprocess_exec(
            envoy,
            *with_config(args, config),
            "--log-path",
            str(tmp_path / "envoy.log"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:

            async def connected() -> bool:
                assert proc.returncode is None, (tmp_path / "envoy.log").read_text()[-2000:]
                return bool(recorder.nodes)

            await eventually(connected, timeout=20, what="Envoy's first ADS request")
            # Prometheus scrapes the stats from outside the pod; the rest of the admin
            # interface is not reachable that way.
            async with aiohttp.ClientSession() as session:
                base = f"http://127.0.0.1:{stats_port}"

                async def scraped() -> str:
                    async with session.get(base + "/stats/prometheus") as response:
                        return await response.text() if response.status == 200 else ""

                stats = await eventually(scraped, timeout=20, what="stats on the 15090 listener")
                assert "envoy_server_live" in stats
                async with session.get(base + "/config_dump") as response:
                    assert response.status == 404
        finally:
            proc.kill()
            await proc.wait()
    assert recorder.metadata[0]["authorization"] == f"Bearer {token}"
    node = recorder.nodes[0]
    assert node.id == "sidecar~10.1.2.3~chat-7d4b9-x2x9z.apps~apps.svc.cluster.local"
    assert node.metadata.fields["NAMESPACE"].string_value == "apps"
    assert node.metadata.fields["SERVICE_ACCOUNT"].string_value == "chat"


# --- bad input -----------------------------------------------------------------------------

POD = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, image: b}]\n"
POD_WITH_LABELS = POD.replace("{name: p}", "{name: p, labels: {app: p}}")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (POD + "---\nkind: [unclosed\n", "document 2 (line 6): not valid YAML"),
        (POD + "---\n- a\n- b\n", "document 2 (line 6) is a list, not a Kubernetes object"),
        (POD + "---\njust words\n", "document 2 (line 6) is a string, not a Kubernetes object"),
        ("metadata: {name: x}\n", "document 1 (line 1) has no kind"),
        (
            "kind: Deployment\nmetadata: {name: d}\nspec: {template: 3}\n",
            "document 1 (line 1).spec.template is a number, not a mapping",
        ),
        (
            "kind: Pod\nmetadata: {name: p}\nspec: {containers: {a: b}}\n",
            "spec.containers is a mapping, not a list",
        ),
        ("kind: Pod\nmetadata: {name: p}\nspec: {}\n", "spec has no containers"),
        (
            POD.replace("spec:\n", "spec:\n  volumes: [{name: inferlane-token, emptyDir: {}}]\n"),
            "has a volume 'inferlane-token' already",
        ),
    ],
)
def test_bad_input_names_the_document(text: str, message: str, opts: InjectOptions) -> None:
    result = inject_text(text, opts)
    assert result.text == ""
    assert any(message in error for error in result.errors), result.errors


def test_cli_prints_manifests_or_errors(
    opts: InjectOptions, inline: InjectOptions, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert inline.ca_pem is not None
    ca_file = tmp_path / "ca.crt"
    ca_file.write_text(inline.ca_pem)
    manifests = tmp_path / "app.yaml"
    manifests.write_text(WORKLOADS)
    assert main(["inject", "-f", str(manifests), "--ca-file", str(ca_file)]) == 0
    out, err = capsys.readouterr()
    assert out == injected(WORKLOADS, inline)
    assert "not injected: Pod apps/legacy" in err
    assert "no NetworkPolicy: Pod apps/listed" in err
    # No CA file needed: the sidecars mount the published root.
    assert main(["inject", "-f", str(manifests)]) == 0
    assert capsys.readouterr().out == injected(WORKLOADS, opts)

    manifests.write_text(POD + "---\n- not an object\n")
    assert main(["inject", "-f", str(manifests), "--ca-file", str(ca_file)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "document 2 (line 6) is a list" in err

    (tmp_path / "bad.crt").write_text("not a certificate")
    assert main(["inject", "-f", str(manifests), "--ca-file", str(tmp_path / "bad.crt")]) == 1
    assert "no PEM certificate" in capsys.readouterr().err
    for xds in ("no-port", "host:99999", "bad_host!:15012"):
        assert main(["inject", "-f", str(manifests), "--ca-file", str(ca_file), "--xds", xds]) == 1
        assert "inferlane inject:" in capsys.readouterr().err


def test_cli_reads_stdin_and_honours_options(
    inline: InjectOptions,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert inline.ca_pem is not None
    ca_file = tmp_path / "ca.crt"
    ca_file.write_text(inline.ca_pem)
    monkeypatch.setattr("sys.stdin", io.StringIO(POD))
    argv = ["inject", "-f", "-", "--ca-file", str(ca_file), "--xds", "cp.mesh.svc:443"]
    argv += ["--server-name", "istiod.mesh.svc", "--delta", "--image", "example.com/envoy:1"]
    assert main(argv) == 0
    (pod,) = load(capsys.readouterr().out)
    (sidecar,) = sidecars(pod)
    assert sidecar["image"] == "example.com/envoy:1"
    config = config_of(sidecar["args"])
    ads = config["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == "DELTA_GRPC"
    grpc_config = ads["grpc_services"][0]["google_grpc"]
    assert grpc_config["target_uri"] == "cp.mesh.svc:443"
    override = grpc_config["channel_args"]["args"]["grpc.ssl_target_name_override"]
    assert override == {"string_value": "istiod.mesh.svc"}

    monkeypatch.setattr("sys.stdin", io.StringIO(POD_WITH_LABELS))
    argv = ["inject", "-f", "-", "--ca-file", str(ca_file), "--xds", "10.0.0.5:15012"]
    assert main([*argv, "--control-plane-namespace", "mesh"]) == 0
    _pod, policy = load(capsys.readouterr().out)
    (peer,) = policy["spec"]["ingress"][1]["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "mesh"}
    monkeypatch.setattr("sys.stdin", io.StringIO(POD_WITH_LABELS))
    assert main([*argv, "--no-network-policy"]) == 0
    assert [o["kind"] for o in load(capsys.readouterr().out)] == ["Pod"]


# --- properties ----------------------------------------------------------------------------

_names = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
_values = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=20)


@st.composite
def _untouched_document(draw: st.DrawFn) -> str:
    data = draw(st.dictionaries(_names, _values, max_size=3))
    obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": draw(_names)}}
    if data:
        obj["data"] = data
    style = draw(st.sampled_from(["block", "flow", "commented"]))
    text = yaml.safe_dump(obj, default_flow_style=style == "flow")
    return f"# {draw(_names)}\n{text}" if style == "commented" else text


@st.composite
def _pod_document(draw: st.DrawFn) -> str:
    labels = draw(st.dictionaries(_names, _names, max_size=3))
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": draw(_names), "labels": labels},
        "spec": {"containers": [{"name": draw(_names), "image": "example.com/app:1"}]},
    }
    return yaml.safe_dump(pod)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.one_of(_untouched_document(), _pod_document()), min_size=1, max_size=6))
def test_streams_keep_others_and_inject_once(opts: InjectOptions, docs: list[str]) -> None:
    text = "---\n".join(docs)
    result = inject_text(text, opts)
    assert result.errors == ()
    assert len(result.injected) == sum(1 for d in docs if "kind: Pod" in d)
    for before, after in zip(
        split_documents(text), without_added_policies(result.text), strict=True
    ):
        if "kind: Pod" not in before.body:
            assert (after.separator, after.body) == (before.separator, before.body)
    assert inject_text(result.text, opts).text == result.text
    pods = [o for o in objects(load(result.text)) if o["kind"] == "Pod"]
    for pod in pods:
        assert len(sidecars(pod)) == 1
    # A policy for each Pod that has labels to select it by; the rest are named.
    labelled = sum(1 for pod in pods if pod["metadata"]["labels"])
    policies = [o for o in objects(load(result.text)) if o["kind"] == "NetworkPolicy"]
    assert len(policies) == labelled
    assert len(result.unprotected) == len(pods) - labelled


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(max_size=300))
def test_any_text_gives_output_or_errors_never_an_exception(opts: InjectOptions, text: str) -> None:
    result = inject_text(text, opts)
    assert not (result.errors and result.text)
    if not result.errors and not result.injected:
        assert result.text == text
