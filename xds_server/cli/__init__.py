"""The ``inferlane`` command line: one module per command.

Each command module has ``add_parser(subparsers)``, which registers its flags and sets
``run``, the function that carries it out and returns the exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from xds_server.cli import bootstrap, inject, serve, status

COMMANDS = (serve, bootstrap, inject, status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferlane",
        description="An inference-aware xDS control plane for Envoy and Istio-style meshes.",
    )
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code: int = options.run(options)
    return code


if __name__ == "__main__":
    sys.exit(main())
