"""``inferlane bootstrap`` over TLS, and the security flags of ``inferlane serve``."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.envoy import envoy_binary
from mtls.ca import CertificateAuthority
from xds_server.cli import build_parser, main
from xds_server.sidecar.bootstrap import (
    XDS_CLUSTER,
    BootstrapError,
    BootstrapOptions,
    TlsSettings,
    bootstrap,
    bootstrap_yaml,
)

NODE = "sidecar~10.0.0.1~chat-0.default~default.svc.cluster.local"


def _xds_cluster(config: dict[str, Any]) -> dict[str, Any]:
    [cluster] = config["static_resources"]["clusters"]
    assert cluster["name"] == XDS_CLUSTER
    return dict(cluster)


def _grpc_service(config: dict[str, Any]) -> dict[str, Any]:
    [service] = config["dynamic_resources"]["ads_config"]["grpc_services"]
    return dict(service)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Files a proxy would have: the mesh root, a client certificate and key, a token."""
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.generate()
    issued = ca.issue_workload("cluster.local", "default", "chat")
    files = {
        "root": ca.trust_bundle_pem,
        "cert": issued.chain_pem,
        "key": issued.key_pem,
        "token": b"eyJhbGciOi.token.sig\n",
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return {name: str(directory / name) for name in files}


def test_tls_with_a_client_certificate(pki: dict[str, str]) -> None:
    tls = TlsSettings(pki["root"], pki["cert"], pki["key"])
    config = bootstrap(BootstrapOptions(node_id=NODE, xds_port=15012, tls=tls))
    socket = _xds_cluster(config)["transport_socket"]["typed_config"]
    assert socket["sni"] == "inferlane"
    validation = socket["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": pki["root"]}
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "inferlane"}}
    ]
    [pair] = socket["common_tls_context"]["tls_certificates"]
    assert pair["certificate_chain"] == {"filename": pki["cert"]}
    assert "initial_metadata" not in _grpc_service(config)


def test_tls_with_a_token_and_a_source_address(pki: dict[str, str]) -> None:
    tls = TlsSettings(pki["root"], token="abc", server_name="cp.example")
    opts = BootstrapOptions(node_id=NODE, xds_port=15012, tls=tls, xds_source_address="10.0.0.1")
    config = bootstrap(opts)
    assert _grpc_service(config)["initial_metadata"] == [
        {"key": "authorization", "value": "Bearer abc"}
    ]
    cluster = _xds_cluster(config)
    assert cluster["upstream_bind_config"]["source_address"]["address"] == "10.0.0.1"
    socket = cluster["transport_socket"]["typed_config"]
    assert "tls_certificates" not in socket["common_tls_context"]
    assert socket["sni"] == "cp.example"


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        (TlsSettings("root"), "client certificate and key, or a service-account token"),
        (TlsSettings("root", "cert"), "both its certificate and key"),
        (TlsSettings("", token="t"), "root CA"),
        (TlsSettings("root", token="a\nb"), "single line"),
    ],
)
def test_tls_mistakes_are_named(tls: TlsSettings, message: str) -> None:
    with pytest.raises(BootstrapError, match=message):
        bootstrap(BootstrapOptions(node_id=NODE, tls=tls))


@pytest.mark.envoy
def test_envoy_accepts_both_tls_bootstraps(pki: dict[str, str], tmp_path: Path) -> None:
    try:
        envoy = envoy_binary()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    for name, tls in (
        ("cert", TlsSettings(pki["root"], pki["cert"], pki["key"])),
        ("token", TlsSettings(pki["root"], token="abc")),
    ):
        path = tmp_path / f"{name}.yaml"
        path.write_text(bootstrap_yaml(BootstrapOptions(node_id=NODE, xds_port=15012, tls=tls)))
        result = subprocess.run(
            [envoy, "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_bootstrap_command_reads_the_token_file(
    pki: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bootstrap", "--node-id", NODE, "--xds", "cp:15012", "--tls-ca", pki["root"]]
    assert main([*argv, "--token-file", pki["token"]]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert _grpc_service(config)["initial_metadata"][0]["value"] == ("Bearer eyJhbGciOi.token.sig")
    assert main([*argv, "--token-file", pki["token"] + ".missing"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["bootstrap", "--node-id", NODE, "--tls-cert", pki["cert"]]) == 2
    assert "need --tls-ca" in capsys.readouterr().err


def test_serve_security_flags() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--manifests",
            "cluster.yaml",
            "--trust-domain",
            "example.org",
            "--ca-dir",
            "/var/lib/inferlane/ca",
            "--cert-ttl",
            "3600",
            "--plaintext-secrets-from",
            "10.0.0.0/8,::1",
            "--xds-tls-names",
            "inferlane.mesh.svc,10.1.2.3",
        ]
    )
    assert args.xds_tls_port == 15012
    assert args.trust_domain == "example.org"
    assert args.ca_dir == Path("/var/lib/inferlane/ca")
    assert args.cert_ttl == timedelta(hours=1)
    assert [str(n) for n in args.plaintext_secrets_from] == ["10.0.0.0/8", "::1/128"]
    assert args.xds_tls_names == ("inferlane.mesh.svc", "10.1.2.3")
    defaults = build_parser().parse_args(["serve", "--kubernetes"])
    assert [str(n) for n in defaults.plaintext_secrets_from] == ["127.0.0.1/32", "::1/128"]
    assert defaults.cert_ttl == timedelta(hours=24) and defaults.ca_secret is None


@pytest.mark.parametrize(
    "flags",
    [
        ["--plaintext-secrets-from", "everyone"],
        ["--cert-ttl", "0"],
        ["--cert-ttl", "soon"],
        ["--trust-domain", "Bad Domain"],
        ["--ca-dir", "/x", "--ca-secret", "ca"],
    ],
)
def test_bad_serve_flags_are_refused(flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--kubernetes", *flags])
    assert exc.value.code == 2
