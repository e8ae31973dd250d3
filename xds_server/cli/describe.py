"""``inferlane describe``: what inferlane gives a Service or pod, as ``istioctl x describe``.

It reads ``/debug/describe`` from a running control plane's admin API (so it works
through ``kubectl port-forward``) and prints it for people, or as JSON with ``-o json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from xds_server.cli.status import COLUMNS, DEFAULT_ADMIN

KINDS = ("service", "pod")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "describe",
        help="what inferlane gives a Service or pod, from a running control plane",
        description=(
            "Show the classes and clusters of a Service, each endpoint with GPU or fallback, "
            "its EDS priority and weight, the limits in force with the adaptive controller's "
            "state, who may send critical, and the sync state of the proxies involved."
        ),
    )
    parser.add_argument("kind", choices=KINDS, help="service or pod")
    parser.add_argument("name", metavar="NAME[.NAMESPACE]", help="e.g. llama.default")
    parser.add_argument("-n", "--namespace", help="namespace (default: from NAME, or default)")
    parser.add_argument("--admin", default=DEFAULT_ADMIN, help="admin URL (default: %(default)s)")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    parser.set_defaults(run=run)
    return parser


def split_name(kind: str, text: str, namespace: str | None) -> tuple[str, str]:
    """``NAME[.NS]`` -> (namespace, name). A Service name has no dots, so a Service splits
    at the first dot; a pod name may have some, so a pod splits at the last one."""
    if namespace:
        return namespace, text
    if kind == "service":
        name, dot, ns = text.partition(".")
    else:
        name, dot, ns = text.rpartition(".")
        if not dot:
            name = ns
    return (ns if dot and ns else "default"), name


def fetch(admin: str, kind: str, namespace: str, name: str, timeout: float = 5.0) -> Any:
    """The page's JSON; an HTTP error's own message becomes the ``LookupError``."""
    query = urllib.parse.urlencode({kind: f"{namespace}/{name}"})
    url = f"{admin.rstrip('/')}/debug/describe?{query}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise LookupError(message) from None


# --- text -------------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _budgets(budgets: list[dict[str, Any]]) -> str:
    windows = {1: "s", 60: "m", 3600: "h"}
    return (
        ", ".join(f"{b['budget']}={b['tokens']}/{windows[b['window_s']]}" for b in budgets)
        or "none"
    )


def _rates(rates: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}/s" for k, v in rates.items()) or "none"


def _endpoint_rows(endpoints: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    rows = [["ADDRESS", "POD", "TIER", "EDS PRIORITY", "WEIGHT", "VIA"]]
    for e in endpoints:
        rows.append(
            [
                e["address"],
                e["pod"] or "-",
                e["tier"],
                str(e["eds_priority"]),
                f"{e['weight']} (locality {e['locality_weight']})",
                "sidecar (mTLS)" if e["via_sidecar"] else "direct",
            ]
        )
    return rows


def _class_lines(port: Mapping[str, Any]) -> list[str]:
    rows = [["CLASS", "CLUSTER", "TIMEOUT", "MAX REQUESTS (DEFAULT / HIGH)"]]
    for cls in port["classes"]:
        breakers = cls["circuit_breakers"]
        limits = " / ".join(
            str(breakers.get(p, {}).get("max_requests", "-")) for p in ("DEFAULT", "HIGH")
        )
        rows.append([cls["class"], cls["cluster"], f"{cls['timeout_s']:g}s", limits])
    lines = _table(rows)
    endpoint_sets = [cls["endpoints"] for cls in port["classes"]]
    if all(e == endpoint_sets[0] for e in endpoint_sets):
        lines += ["  Endpoints (every class):", *_table(_endpoint_rows(endpoint_sets[0]), "    ")]
    else:
        for cls in port["classes"]:
            lines += [f"  Endpoints of {cls['class']}:"]
            lines += _table(_endpoint_rows(cls["endpoints"]), "    ")
    for e in port["excluded"]:
        lines.append(f"  Not served: {e['address']} ({e['pod'] or '-'}): {e['reason']}")
    return lines


def _adaptive_lines(states: Iterable[Mapping[str, Any]]) -> list[str]:
    lines = []
    for state in states:
        reason = state.get("last_change_reason") or "no change yet"
        multipliers = ", ".join(f"{k} x{v:g}" for k, v in state.get("multipliers", {}).items())
        lines.append(
            f"    {state['endpoint']}: {state.get('regime', '-')}, {multipliers or 'x1'}; "
            f"last change: {reason}"
        )
    return lines


def _proxy_lines(proxies: Sequence[Mapping[str, Any]]) -> list[str]:
    if not proxies:
        return ["  none connected"]
    rows = [["NODE", "MODE", *COLUMNS]]
    for p in proxies:
        kinds = p["types"]
        rows.append(
            [
                p["node_id"],
                p["mode"],
                *(kinds[c]["status"] if c in kinds else "NOT SENT" for c in COLUMNS),
            ]
        )
    return _table(rows)


def _callers_line(callers: Mapping[str, Any]) -> str:
    if not callers["clamped"]:
        return "  anyone (the Service names no critical callers)"
    pods = ", ".join(callers["pods"]) or "no pod runs as them"
    more = f" and {callers['more_pods']} more" if callers["more_pods"] else ""
    return f"  {', '.join(callers['entries'])}; pods: {pods}{more}"


def format_service(view: Mapping[str, Any]) -> str:
    limits = view["limits"]
    lines = [
        f"Service: {view['service']} ({view['hostname']})",
        f"  default class {view['default_class']}, mtls {view['mtls']}",
    ]
    lines += [f"  annotation error: {e}" for e in view["annotation_errors"]]
    for port in view["ports"]:
        lines += ["", f"Port {port['port']}{' (' + port['name'] + ')' if port['name'] else ''}:"]
        lines += _class_lines(port)
    lines += [
        "",
        "Limits:",
        f"  rate-limit per endpoint: {_rates(limits['rate_limit'])}",
        f"  global rate-limit per caller: {_rates(limits['global_rate_limit'])}",
        f"  max-concurrency per endpoint: {limits['max_concurrency'] or 'none'}",
        f"  token budgets per caller: {_budgets(limits.get('token_budgets', []))}",
        f"  adaptive: {'on' if limits['adaptive'] else 'off'}",
    ]
    for endpoint in limits["endpoints"]:
        lines.append(f"    {endpoint['endpoint']} enforces {_rates(endpoint['rates'])}")
    if limits["adaptive_state"]:
        lines += ["  adaptive controller:", *_adaptive_lines(limits["adaptive_state"])]
    lines += ["", "May send critical:", _callers_line(view["critical_callers"])]
    lines += ["", "Proxies of its endpoints:", *_proxy_lines(view["proxies"])]
    return "\n".join(lines)


def format_pod(view: Mapping[str, Any]) -> str:
    lines = [f"Pod: {view['pod']}"]
    if view["in_world"]:
        sidecar = "declared" if view["sidecar_declared"] else "not declared"
        lines.append(
            f"  service account {view['service_account']}, IP {view['ip'] or '-'}, node "
            f"{view['node'] or '-'}, {'GPU-backed' if view['gpu'] else 'no GPU'}, "
            f"{'ready' if view['ready'] else 'not ready'}, sidecar {sidecar}"
        )
    else:
        lines.append("  not in the world (a proxy is connected under this pod's name)")
    for backed in view["backs"]:
        lines += ["", f"Backs {backed['service']}:"]
        for port in backed["ports"]:
            lines += [f"  port {port['port']}:"]
            for cls in port["classes"]:
                for e in cls["endpoints"]:
                    lines.append(
                        f"    {cls['class']}: {e['address']} {e['tier']}, EDS priority "
                        f"{e['eds_priority']}, weight {e['weight']}, "
                        f"{'via its sidecar (mTLS)' if e['via_sidecar'] else 'direct'}"
                    )
            lines += [f"    not served: {e['reason']}" for e in port["excluded"]]
        for limit in backed["limits"]:
            lines.append(f"  enforces {_rates(limit['rates'])}")
        if backed["adaptive_state"]:
            lines += ["  adaptive controller:", *_adaptive_lines(backed["adaptive_state"])]
    critical = view["critical"]
    if critical is not None:
        lines += ["", "As a caller:"]
        lines.append(f"  may send critical to: {', '.join(critical['allowed']) or '-'}")
        lowered = ", ".join(critical["lowered_to_standard"]) or "-"
        lines.append(f"  critical lowered to standard at: {lowered}")
        lines.append("  (every other Service names no critical callers: critical is allowed)")
    lines += ["", "Its proxy:", *_proxy_lines(view["proxies"])]
    return "\n".join(lines)


def run(options: argparse.Namespace) -> int:
    namespace, name = split_name(options.kind, options.name, options.namespace)
    try:
        view = fetch(options.admin, options.kind, namespace, name)
    except LookupError as exc:
        print(f"inferlane describe: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"inferlane describe: cannot reach {options.admin}: {exc}", file=sys.stderr)
        return 1
    if options.output == "json":
        print(json.dumps(view, indent=2))
    else:
        print(format_service(view) if options.kind == "service" else format_pod(view))
    return 0
