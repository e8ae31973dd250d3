"""mesh.analyze: each check finds its problem, names the object and the fix, and stays quiet
on a mesh without that problem; and what the World learns of pods for it."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.analyze import CHECKS, Finding, Severity, analyze
from mesh.build import build_world
from tests.mesh.objects import ENABLED, node, pod, service

GPU = {"limits": {"nvidia.com/gpu": 1}}


def healthy(**annotations: str) -> list[dict[str, Any]]:
    """An enabled Service with two GPU pods that have sidecars, and a caller with one."""
    svc = service("llama", annotations={**ENABLED, **annotations})
    return [
        svc,
        pod("llama-0", labels={"app": "llama"}, ip="10.0.0.1", resources=GPU, sidecar=True),
        pod("llama-1", labels={"app": "llama"}, ip="10.0.0.2", resources=GPU, sidecar=True),
        pod("chat-0", labels={"app": "chat"}, ip="10.0.0.9", service_account="chat", sidecar=True),
    ]


def findings(objects: list[dict[str, Any]]) -> list[Finding]:
    return list(analyze(build_world(objects)))


def codes(objects: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(f.code, f.severity.value, f.object) for f in findings(objects)]


def test_a_healthy_mesh_has_no_findings() -> None:
    objects = healthy(
        **{
            "inferlane.io/critical-callers": "default/chat",
            "inferlane.io/mtls": "strict",
            "inferlane.io/max-concurrency": "8",
        }
    )
    assert findings(objects) == []


def test_codes_are_unique_and_named() -> None:
    assert len({c.code for c in CHECKS}) == len(CHECKS)
    assert all(c.code.startswith("IL") and c.name and c.summary for c in CHECKS)


def test_bad_annotation_values_are_errors_that_say_what_and_how() -> None:
    objects = healthy(**{"inferlane.io/timeout": "critical=soon", "inferlane.io/rate-limt": "5"})
    found = findings(objects)
    assert [(f.code, f.severity) for f in found] == [("IL0001", Severity.ERROR)] * 2
    assert {f.object for f in found} == {"Service default/llama"}
    messages = " ".join(f.message for f in found)
    assert "inferlane.io/timeout='critical=soon'" in messages
    assert "did you mean inferlane.io/rate-limit" in messages
    assert all("served as if it were not set" in f.message and f.fix for f in found)


def test_services_left_out_of_the_mesh_are_reported() -> None:
    objects = [
        service("typo", annotations={"inferlane.io/enabled": "yes"}),
        service("forgot", annotations={"inferlane.io/max-concurrency": "4"}),
        service(
            "off", annotations={"inferlane.io/enabled": "false", "inferlane.io/mtls": "strict"}
        ),
        {"kind": "Pod", "metadata": {}},
    ]
    assert codes(objects) == [
        ("IL0002", "Error", "Pod without a name"),
        ("IL0002", "Error", "Service default/typo"),
        ("IL0002", "Warning", "Service default/forgot"),
    ]
    forgot = findings(objects)[-1]
    assert "inferlane.io/max-concurrency" in forgot.message
    assert 'inferlane.io/enabled: "true"' in forgot.fix


def test_critical_callers_no_pod_runs_as() -> None:
    entries = "default/chat, default/chta, ghost/*, spiffe://cluster.local/ns/default/sa/nobody"
    found = findings(healthy(**{"inferlane.io/critical-callers": entries}))
    assert [f.code for f in found] == ["IL0003"] * 3
    messages = [f.message for f in found]
    assert any("default/chta" in m and "service account default/chta" in m for m in messages)
    assert any("ghost/*" in m and "no pod runs in namespace ghost" in m for m in messages)
    assert any("sa/nobody" in m for m in messages)


def test_no_endpoints_and_only_fallback_endpoints() -> None:
    objects = [
        service("empty"),
        service("asleep"),
        pod("asleep-0", labels={"app": "asleep"}, ip="10.0.0.5", ready=False, sidecar=True),
        service("cpu"),
        pod("cpu-0", labels={"app": "cpu"}, ip="10.0.0.6", sidecar=True),
        service("gpu-node"),
        pod("g-0", labels={"app": "gpu-node"}, ip="10.0.0.7", node="n1", sidecar=True),
        node("n1", gpu=True),
    ]
    assert codes(objects) == [
        ("IL0004", "Error", "Service default/asleep"),
        ("IL0004", "Error", "Service default/empty"),
        ("IL0005", "Warning", "Service default/cpu"),
    ]
    by_object = {f.object: f.message for f in findings(objects)}
    assert "not ready" in by_object["Service default/asleep"]
    assert "no pod is selected" in by_object["Service default/empty"]


def test_endpoints_without_sidecar_say_what_they_lose() -> None:
    objects = healthy(
        **{
            "inferlane.io/rate-limit": "sheddable=5",
            "inferlane.io/critical-callers": "default/chat",
        }
    )
    objects[1]["spec"].pop("initContainers")
    (finding,) = findings(objects)
    assert (finding.code, finding.severity, finding.object) == (
        "IL0006",
        Severity.WARNING,
        "Pod default/llama-0",
    )
    assert "rate-limit and max-concurrency are not enforced" in finding.message
    assert "callers without a sidecar can send it critical" in finding.message
    assert "inferlane inject" in finding.fix


def test_an_endpoint_without_sidecar_of_a_strict_service_gets_no_traffic() -> None:
    objects = healthy(**{"inferlane.io/mtls": "strict"})
    objects[2]["spec"].pop("initContainers")
    assert codes(objects) == [("IL0006", "Error", "Pod default/llama-1")]
    assert "gets no traffic" in findings(objects)[0].message


def test_strict_service_whose_critical_callers_have_no_sidecar() -> None:
    objects = healthy(
        **{"inferlane.io/mtls": "strict", "inferlane.io/critical-callers": "default/chat"}
    )
    objects.append(pod("chat-1", labels={"app": "chat"}, ip="10.0.0.8", service_account="chat"))
    objects.append(pod("batch-0", ip="10.0.0.10", service_account="batch"))  # not a caller
    assert codes(objects) == [("IL0007", "Error", "Pod default/chat-1")]
    assert "permissive" in findings(objects)[0].fix


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "m", "--max-num-seqs", "4"],
        ["--model", "m", "--max-num-seqs=4"],
        ["serve", "m", "--max_num_seqs", "4"],
    ],
)
def test_max_concurrency_above_what_the_model_server_runs(args: list[str]) -> None:
    objects = healthy(**{"inferlane.io/max-concurrency": "8"})
    objects[1]["spec"]["containers"][0]["args"] = args
    assert codes(objects) == [("IL0008", "Warning", "Pod default/llama-0")]
    finding = findings(objects)[0]
    assert "--max-num-seqs 4" in finding.message
    assert "at most 4" in finding.fix
    # At or under the pod's limit, or no limit given: nothing to say.
    objects[0]["metadata"]["annotations"]["inferlane.io/max-concurrency"] = "4"
    assert findings(objects) == []


def test_the_world_learns_sidecars_and_max_num_seqs() -> None:
    world = build_world(
        [
            pod("a", sidecar=True, args=["--max-num-seqs", "64"]),
            pod("b", args=["--max-num-seqs"]),  # no value: unknown
            pod("c", args=["--max-num-seqs", "many"]),
            {
                "kind": "Pod",
                "metadata": {"name": "d"},
                "spec": {"containers": [{"name": "inferlane-proxy", "command": ["envoy"]}]},
            },
        ]
    )
    got = {k[1]: (w.sidecar, w.max_num_seqs) for k, w in world.workloads.items()}
    assert got == {"a": (True, 64), "b": (False, None), "c": (False, None), "d": (True, None)}


def test_findings_are_sorted_errors_first() -> None:
    objects = [*healthy(), service("empty"), service("cpu")]
    objects.append(pod("cpu-0", labels={"app": "cpu"}, ip="10.0.0.6", sidecar=True))
    severities = [f.severity for f in findings(objects)]
    assert severities == sorted(severities, key=lambda s: s is Severity.WARNING)
    assert findings(objects) == findings(list(reversed(objects)))
