"""Envoy for tests: bench.envoy's runner, skipping when no envoy binary is installed (a failure
in CI: tests/conftest.py)."""

from __future__ import annotations

import pytest

from bench.envoy import Envoy, EnvoyMissing, envoy_binary, running_envoy

__all__ = ["Envoy", "envoy_binary", "require_envoy", "running_envoy"]


def require_envoy() -> str:
    try:
        return envoy_binary()
    except EnvoyMissing as exc:
        pytest.skip(str(exc))
