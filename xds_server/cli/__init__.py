"""The ``inferlane`` command line (SPEC.md "Command line")."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from xds_server.ads.debounce import DebounceSettings
from xds_server.auth.settings import (
    DEFAULT_PLAINTEXT_SECRETS_FROM,
    DEFAULT_SERVER_NAMES,
    IpNetwork,
    SecuritySettings,
    parse_networks,
)
from xds_server.sidecar.bootstrap import (
    BootstrapError,
    BootstrapOptions,
    TlsSettings,
    bootstrap_yaml,
    parse_metadata,
)
from xds_server.sidecar.inject import add_inject_parser, run_inject


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0-65535)")
    return value


def _networks(text: str) -> tuple[IpNetwork, ...]:
    parsed = parse_networks(text)
    if isinstance(parsed, str):
        raise argparse.ArgumentTypeError(parsed)
    return parsed


def _seconds(text: str) -> timedelta:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} seconds: a lifetime must be positive")
    return timedelta(seconds=value)


def _trust_domain(text: str) -> str:
    from mtls.ca import BadIdentity, spiffe_id

    try:
        spiffe_id(text, "default", "default")
    except BadIdentity as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


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
    serve.add_argument(
        "--xds-tls-port", type=_port, default=15012, help="xDS over TLS, authenticated (0 = any)"
    )
    serve.add_argument("--admin-port", type=_port, default=15014, help="admin HTTP (0 = any)")
    serve.add_argument("--ports-file", type=Path, help="write the bound ports here as JSON")
    serve.add_argument(
        "--debounce-quiet", type=float, default=0.1, help="seconds of quiet before a push"
    )
    serve.add_argument(
        "--debounce-max", type=float, default=1.0, help="longest seconds a push waits"
    )
    sec = serve.add_argument_group("mesh security")
    sec.add_argument(
        "--trust-domain",
        type=_trust_domain,
        default="cluster.local",
        help="SPIFFE trust domain of workload identities (default cluster.local)",
    )
    ca = sec.add_mutually_exclusive_group()
    ca.add_argument(
        "--ca-dir", type=Path, help="keep the CA here (tls.crt, tls.key, ca.crt); made if absent"
    )
    ca.add_argument(
        "--ca-secret",
        metavar="[NAMESPACE/]NAME",
        help="share the CA through this Kubernetes Secret (cert-manager's form); made if absent",
    )
    sec.add_argument(
        "--cert-ttl",
        type=_seconds,
        default=timedelta(hours=24),
        metavar="SECONDS",
        help="workload certificate lifetime (default 86400); renewed at half of it",
    )
    sec.add_argument(
        "--plaintext-secrets-from",
        type=_networks,
        default=_networks(",".join(DEFAULT_PLAINTEXT_SECRETS_FROM)),
        metavar="CIDR[,CIDR...]",
        help="peers of the plaintext xDS port that get secrets (default: this host only)",
    )
    sec.add_argument(
        "--xds-tls-names",
        type=_names,
        default=(),
        metavar="NAME[,NAME...]",
        help="extra DNS names or IPs for the TLS port's certificate "
        f"(always: {', '.join(DEFAULT_SERVER_NAMES)})",
    )
    limits = serve.add_argument_group("rate limits")
    limits.add_argument(
        "--rls-port",
        type=_port,
        default=8081,
        help="global rate-limit service, envoy.service.ratelimit.v3 (0 = any; default 8081)",
    )
    limits.add_argument(
        "--rls-address",
        default="",
        metavar="HOST",
        help="where proxies reach the rate-limit service (default: --host, or 127.0.0.1 "
        "when that is a wildcard; in a cluster, this Service's DNS name)",
    )
    limits.add_argument(
        "--redis",
        metavar="URL",
        help="keep global counters in this Redis (redis://HOST:PORT/DB or unix:///PATH), "
        "shared by every replica; default: in this process",
    )
    limits.add_argument(
        "--rate-limit-failure-mode",
        choices=("open", "closed"),
        default="open",
        help="when Redis or the service is unreachable: admit (open, default) or refuse",
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
    boot.add_argument("--tls-ca", help="CA file: connect to the xDS TLS port (15012)")
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

    add_inject_parser(sub)
    demo = sub.add_parser(
        "demo",
        help="the end-to-end demonstration on this machine (inferlane demo --help)",
        add_help=False,
    )
    del demo  # its arguments are bench.demo's own; main() hands them over unparsed
    status = sub.add_parser("status", help="each proxy's sync state per xDS type")
    status.add_argument("--admin", default="http://127.0.0.1:15014", help="admin URL")
    return parser


def _bootstrap(args: argparse.Namespace) -> int:
    from mesh.proxy import NodeIdError, proxy_from_node

    host, port = args.xds
    try:
        tls = None
        if args.tls_ca:
            token = Path(args.token_file).read_text().strip() if args.token_file else ""
            tls = TlsSettings(
                args.tls_ca,
                args.tls_cert,
                args.tls_key,
                server_name=args.tls_server_name,
                token=token,
            )
        elif args.tls_cert or args.tls_key or args.token_file:
            raise BootstrapError("--tls-cert, --tls-key and --token-file need --tls-ca")
        opts = BootstrapOptions(
            node_id=args.node_id,
            xds_host=host,
            xds_port=port,
            delta=args.delta,
            admin_port=args.admin_port,
            metadata=parse_metadata(args.metadata),
            tls=tls,
        )
        proxy_from_node(opts.node_id, opts.metadata)
        sys.stdout.write(bootstrap_yaml(opts))
    except (BootstrapError, NodeIdError, OSError) as exc:
        print(f"inferlane bootstrap: {exc}", file=sys.stderr)
        return 2
    return 0


def _status(args: argparse.Namespace) -> int:
    from xds_server.cli.status import fetch_syncz, format_status

    try:
        entries = fetch_syncz(args.admin)
    except OSError as exc:
        print(f"inferlane status: cannot reach {args.admin}: {exc}", file=sys.stderr)
        return 1
    print(format_status(entries))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from mtls.ca import MtlsError
    from ratelimit.counters import FailureMode
    from xds_server.app import ServeSettings, serve
    from xds_server.rls.runtime import RateLimitSettings

    settings = ServeSettings(
        manifests=args.manifests,
        kubernetes=args.kubernetes,
        host=args.host,
        xds_port=args.xds_port,
        xds_tls_port=args.xds_tls_port,
        admin_port=args.admin_port,
        ports_file=args.ports_file,
        debounce=DebounceSettings(quiet=args.debounce_quiet, max_delay=args.debounce_max),
        security=SecuritySettings(
            trust_domain=args.trust_domain,
            ca_dir=args.ca_dir,
            ca_secret=args.ca_secret,
            cert_ttl=args.cert_ttl,
            plaintext_secrets_from=args.plaintext_secrets_from,
            server_names=(*DEFAULT_SERVER_NAMES, *args.xds_tls_names),
        ),
        ratelimit=RateLimitSettings(
            rls_port=args.rls_port,
            rls_address=args.rls_address,
            redis_url=args.redis or None,
            failure_mode=FailureMode(args.rate_limit_failure_mode),
        ),
    )
    try:
        asyncio.run(serve(settings))
    except MtlsError as exc:
        print(f"inferlane serve: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from bench.demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    commands = {
        "serve": _serve,
        "bootstrap": _bootstrap,
        "status": _status,
        "inject": run_inject,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
