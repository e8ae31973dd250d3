"""``inferlane serve``: run the control plane on manifests or a cluster."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from mtls.identity import DEFAULT_TRUST_DOMAIN
from xds_server.ads import collector
from xds_server.ads.debounce import DebounceSettings
from xds_server.auth.settings import DEFAULT_PLAINTEXT_SECRETS_FROM, DEFAULT_SERVER_NAMES
from xds_server.cli import args

#: The environment variable ``--redis`` defaults to (the chart sets it from a Secret).
REDIS_URL_ENV = "INFERLANE_REDIS_URL"


def default_workers() -> int:
    """The cores this process may use: its CPU affinity (a container's cpuset), lowered to
    its cgroup's CPU quota (a container's CPU limit), as Go's automaxprocs does."""
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup's quota (v2 ``cpu.max``, or v1 CFS), or None."""
    try:
        quota, _, period = (root / "cpu.max").read_text().partition(" ")
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    serve: argparse.ArgumentParser = subparsers.add_parser("serve", help="run the control plane")
    src = serve.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifests", type=Path, help="a YAML file or directory, re-read on change")
    src.add_argument(
        "--kubernetes", action="store_true", help="watch the cluster (in-cluster or kubeconfig)"
    )
    serve.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--xds-port", type=args.port, default=15010, help="plaintext xDS (0 = any)")
    serve.add_argument(
        "--xds-tls-port",
        type=args.port_or_off,
        default=15012,
        help="xDS over TLS, authenticated by service-account tokens (0 = any, off = none)",
    )
    serve.add_argument(
        "--xds-mtls-port",
        type=args.port_or_off,
        default=15011,
        help="xDS over mutual TLS, authenticated by mesh certificates (0 = any, off = none)",
    )
    serve.add_argument("--admin-port", type=args.port, default=15014, help="admin HTTP (0 = any)")
    serve.add_argument("--ports-file", type=Path, help="write the bound ports here as JSON")
    serve.add_argument(
        "--workers",
        type=args.positive_int,
        default=default_workers(),
        help="processes serving the plaintext xDS port's streams (default: the cores "
        "this process may use); one process translates for all of them",
    )
    serve.add_argument(
        "--gc-threshold",
        type=args.non_negative_int,
        default=collector.DEFAULT_THRESHOLD,
        help="objects allocated between the garbage collector's young collections, in "
        "every process (0: Python's default of 700, with more frequent full collections)",
    )
    serve.add_argument(
        "--debounce-quiet", type=float, default=0.1, help="seconds of quiet before a push"
    )
    serve.add_argument(
        "--debounce-max", type=float, default=1.0, help="longest seconds a push waits"
    )
    sec = serve.add_argument_group("mesh security")
    sec.add_argument(
        "--trust-domain",
        type=args.trust_domain,
        default=DEFAULT_TRUST_DOMAIN,
        help=f"SPIFFE trust domain of workload identities (default {DEFAULT_TRUST_DOMAIN})",
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
        type=args.lifetime,
        default=timedelta(hours=24),
        metavar="SECONDS",
        help="workload certificate lifetime (default 86400); renewed at half of it",
    )
    sec.add_argument(
        "--plaintext-secrets-from",
        type=args.networks,
        default=args.networks(",".join(DEFAULT_PLAINTEXT_SECRETS_FROM)),
        metavar="CIDR[,CIDR...]",
        help="peers of the plaintext xDS port that get secrets (default: this host only)",
    )
    sec.add_argument(
        "--xds-tls-names",
        type=args.names,
        default=(),
        metavar="NAME[,NAME...]",
        help="extra DNS names or IPs for the certificate of the TLS ports and the "
        f"rate-limit service (always: {', '.join(DEFAULT_SERVER_NAMES)})",
    )
    limits = serve.add_argument_group("rate limits")
    limits.add_argument(
        "--rls-port",
        type=args.port_or_off,
        default=8081,
        help="global rate-limit service, envoy.service.ratelimit.v3, over mutual TLS "
        "(0 = any, off = none: global-rate-limit annotations then have no effect; default 8081)",
    )
    limits.add_argument(
        "--rls-address",
        default="",
        metavar="HOST",
        help="where proxies reach the rate-limit service (default: --host, or 127.0.0.1 "
        "when that is a wildcard; in a cluster, this Service's DNS name). Proxies check "
        "that its certificate carries the name inferlane",
    )
    limits.add_argument(
        "--redis",
        metavar="URL",
        default=os.environ.get(REDIS_URL_ENV) or None,
        help="keep global counters in this Redis (redis://HOST:PORT/DB or unix:///PATH), "
        f"shared by every replica (default: ${REDIS_URL_ENV}, which keeps a password out of "
        "the arguments; without either, in this process)",
    )
    limits.add_argument(
        "--rate-limit-failure-mode",
        choices=("open", "closed"),
        default="open",
        help="when Redis or the service is unreachable: admit (open, default) or refuse",
    )
    limits.add_argument(
        "--queue-weights",
        action="store_true",
        help="weigh each GPU-backed endpoint by its queue (vllm:num_requests_waiting, "
        "scraped every second) in every caller's EDS; default: least request alone",
    )
    limits.add_argument(
        "--token-budget-mode",
        choices=("reserve", "charge-at-end"),
        default="reserve",
        help="charge token budgets by reserving each request's worst case and settling on "
        "its usage (reserve, default), or by charging the usage at the end only "
        "(charge-at-end: Envoy AI Gateway's method, which overshoots; for comparison)",
    )
    serve.set_defaults(run=run)
    return serve


def run(options: argparse.Namespace) -> int:
    from mtls.ca import MtlsError
    from ratelimit.counters import FailureMode
    from ratelimit.tokens import TokenBudgetMode
    from xds_server.app import ServeSettings, serve
    from xds_server.auth.settings import SecuritySettings
    from xds_server.rls.runtime import RateLimitSettings

    settings = ServeSettings(
        manifests=options.manifests,
        kubernetes=options.kubernetes,
        host=options.host,
        xds_port=options.xds_port,
        xds_tls_port=options.xds_tls_port,
        xds_mtls_port=options.xds_mtls_port,
        admin_port=options.admin_port,
        ports_file=options.ports_file,
        workers=options.workers,
        gc_threshold=options.gc_threshold,
        debounce=DebounceSettings(quiet=options.debounce_quiet, max_delay=options.debounce_max),
        security=SecuritySettings(
            trust_domain=options.trust_domain,
            ca_dir=options.ca_dir,
            ca_secret=options.ca_secret,
            cert_ttl=options.cert_ttl,
            plaintext_secrets_from=options.plaintext_secrets_from,
            server_names=(*DEFAULT_SERVER_NAMES, *options.xds_tls_names),
        ),
        ratelimit=RateLimitSettings(
            rls_port=options.rls_port,
            rls_address=options.rls_address,
            redis_url=options.redis or None,
            failure_mode=FailureMode(options.rate_limit_failure_mode),
            queue_weights=options.queue_weights,
            token_budget_mode=TokenBudgetMode(options.token_budget_mode),
        ),
    )
    try:
        asyncio.run(serve(settings))
    except MtlsError as exc:
        print(f"inferlane serve: {exc}", file=sys.stderr)
        return 1
    return 0
