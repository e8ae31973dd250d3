"""``inferlane bootstrap``: print an Envoy bootstrap that subscribes by ADS."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from xds_server.cli import args
from xds_server.sidecar.bootstrap import (
    BootstrapError,
    BootstrapOptions,
    TlsSettings,
    bootstrap_yaml,
    parse_metadata,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    boot: argparse.ArgumentParser = subparsers.add_parser(
        "bootstrap", help="print an Envoy bootstrap that subscribes by ADS"
    )
    boot.add_argument("--node-id", required=True, help="TYPE~IP~POD.NS~NS.svc.cluster.local")
    boot.add_argument("--xds", type=args.host_port, default=("127.0.0.1", 15010), help="HOST:PORT")
    boot.add_argument("--delta", action="store_true", help="use Delta ADS")
    boot.add_argument("--admin-port", type=args.port, default=15000, help="Envoy's admin port")
    boot.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="node metadata (repeatable); a JSON value for LABELS",
    )
    boot.add_argument(
        "--tls-ca",
        help="CA file: connect over TLS (to 15011 with --tls-cert and --tls-key, to 15012 "
        "with --token-file)",
    )
    boot.add_argument("--tls-cert", default="", help="client certificate file (with --tls-ca)")
    boot.add_argument("--tls-key", default="", help="client key file (with --tls-ca)")
    boot.add_argument(
        "--tls-server-name",
        default="inferlane",
        help="name the control plane's certificate must carry (default inferlane)",
    )
    boot.add_argument(
        "--token-file",
        default="",
        help="service-account token (audience inferlane) to authenticate with (with --tls-ca)",
    )
    boot.set_defaults(run=run)
    return boot


def run(options: argparse.Namespace) -> int:
    from mesh.proxy import NodeIdError, proxy_from_node

    host, port = options.xds
    try:
        tls = None
        if options.tls_ca:
            token = Path(options.token_file).read_text().strip() if options.token_file else ""
            tls = TlsSettings(
                options.tls_ca,
                options.tls_cert,
                options.tls_key,
                server_name=options.tls_server_name,
                token=token,
            )
        elif options.tls_cert or options.tls_key or options.token_file:
            raise BootstrapError("--tls-cert, --tls-key and --token-file need --tls-ca")
        opts = BootstrapOptions(
            node_id=options.node_id,
            xds_host=host,
            xds_port=port,
            delta=options.delta,
            admin_port=options.admin_port,
            metadata=parse_metadata(options.metadata),
            tls=tls,
        )
        proxy_from_node(opts.node_id, opts.metadata)
        sys.stdout.write(bootstrap_yaml(opts))
    except (BootstrapError, NodeIdError, OSError) as exc:
        print(f"inferlane bootstrap: {exc}", file=sys.stderr)
        return 2
    return 0
