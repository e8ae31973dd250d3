"""``inferlane analyze`` on the bundled example, on a deliberately broken copy of it, and on
a live cluster through the Kubernetes source (against the fake API server)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.mesh.fake_apiserver import FakeApiServer
from tests.mesh.objects import pod, service
from xds_server.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "cluster"


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = main([*argv, "-o", "json"])
    return code, json.loads(capsys.readouterr().out)


def test_the_example_has_warnings_and_no_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run_json(["analyze", "-f", str(EXAMPLES)], capsys)
    assert code == 0
    assert report["errors"] == 0
    found = {(f["code"], f["object"]) for f in report["findings"]}
    # The example's pods run without sidecars (the demo runs its Envoys beside them), and
    # the embedder has only a CPU pod: both are worth knowing, neither breaks it.
    assert found == {
        ("IL0005", "Service default/embedder"),
        ("IL0006", "Pod default/embedder-0"),
        ("IL0006", "Pod default/llama-cpu-0"),
        ("IL0006", "Pod default/llama-gpu-0"),
        ("IL0006", "Pod default/llama-gpu-1"),
    }


def break_example(dest: Path) -> Path:
    """The example with four mistakes a platform team makes."""
    shutil.copytree(EXAMPLES, dest)
    llama = dest / "llama.yaml"
    doc = yaml.safe_load(llama.read_text())
    svc, gpu_0 = doc["items"][0], doc["items"][1]
    annotations = svc["metadata"]["annotations"]
    annotations["inferlane.io/critical-callers"] = "default/chat-frontnd"  # a typo
    annotations["inferlane.io/timeout"] = "critical=thirty"  # not a duration
    annotations["inferlane.io/max-concurrency"] = "128"  # the pods run 64
    annotations["inferlane.io/mtls"] = "strict"  # no pod has a sidecar
    gpu_0["spec"]["containers"][0]["args"][-1] = "32"
    llama.write_text(yaml.safe_dump(doc))
    (dest / "broken.yaml").write_text("kind: Service\nmetadata: {name: [unclosed\n")
    return dest


def test_a_broken_copy_fails_with_each_mistake_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = break_example(tmp_path / "cluster")
    code, report = run_json(["analyze", "-f", str(broken)], capsys)
    assert code == 1
    by_code: dict[str, list[dict[str, str]]] = {}
    for finding in report["findings"]:
        by_code.setdefault(finding["code"], []).append(finding)
    assert by_code["IL0001"][0]["object"] == "Service default/llama"
    assert "critical=thirty" in by_code["IL0001"][0]["message"]
    assert by_code["IL0002"][0]["object"].endswith("broken.yaml")
    assert "chat-frontnd" in by_code["IL0003"][0]["message"]
    strict = {f["object"] for f in by_code["IL0006"] if f["severity"] == "Error"}
    assert strict == {
        "Pod default/llama-gpu-0",
        "Pod default/llama-gpu-1",
        "Pod default/llama-cpu-0",
    }
    assert {f["object"]: f["message"] for f in by_code["IL0008"]}.keys() == {
        "Pod default/llama-gpu-0",
        "Pod default/llama-gpu-1",
    }
    assert report["errors"] == sum(1 for f in report["findings"] if f["severity"] == "Error")

    # The text form: one line per finding, code and object first, then the fix.
    assert main(["analyze", "-f", str(broken)]) == 1
    text = capsys.readouterr().out
    assert "Error [IL0001] (Service default/llama) inferlane.io/timeout='critical=thirty'" in text
    assert "    fix: " in text
    assert text.rstrip().endswith("warnings.")


def test_a_missing_path_is_an_error_finding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = run_json(["analyze", "-f", str(tmp_path / "nowhere")], capsys)
    assert code == 1
    assert report["findings"][0]["code"] == "IL0002"


def kubeconfig(path: Path, url: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": url}}],
                "users": [{"name": "fake", "user": {"token": "t"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "current-context": "fake",
            }
        )
    )
    return path


def test_kubernetes_mode_reads_the_cluster_as_serve_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def analyze_cluster() -> tuple[int, dict[str, Any]]:
        fake = FakeApiServer()
        url = await fake.start()
        try:
            await fake.put(service("llama", annotations={"inferlane.io/enabled": "true"}))
            await fake.put(service("typo", annotations={"inferlane.io/enabled": "yes"}))
            await fake.put(pod("llama-0", labels={"app": "llama"}, ip="10.0.0.1", sidecar=True))
            config = kubeconfig(tmp_path / "kubeconfig", url)
            argv = ["analyze", "--kubernetes", "--kubeconfig", str(config), "--timeout", "20"]
            # The command runs its own event loop; the fake serves from this one.
            return await asyncio.to_thread(run_json, argv, capsys)
        finally:
            await fake.stop()

    code, report = asyncio.run(analyze_cluster())
    assert code == 1
    assert report["services"] == 1
    found = [(f["code"], f["object"]) for f in report["findings"]]
    assert found == [
        ("IL0002", "Service default/typo"),
        ("IL0005", "Service default/llama"),
    ]


def test_kubernetes_mode_without_a_cluster_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")  # nothing listens
    argv = ["analyze", "--kubernetes", "--kubeconfig", str(config), "--timeout", "0.5"]
    assert main(argv) == 2
    assert "not listed within 0.5 s" in capsys.readouterr().err
