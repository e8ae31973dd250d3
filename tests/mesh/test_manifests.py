"""Manifests on disk: file formats, the bundled example, and re-reading on change."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mesh.manifests import ManifestSource, load_objects, load_world
from mesh.model import World
from mesh.sources import LatestWorld
from tests.mesh.objects import pod, service

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster"
DEADLINE_S = 10.0


def write_yaml(path: Path, *docs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs))


def test_multi_document_yaml_skips_empty_documents(tmp_path: Path) -> None:
    file = tmp_path / "all.yaml"
    file.write_text(
        "---\n"
        + yaml.safe_dump(service("llama"))
        + "---\n---\n"
        + yaml.safe_dump(pod("p", labels={"app": "llama"}, ip="10.0.0.1"))
    )
    objects, errors = load_objects(file)
    assert errors == []
    assert [o["kind"] for o in objects] == ["Service", "Pod"]


def test_kind_list_as_kubectl_prints_it(tmp_path: Path) -> None:
    file = tmp_path / "list.yml"
    write_yaml(
        file,
        {
            "apiVersion": "v1",
            "kind": "List",
            "metadata": {"resourceVersion": ""},
            "items": [service("llama"), pod("p", labels={"app": "llama"}, ip="10.0.0.1")],
        },
    )
    world = load_world(file)
    assert [e.address for e in world.services[0].endpoints] == ["10.0.0.1"]


def test_directory_is_read_recursively_and_skips_hidden_and_other_files(tmp_path: Path) -> None:
    write_yaml(tmp_path / "svc.yaml", service("llama"))
    write_yaml(tmp_path / "nested" / "deeper" / "pods.YML", pod("a", ip="10.0.0.1"))
    (tmp_path / "nested" / "more.json").write_text(
        json.dumps([pod("b", ip="10.0.0.2"), pod("c", ip="10.0.0.3")])
    )
    write_yaml(tmp_path / ".hidden.yaml", pod("hidden-file"))
    write_yaml(tmp_path / "..data" / "dup.yaml", pod("hidden-dir"))
    (tmp_path / "README.md").write_text("not yaml: [")
    (tmp_path / "svc.yaml~").write_text("not yaml: [")
    world = load_world(tmp_path)
    assert world.source_errors == ()
    assert [s.name for s in world.services] == ["llama"]
    assert sorted(name for _, name in world.workloads) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("kind: Service\nmetadata: {name: [\n", "cannot be parsed"),
        ("- just\n- a list\n", "not a map"),
        ("kind: List\nitems:\n- 5\n", "not a map"),
        ("plain text", "not a map"),
    ],
)
def test_broken_files_are_source_errors_and_others_still_load(
    tmp_path: Path, content: str, fragment: str
) -> None:
    write_yaml(tmp_path / "good.yaml", service("llama"))
    broken = tmp_path / "broken.yaml"
    broken.write_text(content)
    world = load_world(tmp_path)
    assert [s.name for s in world.services] == ["llama"]
    (error,) = world.source_errors
    assert error.source == str(broken)
    assert fragment in error.message


def test_undecodable_and_missing_paths(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"kind: Service\nmetadata: {name: caf\xe9}\n")
    _, errors = load_objects(bad)
    assert "not UTF-8" in errors[0].message
    _, errors = load_objects(tmp_path / "nope")
    assert "does not exist" in errors[0].message


def test_the_bundled_example() -> None:
    world = load_world(EXAMPLE)
    assert world.source_errors == ()
    assert [s.name for s in world.services] == ["embedder", "llama"]
    llama = world.service("default", "llama")
    assert llama is not None
    assert [(p.port, p.target_port) for p in llama.ports] == [(8000, 8000)]
    assert llama.config.critical_callers == ("default/chat-frontend",)
    assert llama.config.timeouts == {"critical": 30.0}
    assert llama.config.default_priority == "standard"
    assert [(e.address, e.port, e.gpu, e.ready, e.pod_name) for e in llama.endpoints] == [
        ("127.0.0.11", 8000, True, True, "llama-gpu-0"),
        ("127.0.0.12", 8000, True, True, "llama-gpu-1"),
        ("127.0.0.13", 8000, False, True, "llama-cpu-0"),
    ]
    embedder = world.service("default", "embedder")
    assert embedder is not None
    assert [(e.address, e.port) for e in embedder.endpoints] == [("127.0.0.14", 8000)]
    clients = {
        name: (w.service_account, w.ip)
        for (_, name), w in world.workloads.items()
        if name in ("chat-frontend-0", "batch-worker-0")
    }
    assert clients == {
        "chat-frontend-0": ("chat-frontend", "127.0.0.21"),
        "batch-worker-0": ("batch-worker", "127.0.0.22"),
    }
    assert world.workloads[("default", "llama-gpu-0")].service_account == "llama"


# --- the polling source ----------------------------------------------------------------


@dataclass
class Running:
    source: ManifestSource
    latest: LatestWorld

    async def until(self, predicate: Callable[[World], bool]) -> World:
        async with asyncio.timeout(DEADLINE_S):
            return await self.latest.wait_for(predicate)

    async def quiet_scans(self, scans: int = 2) -> None:
        """Wait until the source has checked the files ``scans`` more times."""
        target = self.source.scans + scans
        async with asyncio.timeout(DEADLINE_S):
            while self.source.scans < target:  # noqa: ASYNC110 - the source owns the count
                await asyncio.sleep(0.01)


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    write_yaml(tmp_path / "svc.yaml", service("llama"))
    write_yaml(tmp_path / "pods.yaml", pod("a", labels={"app": "llama"}, ip="10.0.0.1"))
    source = ManifestSource(tmp_path, poll_interval=0.02)
    latest = LatestWorld()
    task = asyncio.create_task(source.run(latest))
    try:
        yield Running(source, latest)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def endpoint_ips(world: World) -> list[str]:
    return [e.address for s in world.services for e in s.endpoints]


async def test_source_publishes_first_world_then_changes(tmp_path: Path, running: Running) -> None:
    first = await running.until(lambda w: True)
    assert endpoint_ips(first) == ["10.0.0.1"]
    assert running.latest.count == 1

    write_yaml(tmp_path / "more" / "b.yaml", pod("b", labels={"app": "llama"}, ip="10.0.0.2"))
    await running.until(lambda w: endpoint_ips(w) == ["10.0.0.1", "10.0.0.2"])

    (tmp_path / "more" / "b.yaml").unlink()
    await running.until(lambda w: endpoint_ips(w) == ["10.0.0.1"])
    assert running.latest.count == 3


async def test_touching_or_rewriting_the_same_content_publishes_nothing(
    tmp_path: Path, running: Running
) -> None:
    await running.until(lambda w: True)
    pods = tmp_path / "pods.yaml"
    os.utime(pods, ns=(1, 1))
    pods.write_text(pods.read_text())
    # Same objects, different formatting: still the same World.
    pods.write_text(json.dumps(pod("a", labels={"app": "llama"}, ip="10.0.0.1"), indent=4))
    await running.quiet_scans()
    assert running.latest.count == 1


async def test_broken_file_keeps_last_good_objects_until_fixed(
    tmp_path: Path, running: Running
) -> None:
    await running.until(lambda w: True)
    pods = tmp_path / "pods.yaml"
    good = pods.read_text()
    pods.write_text(good + "\n  broken: [\n")
    broken = await running.until(lambda w: bool(w.source_errors))
    assert endpoint_ips(broken) == ["10.0.0.1"]  # the last good objects are kept
    (error,) = broken.source_errors
    assert error.source == str(pods)

    write_yaml(pods, pod("a", labels={"app": "llama"}, ip="10.0.0.9"))
    fixed = await running.until(lambda w: not w.source_errors)
    assert endpoint_ips(fixed) == ["10.0.0.9"]


async def test_a_broken_file_from_the_start_is_reported(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("{")
    write_yaml(tmp_path / "svc.yaml", service("llama"))
    latest = LatestWorld()
    task = asyncio.create_task(ManifestSource(tmp_path, poll_interval=0.02).run(latest))
    try:
        async with asyncio.timeout(DEADLINE_S):
            world = await latest.wait_first()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [s.name for s in world.services] == ["llama"]
    assert [e.source for e in world.source_errors] == [str(tmp_path / "bad.yaml")]


async def test_a_vanished_path_keeps_the_world_and_reports(tmp_path: Path) -> None:
    root = tmp_path / "manifests"
    write_yaml(root / "svc.yaml", service("llama"))
    source = ManifestSource(root, poll_interval=0.02)
    latest = LatestWorld()
    task = asyncio.create_task(source.run(latest))
    try:
        async with asyncio.timeout(DEADLINE_S):
            await latest.wait_first()
            moved = tmp_path / "elsewhere"
            root.rename(moved)
            gone = await latest.wait_for(lambda w: bool(w.source_errors))
            assert [s.name for s in gone.services] == ["llama"]
            assert "does not exist" in gone.source_errors[0].message
            moved.rename(root)
            back = await latest.wait_for(lambda w: not w.source_errors)
            assert [s.name for s in back.services] == ["llama"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
