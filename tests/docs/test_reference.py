"""docs/reference.md names everything a user can touch: the lists come from the code.

Annotations from the parser, metrics from a running control plane's ``/metrics`` (and the
sidecars' request stats from the translator that configures them), flags from the
command line's own parser, admin pages from a running control plane's index, analyzer
codes from the analyzer. Something added to the code and not to the reference fails here.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from mesh.analyze import CHECKS
from mesh.annotations import KNOWN_ANNOTATIONS
from mesh.manifests import ManifestSource
from routing import telemetry
from tests.e2e.harness import admin_text, control_plane
from xds_server.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
EXAMPLES = ROOT / "examples" / "cluster"
#: Flags every command takes, documented once for all.
LOGGING_FLAGS = {"--log-level", "--log-format"}


def section(heading: str) -> str:
    """The reference's text under ``heading`` up to the next heading of its level."""
    match = re.search(rf"^(#+) {re.escape(heading)}\n", REFERENCE, re.MULTILINE)
    assert match is not None, f"docs/reference.md has no section {heading!r}"
    level = match[1]
    rest = REFERENCE[match.end() :]
    end = re.search(rf"^{level} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_annotation_has_its_own_section() -> None:
    assert len(KNOWN_ANNOTATIONS) >= 9
    for annotation in KNOWN_ANNOTATIONS:
        text = section(f"`{annotation}`")
        assert "```yaml" in text, f"{annotation}: no example"


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_and_flag_is_documented(name: str) -> None:
    text = section(f"`inferlane {name}`")
    flags = {
        option
        for action in commands()[name]._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    missing = sorted(f for f in flags - LOGGING_FLAGS if f"`{f}" not in text)
    assert missing == [], f"inferlane {name}: flags missing from docs/reference.md: {missing}"
    assert flags >= LOGGING_FLAGS
    intro = section("Command line")
    assert all(f"`{f}`" in intro for f in LOGGING_FLAGS)


def test_every_analyzer_code_is_documented() -> None:
    text = section("`inferlane analyze` codes")
    for check in CHECKS:
        assert f"| {check.code} | {check.name} |" in text


def test_every_envoy_request_stat_is_documented() -> None:
    text = section("The sidecars and gateways (Envoy's `/stats/prometheus`)")
    for name in (telemetry.REQUESTS, telemetry.DURATION, telemetry.TTFT):
        exported = "envoy_" + f"{telemetry.STAT_PREFIX}.{name}".replace(".", "_")
        assert f"`{exported}`" in text


async def test_every_metric_and_admin_page_of_a_running_control_plane() -> None:
    async with control_plane(ManifestSource(EXAMPLES)) as plane:
        exposition = await admin_text(plane, "/metrics")
        pages = [page.path for page in plane.admin.pages]
    metrics = {
        m
        for m in re.findall(r"^# TYPE (\S+) ", exposition, re.MULTILINE)
        if not m.endswith("_created")
    }
    assert "inferlane_xds_pushes_total" in metrics and len(metrics) > 20
    documented = section("The control plane (`/metrics`)")
    missing = sorted(m for m in metrics if f"`{m}`" not in documented)
    assert missing == [], f"metrics missing from docs/reference.md: {missing}"
    admin = section("Admin pages")
    missing_pages = sorted(p for p in pages if f"`{p}" not in admin)
    assert missing_pages == [], f"admin pages missing from docs/reference.md: {missing_pages}"


def test_the_readme_links_the_reference_and_nothing_outside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/reference.md)" in readme
    for target in re.findall(r"\]\(([^)#]+)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).resolve().is_relative_to(ROOT), target
            assert (ROOT / target).exists(), target
