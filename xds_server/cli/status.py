"""``inferlane status``: each proxy's sync state per type, as ``istioctl proxy-status``."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from collections.abc import Sequence
from typing import Any

COLUMNS = ("CDS", "LDS", "EDS", "RDS", "SDS")
DEFAULT_ADMIN = "http://127.0.0.1:15014"


def fetch_syncz(admin_url: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    with urllib.request.urlopen(admin_url.rstrip("/") + "/debug/syncz", timeout=timeout) as r:
        data: list[dict[str, Any]] = json.loads(r.read())
    return data


def format_status(entries: Sequence[dict[str, Any]]) -> str:
    """A table of NAME, MODE and one status column per type, then the NACK messages."""
    rows = [("NAME", "MODE", *COLUMNS)]
    nacks: list[str] = []
    for entry in entries:
        kinds = entry.get("types", {})
        cells = []
        for col in COLUMNS:
            info = kinds.get(col)
            cells.append(info["status"] if info else "NOT SENT")
            if info and info.get("status") == "NACKED":
                nacks.append(f"{entry['node_id']} {col}: {info.get('last_nack', '')}")
        rows.append((entry["node_id"], entry.get("mode", ""), *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if nacks:
        lines += ["", "NACKs:", *(f"  {n}" for n in nacks)]
    return "\n".join(lines)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    status: argparse.ArgumentParser = subparsers.add_parser(
        "status", help="each proxy's sync state per xDS type"
    )
    status.add_argument("--admin", default=DEFAULT_ADMIN, help="admin URL")
    status.set_defaults(run=run)
    return status


def run(options: argparse.Namespace) -> int:
    try:
        entries = fetch_syncz(options.admin)
    except OSError as exc:
        print(f"inferlane status: cannot reach {options.admin}: {exc}", file=sys.stderr)
        return 1
    print(format_status(entries))
    return 0
