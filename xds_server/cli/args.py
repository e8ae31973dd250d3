"""Argument types the commands share: each turns a bad value into a clear usage error."""

from __future__ import annotations

import argparse
from datetime import timedelta

from xds_server.auth.settings import IpNetwork, parse_networks


def port(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0-65535)")
    return value


def port_or_off(text: str) -> int | None:
    """A TCP port as :func:`port`, or ``off`` (None): serve nothing there."""
    if text.strip().lower() == "off":
        return None
    try:
        return port(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535) or 'off'") from None


def networks(text: str) -> tuple[IpNetwork, ...]:
    parsed = parse_networks(text)
    if isinstance(parsed, str):
        raise argparse.ArgumentTypeError(parsed)
    return parsed


def lifetime(text: str) -> timedelta:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} seconds: a lifetime must be positive")
    return timedelta(seconds=value)


def trust_domain(text: str) -> str:
    from mtls.ca import BadIdentity, spiffe_id

    try:
        spiffe_id(text, "default", "default")
    except BadIdentity as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names; empty items are dropped."""
    return tuple(n.strip() for n in text.split(",") if n.strip())


def host_port(text: str) -> tuple[str, int]:
    host, sep, number = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), port(number)


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    return _at_least(text, 1)


def non_negative_int(text: str) -> int:
    """A whole number of at least 0."""
    return _at_least(text, 0)


def _at_least(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"{value}: must be at least {lowest}")
    return value
