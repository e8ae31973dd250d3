"""``inferlane serve`` killed with SIGKILL and restarted on the same xDS port: traffic never
fails, and the restarted server sends the reconnecting Envoy nothing new.

Versions are hashes of the serialized resources, so the restarted server computes the
versions Envoy already holds. A SotW Envoy reconnects naming its ``version_info`` per
type, a Delta Envoy its ``initial_resource_versions``; either way there is nothing to send.
The sidecar's pod is in the world, so it has a workload certificate, and it calls a strict
mTLS Service, so it subscribes to its secrets (SDS ``default`` and ``ROOTCA``): restarted
on the same ``--ca-dir`` within the certificate's renewal period, the control plane
derives the very same certificate and key, and sends no secret either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import bench.envoy
from mtls.ca import DEFAULT_WORKLOAD_TTL, utcnow
from mtls.epoch import EPOCH_FILE
from mtls.identity import DEFAULT_TRUST_DOMAIN
from mtls.rotation import renewal_period
from tests.e2e.harness import (
    SERVICE_PORT,
    Client,
    envoy_versions,
    http_session,
    inference_service,
    model_pod,
    sidecar,
    write_manifests,
)
from tests.mesh.objects import pod
from tests.support.backends import echo_server
from tests.support.envoy import Envoy, require_envoy, running_envoy
from tests.support.wait import eventually
from xds_server.sidecar.bootstrap import BootstrapOptions, bootstrap

pytestmark = pytest.mark.envoy

ROOT = Path(__file__).resolve().parents[2]
GPU0, CPU0, EMBED0 = "127.0.38.1", "127.0.38.3", "127.0.38.5"
LLAMA = "llama.default.svc.cluster.local:8000"
ROUTING_TYPES = ("LDS", "RDS", "CDS", "EDS")
TYPES = (*ROUTING_TYPES, "SDS")
#: The client sidecar's pod and service account.
CLIENT_POD, CLIENT_SA = "app-0", "app"


class Serve:
    """One ``inferlane serve`` subprocess."""

    def __init__(self, proc: asyncio.subprocess.Process, ports: dict[str, int]) -> None:
        self.proc = proc
        self.ports = ports
        self.admin = f"http://127.0.0.1:{ports['admin']}"

    async def get(self, session: aiohttp.ClientSession, path: str) -> tuple[int, str]:
        async with session.get(self.admin + path) as resp:
            return resp.status, await resp.text()

    async def json(self, session: aiohttp.ClientSession, path: str) -> Any:
        status, text = await self.get(session, path)
        assert status == 200, text
        return json.loads(text)

    async def samples(self, session: aiohttp.ClientSession, name: str) -> dict[str, float]:
        """Samples of one metric from ``/metrics``, by their ``type`` label."""
        _, text = await self.get(session, "/metrics")
        return {
            sample.labels.get("type", ""): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        }


def with_secrets(client_ip: str, model_ip: str) -> list[dict[str, Any]]:
    """The client sidecar's pod (known to the world, so the sidecar has an identity) and a
    strict mTLS Service it never calls: its clusters speak mTLS, so the sidecar subscribes
    to its own secrets."""
    return [
        pod(CLIENT_POD, labels={"app": CLIENT_POD}, ip=client_ip, service_account=CLIENT_SA),
        inference_service("embedder", annotations={"inferlane.io/mtls": "strict"}),
        model_pod("embed-0", app="embedder", ip=model_ip, port=SERVICE_PORT, gpu=True),
    ]


def assert_mid_period(ttl: timedelta = DEFAULT_WORKLOAD_TTL) -> None:
    """Skip in the rare run where the client's certificate falls due within the test: a
    renewal would rightly send its new certificate."""
    identity = f"spiffe://{DEFAULT_TRUST_DOMAIN}/ns/default/sa/{CLIENT_SA}"
    left = renewal_period(identity, ttl, utcnow()).end - utcnow()
    if left < timedelta(minutes=2):
        pytest.skip(f"the client's certificate is renewed in {left}, within the test")


@contextlib.asynccontextmanager
async def serving(
    manifests: Path, xds_port: int, workdir: Path, *, ca_dir: Path | None = None
) -> AsyncIterator[Serve]:
    """``python -m xds_server.cli serve`` on ``xds_port`` (0: any), with the CA kept in
    ``ca_dir`` (default ``workdir/ca``); killed on exit."""
    ports_file = workdir / "ports.json"
    ports_file.unlink(missing_ok=True)
    with (workdir / "serve.log").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "xds_server.cli",
            "--log-level",
            "debug",
            "serve",
            "--manifests",
            str(manifests),
            "--host",
            "127.0.0.1",
            "--xds-port",
            str(xds_port),
            "--xds-tls-port",
            "0",
            "--ca-dir",
            str(ca_dir or workdir / "ca"),
            "--admin-port",
            "0",
            "--ports-file",
            str(ports_file),
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:

        async def bound() -> dict[str, int]:
            if proc.returncode is not None:
                raise AssertionError(f"serve exited {proc.returncode}")
            text = ports_file.read_text() if ports_file.exists() else ""
            return dict(json.loads(text)) if text else {}

        ports = await eventually(bound, timeout=20, what="the ports file")
        yield Serve(proc, ports)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def served_sidecar(
    stack: contextlib.AsyncExitStack,
    session: aiohttp.ClientSession,
    manifests: Path,
    workdir: Path,
    client_ip: str,
    *,
    delta: bool,
) -> tuple[Serve, Envoy, Client, str]:
    """``inferlane serve`` on any free port and a sidecar Envoy at ``client_ip`` subscribed
    to it: (the server, the Envoy, a client of its outbound listener, its node ID)."""
    serve = await stack.enter_async_context(serving(manifests, 0, workdir))
    node_id, metadata, outbound = sidecar(client_ip, CLIENT_POD, service_account=CLIENT_SA)
    envoy = await stack.enter_async_context(
        running_envoy(node_id, serve.ports["xds"], delta=delta, metadata=metadata)
    )
    return serve, envoy, Client(session, client_ip, outbound), node_id


class Steady:
    """Requests back to back through the sidecar, counting every one that fails."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.ok = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        classes = ("critical", "standard", None)
        while not self._stop.is_set():
            cls = classes[self.ok % len(classes)]
            try:
                status, backend = await self.client.get(LLAMA, cls)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failures.append(repr(exc))
                continue
            if status == 200 and backend == "gpu-0":
                self.ok += 1
            else:
                self.failures.append(f"{status} {backend}")

    def stop(self) -> None:
        self._stop.set()

    async def more(self, count: int) -> None:
        """Wait until ``count`` more requests have succeeded."""
        target = self.ok + count

        async def reached() -> bool:
            return self.ok >= target

        await eventually(reached, timeout=10, what=f"{count} more requests")


def fast_reconnect_bootstrap(opts: BootstrapOptions) -> str:
    """The usual bootstrap, with the ADS stream retried every 50 to 200 ms.

    Envoy's default reconnect backoff (0.5 s doubling to 30 s, jittered) leaves it
    reconnecting anywhere from a second to ten after the restart. Retrying fast keeps the
    test short and makes Envoy reconnect as soon as the new server listens, before its
    first world is loaded: the hardest moment to get right.
    """
    document = bootstrap(opts)
    for service in document["dynamic_resources"]["ads_config"]["grpc_services"]:
        service["envoy_grpc"]["retry_policy"] = {
            "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.2s"}
        }
    return yaml.safe_dump(document, sort_keys=False)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_restart_sends_nothing_and_drops_nothing(
    tmp_path: Path, delta: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_envoy()
    assert_mid_period()
    monkeypatch.setattr(bench.envoy, "bootstrap_yaml", fast_reconnect_bootstrap)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    client_ip = "127.0.38.11" if delta else "127.0.38.10"
    async with (
        echo_server("gpu-0", host=GPU0) as gpu0,
        echo_server("cpu-0", host=CPU0) as cpu0,
        contextlib.AsyncExitStack() as stack,
    ):
        write_manifests(
            manifests / "llama.yaml",
            [
                inference_service("llama", annotations={"inferlane.io/timeout": "critical=30s"}),
                model_pod("gpu-0", app="llama", ip=GPU0, port=gpu0.port, gpu=True),
                model_pod("cpu-0", app="llama", ip=CPU0, port=cpu0.port),
                *with_secrets(client_ip, EMBED0),
            ],
        )
        session = await stack.enter_async_context(http_session())
        first, envoy, client, node_id = await served_sidecar(
            stack, session, manifests, tmp_path, client_ip, delta=delta
        )
        xds_port = first.ports["xds"]
        await client.wait_served_by(LLAMA, ["gpu-0"])
        before = await envoy_versions(envoy)
        # 2 listeners, 2 routes, 2 x 3 clusters + assignments, and the two secrets.
        assert len(before) == 4 + 2 * 2 * 3 + 2
        assert {("secret", "default"), ("secret", "ROOTCA")} <= set(before)
        sds_updates = await secret_updates(envoy)
        assert sds_updates["default"] >= 1

        steady = Steady(client)
        loop = asyncio.create_task(steady.run(), name="steady-requests")
        try:
            await steady.more(20)
            first.proc.kill()
            await first.proc.wait()
            # Envoy serves on its cached config while no control plane runs.
            await steady.more(20)

            second = await stack.enter_async_context(serving(manifests, xds_port, tmp_path))
            await _wait_reconnected(session, second, node_id)
            await steady.more(20)
        finally:
            steady.stop()
            await loop
        assert steady.failures == []
        assert cpu0.requests == 0
        assert await envoy_versions(envoy) == before
        sent = await second.samples(session, "inferlane_xds_resources_sent_total")
        assert {t: sent.get(t, 0) for t in TYPES} == dict.fromkeys(TYPES, 0)
        # Envoy's side: it accepted no secret from the second control plane.
        assert await secret_updates(envoy) == sds_updates


async def test_a_rotation_outlives_the_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kill -USR1`` gives the sidecar a new key. The key epoch is kept in ``--ca-dir``, so
    the control plane restarted after it derives the new key, not the one it replaced (a
    suspected compromise is never undone by a restart), and sends nothing."""
    require_envoy()
    assert_mid_period()
    monkeypatch.setattr(bench.envoy, "bootstrap_yaml", fast_reconnect_bootstrap)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    client_ip = "127.0.38.12"
    async with echo_server("gpu-0", host=GPU0) as gpu0, contextlib.AsyncExitStack() as stack:
        write_manifests(
            manifests / "llama.yaml",
            [
                inference_service("llama"),
                model_pod("gpu-0", app="llama", ip=GPU0, port=gpu0.port, gpu=True),
                *with_secrets(client_ip, EMBED0),
            ],
        )
        session = await stack.enter_async_context(http_session())
        first, envoy, client, node_id = await served_sidecar(
            stack, session, manifests, tmp_path, client_ip, delta=False
        )
        await client.wait_served_by(LLAMA, ["gpu-0"])
        original = (await envoy_versions(envoy))[("secret", "default")]

        first.proc.send_signal(signal.SIGUSR1)

        async def rotated() -> bool:
            held = (await envoy_versions(envoy)).get(("secret", "default"))
            return held not in (None, original)

        await eventually(rotated, timeout=20, what="the sidecar holding its new certificate")
        assert (tmp_path / "ca" / EPOCH_FILE).read_text() == "1\n"
        before, updates = await envoy_versions(envoy), await secret_updates(envoy)

        first.proc.kill()
        await first.proc.wait()
        second = await stack.enter_async_context(serving(manifests, first.ports["xds"], tmp_path))
        await _wait_reconnected(session, second, node_id)
        await client.wait_served_by(LLAMA, ["gpu-0"])
        assert await envoy_versions(envoy) == before
        assert await secret_updates(envoy) == updates
        sent = await second.samples(session, "inferlane_xds_resources_sent_total")
        assert sent.get("SDS", 0) == 0


async def secret_updates(envoy: Envoy) -> dict[str, int]:
    """Secrets Envoy accepted, by name (``sds.NAME.update_success``)."""
    stats = await envoy.stats("sds.")
    return {name: stats.get(f"sds.{name}.update_success", 0) for name in ("default", "ROOTCA")}


async def _wait_reconnected(
    session: aiohttp.ClientSession,
    serve: Serve,
    node_id: str,
    types: tuple[str, ...] = TYPES,
) -> None:
    """Until the Envoy is connected to ``serve``, subscribed to ``types``, and its stream
    holds the server's current generation (the world is loaded and translated)."""

    async def synced() -> bool:
        status, _ = await serve.get(session, "/readyz")
        if status != 200:
            return False
        connections = await serve.json(session, "/debug/connections")
        mine = [c for c in connections if c["node_id"] == node_id]
        if len(mine) != 1 or len(mine[0]["types"]) != len(types):
            return False
        dump = await serve.json(session, f"/debug/config_dump?proxy={node_id}")
        generation = await serve.samples(session, "inferlane_xds_config_generation")
        current = generation.get("", 0)
        return current >= 1 and dump["generation"] == current

    await eventually(synced, timeout=20, what="the Envoy reconnected and synced")


async def test_delta_envoy_drops_what_was_deleted_while_the_control_plane_was_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Delta Envoy reconnects listing what it holds (``initial_resource_versions``). A
    Service deleted while no control plane ran is in that list and in no world: the
    restarted server removes its clusters and assignments, and the rest keeps serving."""
    require_envoy()
    monkeypatch.setattr(bench.envoy, "bootstrap_yaml", fast_reconnect_bootstrap)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    llama_ip, embedder_ip, client_ip = "127.0.39.1", "127.0.39.2", "127.0.39.10"
    async with (
        echo_server("gpu-0", host=llama_ip) as llama,
        echo_server("embed-0", host=embedder_ip) as embedder,
        contextlib.AsyncExitStack() as stack,
    ):
        kept = [
            inference_service("llama"),
            model_pod("gpu-0", app="llama", ip=llama_ip, port=llama.port, gpu=True),
        ]
        deleted = [
            inference_service("embedder"),
            model_pod("embed-0", app="embedder", ip=embedder_ip, port=embedder.port, gpu=True),
        ]
        write_manifests(manifests / "mesh.yaml", [*kept, *deleted])
        session = await stack.enter_async_context(http_session())
        first, envoy, client, node_id = await served_sidecar(
            stack, session, manifests, tmp_path, client_ip, delta=True
        )
        xds_port = first.ports["xds"]
        await client.wait_served_by(LLAMA, ["gpu-0"])
        await client.wait_served_by("embedder.default.svc.cluster.local:8000", ["embed-0"])

        def of_embedder(held: dict[tuple[str, str], str]) -> list[tuple[str, str]]:
            return [k for k in held if k[0] in ("cluster", "endpoints") and "embedder" in k[1]]

        assert len(of_embedder(await envoy_versions(envoy))) == 2 * 3  # 3 classes

        first.proc.kill()
        await first.proc.wait()
        write_manifests(manifests / "mesh.yaml", kept)  # deleted while nobody watched
        second = await stack.enter_async_context(serving(manifests, xds_port, tmp_path))
        await _wait_reconnected(session, second, node_id, ROUTING_TYPES)

        async def dropped() -> bool:
            return not of_embedder(await envoy_versions(envoy))

        await eventually(dropped, timeout=10, what="the deleted Service's clusters removed")
        await client.wait_served_by(LLAMA, ["gpu-0"])
        held = await envoy_versions(envoy)
        assert any(kind == "cluster" and "llama" in name for kind, name in held)
        removed = await second.samples(session, "inferlane_xds_pushes_total")
        assert removed.get("CDS", 0) >= 1 and removed.get("EDS", 0) >= 1
