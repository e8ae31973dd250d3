"""Rules for the whole suite.

In CI the end-to-end suites must run, not pass by being skipped: when ``CI`` or
``INFERLANE_REQUIRE_ENVOY`` is set (``.ci/run`` sets the latter; most CI services set the
former), a test marked ``envoy`` that skips (no ``envoy`` binary, say) fails instead. On a
developer's machine without Envoy those tests still skip.

Property tests explore new examples on every run on a developer's machine, and replay the
same ones in CI (Hypothesis's ``derandomize``), so that whether a submission lands does
not depend on the draw; an example found locally is added with ``@example``.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest
from hypothesis import settings

#: Environment variables that make a skipped Envoy test a failure.
REQUIRE_ENVOY_ENV = ("CI", "INFERLANE_REQUIRE_ENVOY")


def envoy_required() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")
        for name in REQUIRE_ENVOY_ENV
    )


settings.register_profile("ci", derandomize=True, database=None)
if envoy_required():
    settings.load_profile("ci")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("envoy") is not None and envoy_required():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"an Envoy test was skipped where Envoy tests must run "
            f"({'/'.join(REQUIRE_ENVOY_ENV)} is set): {reason}"
        )
