"""``inferlane analyze``: report what will not work, as ``istioctl analyze`` does.

The world is read the way ``inferlane serve`` reads it (manifest files, or the cluster's
list/watch source until every resource has been listed once) and handed to the pure
analyzer, :func:`mesh.analyze.analyze`. Exit status: 0 without errors (warnings
allowed), 1 with errors, 2 when nothing could be analyzed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

from mesh.analyze import Finding, Severity, analyze, summary
from mesh.model import World

EXIT_ERRORS = 1
EXIT_UNANALYZED = 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "analyze",
        help="report what will not work in manifests or a cluster, as istioctl analyze",
        description=(
            "Read manifests (as inferlane serve --manifests does) or the cluster, and report "
            "each problem with a code, the object and how to fix it. Exit status 0 when there "
            "are no errors, 1 when there are, 2 when the input could not be read at all."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "-f", "--filename", type=Path, help="a manifest file or directory (kubectl get -o yaml)"
    )
    source.add_argument(
        "--kubernetes", action="store_true", help="the cluster (in-cluster, or the kubeconfig)"
    )
    parser.add_argument(
        "-o", "--output", choices=("text", "json"), default="text", help="output format"
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file (with --kubernetes)")
    parser.add_argument("--context", help="kubeconfig context (with --kubernetes)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long listing the cluster may take (default: %(default)s)",
    )
    parser.set_defaults(run=run)
    return parser


async def cluster_world(kubeconfig: str | None, context: str | None) -> World:
    """The cluster's World, once every resource has been listed: the serving source.

    Bound the wait with ``asyncio.timeout`` around the call: the source retries errors.
    """
    from mesh.kube import KubernetesSource, new_api_client
    from mesh.sources import first_world

    async def api() -> Any:
        return await new_api_client(kubeconfig=kubeconfig, context=context)

    return await first_world(KubernetesSource(api, post_events=False))


async def _bounded(coro: Awaitable[World], seconds: float) -> World:
    async with asyncio.timeout(seconds):
        return await coro


def format_text(findings: Sequence[Finding], services: int) -> str:
    if not findings:
        return f"No problems found in {services} inference Services."
    lines = []
    for f in findings:
        lines.append(f"{f.severity.value} [{f.code}] ({f.object}) {f.message}")
        lines.append(f"    fix: {f.fix}")
    counts = summary(findings)
    lines.append(f"{counts['errors']} errors, {counts['warnings']} warnings.")
    return "\n".join(lines)


def format_json(findings: Sequence[Finding], services: int) -> str:
    body = {
        "services": services,
        **summary(findings),
        "findings": [f.to_dict() for f in findings],
    }
    return json.dumps(body, indent=2)


def run(options: argparse.Namespace) -> int:
    try:
        if options.kubernetes:
            listing = cluster_world(options.kubeconfig, options.context)
            world = asyncio.run(_bounded(listing, options.timeout))
        else:
            from mesh.manifests import load_world

            world = load_world(options.filename)
    except TimeoutError:
        print(
            f"inferlane analyze: the cluster was not listed within {options.timeout:g} s",
            file=sys.stderr,
        )
        return EXIT_UNANALYZED
    except Exception as exc:  # kubeconfig missing, API refused: say so, no traceback
        print(f"inferlane analyze: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_UNANALYZED
    findings = analyze(world)
    render = format_json if options.output == "json" else format_text
    print(render(findings, len(world.services)))
    return EXIT_ERRORS if any(f.severity is Severity.ERROR for f in findings) else 0
