"""The ``inferlane`` command line (SPEC.md "Command line")."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from xds_server.bootstrap import (
    BootstrapError,
    BootstrapOptions,
    TlsSettings,
    bootstrap_yaml,
    parse_metadata,
)
from xds_server.debounce import DebounceSettings


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0-65535)")
    return value


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), _port(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferlane",
        description="An inference-aware xDS control plane for Envoy and Istio-style meshes.",
    )
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the control plane")
    src = serve.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifests", type=Path, help="a YAML file or directory, re-read on change")
    src.add_argument(
        "--kubernetes", action="store_true", help="watch the cluster (in-cluster or kubeconfig)"
    )
    serve.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--xds-port", type=_port, default=15010, help="plaintext xDS (0 = any)")
    serve.add_argument("--admin-port", type=_port, default=15014, help="admin HTTP (0 = any)")
    serve.add_argument("--ports-file", type=Path, help="write the bound ports here as JSON")
    serve.add_argument(
        "--debounce-quiet", type=float, default=0.1, help="seconds of quiet before a push"
    )
    serve.add_argument(
        "--debounce-max", type=float, default=1.0, help="longest seconds a push waits"
    )

    boot = sub.add_parser("bootstrap", help="print an Envoy bootstrap that subscribes by ADS")
    boot.add_argument("--node-id", required=True, help="TYPE~IP~POD.NS~NS.svc.cluster.local")
    boot.add_argument("--xds", type=_host_port, default=("127.0.0.1", 15010), help="HOST:PORT")
    boot.add_argument("--delta", action="store_true", help="use Delta ADS")
    boot.add_argument("--admin-port", type=_port, default=15000, help="Envoy's admin port")
    boot.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="node metadata (repeatable); a JSON value for LABELS",
    )
    boot.add_argument("--tls-ca", help="CA file: connect to the xDS port over TLS")
    boot.add_argument("--tls-cert", default="", help="client certificate file (with --tls-ca)")
    boot.add_argument("--tls-key", default="", help="client key file (with --tls-ca)")

    status = sub.add_parser("status", help="each proxy's sync state per xDS type")
    status.add_argument("--admin", default="http://127.0.0.1:15014", help="admin URL")
    return parser


def _bootstrap(args: argparse.Namespace) -> int:
    host, port = args.xds
    tls = TlsSettings(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None
    try:
        opts = BootstrapOptions(
            node_id=args.node_id,
            xds_host=host,
            xds_port=port,
            delta=args.delta,
            admin_port=args.admin_port,
            metadata=parse_metadata(args.metadata),
            tls=tls,
        )
        from mesh.proxy import NodeIdError, proxy_from_node

        proxy_from_node(opts.node_id, opts.metadata)
        sys.stdout.write(bootstrap_yaml(opts))
    except (BootstrapError, NodeIdError) as exc:
        print(f"inferlane bootstrap: {exc}", file=sys.stderr)
        return 2
    return 0


def _status(args: argparse.Namespace) -> int:
    from xds_server.status import fetch_syncz, format_status

    try:
        entries = fetch_syncz(args.admin)
    except OSError as exc:
        print(f"inferlane status: cannot reach {args.admin}: {exc}", file=sys.stderr)
        return 1
    print(format_status(entries))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from xds_server.app import ServeSettings, serve

    settings = ServeSettings(
        manifests=args.manifests,
        kubernetes=args.kubernetes,
        host=args.host,
        xds_port=args.xds_port,
        admin_port=args.admin_port,
        ports_file=args.ports_file,
        debounce=DebounceSettings(quiet=args.debounce_quiet, max_delay=args.debounce_max),
    )
    asyncio.run(serve(settings))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    commands = {"serve": _serve, "bootstrap": _bootstrap, "status": _status}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
