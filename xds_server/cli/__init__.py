"""The ``inferlane`` command line: one module per command.

Each command module has ``add_parser(subparsers)``, which registers its flags and sets
``run``, the function that carries it out and returns the exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from xds_server.cli import analyze, bootstrap, describe, inject, serve, status
from xds_server.cli.logs import LOG_FORMATS, configure_logging

COMMANDS = (serve, bootstrap, inject, status, analyze, describe)

LOG_LEVELS = ("debug", "info", "warning", "error")


def _add_logging_flags(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """``--log-level`` and ``--log-format``, before or after the command's name.

    The subcommands' copies default to SUPPRESS, so a flag given after the command name
    overrides the one given before it, and one not given there leaves it alone.
    """
    group = parser.add_argument_group("logging")
    group.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default="info" if defaults else argparse.SUPPRESS,
        help="debug, info, warning or error (default: info)",
    )
    group.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text" if defaults else argparse.SUPPRESS,
        help="text, or json: one JSON object per line (default: text)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferlane",
        description="An inference-aware xDS control plane for Envoy and Istio-style meshes.",
    )
    _add_logging_flags(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        _add_logging_flags(command.add_parser(sub), defaults=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    configure_logging(options.log_level, options.log_format)
    code: int = options.run(options)
    return code


if __name__ == "__main__":
    sys.exit(main())
