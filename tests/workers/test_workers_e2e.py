"""``--workers 2``: two worker processes behind one port serve real Envoys (SotW and
Delta); the admin, ``/debug/syncz``, ``inferlane status`` and ``/metrics`` see every
worker's streams; a worker killed under load loses only its own streams, which reconnect
with nothing re-sent."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import io
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.fleet import FleetProxy
from bench.synthetic import Recorder, SyntheticStream
from mesh import xds
from mesh.manifests import ManifestSource
from mesh.proxy import proxy_from_node
from tests.e2e.harness import (
    Client,
    admin_text,
    control_plane,
    envoy_versions,
    http_session,
    inference_service,
    loopback_settings,
    model_pod,
    pod,
    sidecar,
    write_manifests,
)
from tests.support.backends import echo_server
from tests.support.envoy import require_envoy, running_envoy
from tests.support.wait import eventually
from xds_server.ads.snapshot import Snapshot
from xds_server.app import ControlPlane
from xds_server.cli import main as cli_main

pytestmark = pytest.mark.envoy

GPU0 = "127.0.41.1"
ENVOY_IPS = ("127.0.41.10", "127.0.41.11")
LLAMA = "llama.default.svc.cluster.local:8000"
#: Synthetic client sidecars beside the Envoys: the load a killed worker drops.
SYNTHETIC = 60
#: Their connections. The kernel picks a worker per connection: with 20, the chance that
#: one worker gets none is 2 in a million.
CHANNELS = 20


def _manifests(path: Path, backend_port: int) -> None:
    clients = [
        pod(f"client-{i}", ip=f"127.0.41.{100 + i}", service_account="client")
        for i in range(SYNTHETIC)
    ]
    envoys = [pod(f"app-{i}", ip=ip, service_account="client") for i, ip in enumerate(ENVOY_IPS)]
    write_manifests(
        path,
        [
            inference_service("llama"),
            model_pod("gpu-0", app="llama", ip=GPU0, port=backend_port, gpu=True),
            *clients,
            *envoys,
        ],
    )


@contextlib.asynccontextmanager
async def _plane(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, Any]]:
    async with echo_server("gpu-0", host=GPU0) as gpu0:
        manifests = tmp_path / "mesh.yaml"
        _manifests(manifests, gpu0.port)
        settings = dataclasses.replace(loopback_settings(), workers=2, gc_threshold=12_345)
        before = gc.get_threshold()
        async with control_plane(ManifestSource(manifests), settings) as plane:
            assert gc.get_threshold()[0] == 12_345
            yield plane, gpu0
        assert gc.get_threshold() == before  # a process-wide setting, put back


def _command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")


async def _syncz(plane: ControlPlane) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(await admin_text(plane, "/debug/syncz"))
    return entries


def _metric(text: str, name: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


async def test_two_workers_serve_envoy_over_sotw_and_delta(tmp_path: Path) -> None:
    require_envoy()
    async with _plane(tmp_path) as (plane, _gpu0), contextlib.AsyncExitStack() as stack:
        assert plane.hub is not None and len(plane.hub.workers) == 2
        for worker in plane.hub.workers.values():  # each collects as the primary was told
            argv = _command_line(worker.proc.pid)
            assert argv[argv.index("--gc-threshold") + 1] == "12345"
        session = await stack.enter_async_context(http_session())
        nodes = []
        for i, (ip, delta) in enumerate(zip(ENVOY_IPS, (False, True), strict=True)):
            node_id, metadata, outbound = sidecar(ip, f"app-{i}", service_account="client")
            await stack.enter_async_context(
                running_envoy(node_id, plane.ports["xds"], delta=delta, metadata=metadata)
            )
            await Client(session, ip, outbound).wait_served_by(LLAMA, ["gpu-0"], timeout=30)
            nodes.append(node_id)

        async def both_synced() -> list[dict[str, Any]]:
            entries = await _syncz(plane)
            ours = [e for e in entries if e["node_id"] in nodes]
            synced = all(t["status"] == "SYNCED" for e in ours for t in e["types"].values())
            return ours if len(ours) == 2 and synced else []

        entries = await eventually(both_synced, timeout=20, what="both Envoys SYNCED in syncz")
        assert {e["mode"] for e in entries} == {"sotw", "delta"}
        assert all(e["worker"] in (0, 1) for e in entries)
        # No stream is served by the primary itself: the workers hold the plaintext port.
        assert plane.xds.connections == {}

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = await asyncio.to_thread(
                cli_main, ["status", "--admin", f"http://127.0.0.1:{plane.ports['admin']}"]
            )
        assert code == 0
        lines = {line.split()[0]: line for line in out.getvalue().splitlines()[1:] if line}
        for node_id in nodes:
            assert lines[node_id].split()[2:6] == ["SYNCED"] * 4  # CDS LDS EDS RDS

        metrics = await admin_text(plane, "/metrics")
        assert _metric(metrics, "inferlane_xds_connected_proxies") == 2
        assert _metric(metrics, "inferlane_xds_acks_total") >= 8
        dump = json.loads(await admin_text(plane, f"/debug/config_dump?proxy={nodes[1]}"))
        assert "RDS" in dump["resources"]


class _Synthetic:
    """Client sidecars that behave like Envoy, in this process."""

    def __init__(self, snap: Snapshot, xds_port: int) -> None:
        names = {
            xds.CLUSTER: [],
            xds.LISTENER: [],
            **{t: sorted(snap.of_type(t)) for t in (xds.ENDPOINT, xds.ROUTE, xds.SECRET)},
        }
        self.record = Recorder()
        self.streams = [
            SyntheticStream(
                FleetProxy(
                    i,
                    self.node_id(i),
                    {"SERVICE_ACCOUNT": "client"},
                    "client",
                    delta=i % 2 == 1,
                    namespace="default",
                    pod=f"client-{i}",
                ),
                names,
                self.record,
            )
            for i in range(SYNTHETIC)
        ]
        self.channels = [
            grpc.aio.insecure_channel(
                f"127.0.0.1:{xds_port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(CHANNELS)
        ]
        self.tasks: list[asyncio.Task[None]] = []

    @staticmethod
    def node_id(i: int) -> str:
        return f"sidecar~127.0.41.{100 + i}~client-{i}.default~default.svc.cluster.local"

    async def start(self) -> None:
        for i, stream in enumerate(self.streams):
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channels[i % CHANNELS])
            self.tasks.append(asyncio.create_task(stream.run(stub)))
        await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in self.streams)), 60)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()


async def test_a_killed_worker_loses_only_its_streams_and_nothing_is_resent(
    tmp_path: Path,
) -> None:
    require_envoy()
    async with _plane(tmp_path) as (plane, _gpu0), contextlib.AsyncExitStack() as stack:
        hub = plane.hub
        assert hub is not None
        session = await stack.enter_async_context(http_session())
        node_id, metadata, outbound = sidecar(ENVOY_IPS[0], "app-0", service_account="client")
        envoy = await stack.enter_async_context(
            running_envoy(node_id, plane.ports["xds"], metadata=metadata)
        )
        client = Client(session, ENVOY_IPS[0], outbound)
        await client.wait_served_by(LLAMA, ["gpu-0"], timeout=30)
        first = proxy_from_node(_Synthetic.node_id(0), {"SERVICE_ACCOUNT": "client"})
        snap = await plane.cache.snapshot_for(first)
        synthetic = _Synthetic(snap, plane.ports["xds"])
        stack.push_async_callback(synthetic.stop)
        await synthetic.start()
        total = SYNTHETIC + 1

        async def all_synced() -> list[dict[str, Any]]:
            entries = json.loads(await admin_text(plane, "/debug/connections"))
            syncz = await _syncz(plane)
            synced = all(t["status"] == "SYNCED" for e in syncz for t in e["types"].values())
            return entries if len(entries) == total and len(syncz) == total and synced else []

        before = await eventually(all_synced, timeout=30, what="every stream in sync")
        workers = {e["worker"] for e in before}
        assert workers == {0, 1}, "the kernel spreads connections over both workers"
        victim = next(e["worker"] for e in before if e["node_id"] == node_id)
        survivors = {(e["worker"], e["stream"]) for e in before if e["worker"] != victim}
        envoy_before = await envoy_versions(envoy)
        sent_before = _metric(
            await admin_text(plane, "/metrics"), "inferlane_xds_resources_sent_total"
        )

        # Requests keep flowing through the Envoy while its worker dies.
        os.kill(hub.workers[victim].proc.pid, signal.SIGKILL)

        async def reconnected() -> list[dict[str, Any]]:
            entries = await all_synced()
            moved = any(
                e["node_id"] == node_id and (e["worker"], e["stream"]) not in survivors
                for e in entries
            )
            return entries if entries and moved and hub.restarts >= 1 else []

        after = await eventually(reconnected, timeout=60, what="every stream back in sync")
        # The other worker's streams never closed.
        assert survivors <= {(e["worker"], e["stream"]) for e in after}
        assert await client.served(LLAMA, count=10) == ["gpu-0"] * 10
        # Nothing was sent again: same versions everywhere, no resource sent since.
        assert await envoy_versions(envoy) == envoy_before
        sent_after = _metric(
            await admin_text(plane, "/metrics"), "inferlane_xds_resources_sent_total"
        )
        assert sent_after == sent_before
        assert any(e["worker"] == victim and e["node_id"] != node_id for e in before), (
            "synthetic streams were on the killed worker too"
        )
