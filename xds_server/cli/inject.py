"""``inferlane inject``: add an Envoy sidecar to manifests, as ``istioctl kube-inject``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mesh.model import CLUSTER_DOMAIN
from xds_server.sidecar.inject import (
    DEFAULT_SERVER_NAME,
    DEFAULT_XDS_HOST,
    DEFAULT_XDS_PORT,
    ENVOY_IMAGE,
    InjectError,
    InjectOptions,
    check_host,
    inject_text,
    parse_host_port,
    read_ca,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``inferlane inject`` on the CLI's subparsers; returns its parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "inject",
        help="print manifests with an Envoy sidecar added to every Pod template",
        description=(
            "Add an Envoy sidecar to every Pod template (Pod, Deployment, StatefulSet, "
            "DaemonSet, ReplicaSet, Job, CronJob), bootstrapped to the control plane's "
            "TLS xDS port with a projected service-account token. Other documents are "
            "copied unchanged. Running it twice adds one sidecar."
        ),
    )
    parser.add_argument("-f", "--filename", required=True, help="manifests to read; - for stdin")
    parser.add_argument(
        "--ca-file",
        help="PEM CA root of the control plane (the CA Secret's ca.crt), inlined in each "
        "sidecar; by default the sidecar mounts the ConfigMap inferlane-ca-root-cert, which "
        "the control plane keeps in every mesh namespace",
    )
    parser.add_argument(
        "--xds",
        default=f"{DEFAULT_XDS_HOST}:{DEFAULT_XDS_PORT}",
        help="the control plane's TLS xDS address, HOST:PORT (default: %(default)s)",
    )
    parser.add_argument(
        "--server-name",
        default=DEFAULT_SERVER_NAME,
        help="name to check in the control plane's certificate (default: %(default)s)",
    )
    parser.add_argument("--image", default=ENVOY_IMAGE, help="Envoy image (default: %(default)s)")
    parser.add_argument("--delta", action="store_true", help="use Delta ADS")
    parser.add_argument(
        "--cluster-domain", default=CLUSTER_DOMAIN, help="DNS domain of the cluster"
    )
    parser.set_defaults(run=run)
    return parser


def _read_input(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    return Path(name).read_text(encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    """Run ``inferlane inject``: 0 with the manifests on stdout, 1 with errors on stderr."""
    try:
        host, port = parse_host_port(args.xds)
        check_host(args.server_name)
        check_host(args.cluster_domain)
        ca_pem = read_ca(Path(args.ca_file).read_bytes(), args.ca_file) if args.ca_file else None
        text = _read_input(args.filename)
    except (InjectError, OSError, UnicodeDecodeError) as exc:
        print(f"inferlane inject: {exc}", file=sys.stderr)
        return 1
    opts = InjectOptions(
        ca_pem=ca_pem,
        xds_host=host,
        xds_port=port,
        server_name=args.server_name,
        image=args.image,
        delta=args.delta,
        cluster_domain=args.cluster_domain,
    )
    result = inject_text(text, opts)
    if result.errors:
        for error in result.errors:
            print(f"inferlane inject: {args.filename}: {error}", file=sys.stderr)
        return 1
    for note in result.skipped:
        print(f"inferlane inject: not injected: {note}", file=sys.stderr)
    sys.stdout.write(result.text)
    return 0
