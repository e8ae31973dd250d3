"""Render charts/inferlane with the real Helm engine and check documents against Kubernetes.

``render`` goes through helm-python-sdk (Helm's Go SDK through ctypes, no helm binary and no
cluster), so values.schema.json, the template functions and ``required``/``fail`` behave as
``helm template`` does. ``validate`` checks one object with kubernetes-validate in strict
mode (unknown fields refused) against the Kubernetes 1.33 schemas.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "inferlane"
RELEASE = "inferlane"
NAMESPACE = "inferlane"
KUBERNETES_VERSION = "1.33"

#: Kinds whose schemas kubernetes-validate does not ship (CRDs): checked by their own tests.
CUSTOM_KINDS = frozenset({"ServiceMonitor"})

Obj = dict[str, Any]


def render_files(
    values: Mapping[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> dict[str, str]:
    """Template path -> rendered text, as ``helm template`` prints them."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(
            dict(values) if values is not None else None, name=release, namespace=namespace
        )


def render(values: Mapping[str, Any] | None = None, **kwargs: str) -> list[Obj]:
    """Every rendered Kubernetes object, in template-path order."""
    objects: list[Obj] = []
    for path, text in sorted(render_files(values, **kwargs).items()):
        if not path.endswith(".yaml"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc is not None)
    return objects


def snapshot_text(values: Mapping[str, Any] | None = None) -> str:
    """The render as one stream with ``# Source:`` headers, as ``helm template`` prints it."""
    parts = []
    for path, text in sorted(render_files(values).items()):
        if path.endswith(".yaml") and text.strip():
            parts.append(f"---\n# Source: {path}\n{text.strip()}\n")
    return "".join(parts)


def lint(values: Mapping[str, Any] | None = None) -> list[Obj]:
    """``helm lint --strict`` findings (every severity, information included)."""
    report = helm.lint(
        CHART, dict(values) if values is not None else None, strict=True, namespace=NAMESPACE
    )
    return [*report.get("messages", []), *({"error": e} for e in report.get("errors", []))]


def validate(obj: Obj) -> None:
    """Raise kubernetes_validate's ValidationError if ``obj`` is not a valid 1.33 object."""
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def one(objects: list[Obj], kind: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def kinds(objects: list[Obj]) -> list[str]:
    return sorted(o["kind"] for o in objects)
