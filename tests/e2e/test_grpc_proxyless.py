"""grpcio's own xDS client calls an inference Service through ``xds:///`` against the
real control plane, and follows its endpoints as they change.

The gRPC client runs in a subprocess (its xDS bootstrap is process-wide, read from
``GRPC_XDS_BOOTSTRAP``). It reads one class per line on stdin, makes one call with that
class in its metadata, and prints which backend answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from mesh.manifests import ManifestSource
from tests.e2e.harness import (
    control_plane,
    inference_service,
    metric,
    model_pod,
    write_manifests,
)
from tests.support.wait import eventually

GPU0, CPU0, CLIENT = "127.0.37.1", "127.0.37.3", "127.0.37.10"
TARGET = "xds:///llama.default.svc.cluster.local:8000"
SERVICE, METHOD = "inferlane.test.Echo", "Call"
CLIENT_NODE = f"sidecar~{CLIENT}~grpc-client-0.default~default.svc.cluster.local"

_CLIENT = """
import sys, grpc
channel = grpc.insecure_channel(sys.argv[1])
call = channel.unary_unary(sys.argv[2])
for line in sys.stdin:
    value = line.strip()
    metadata = () if value == "-" else (("x-inference-priority", value),)
    try:
        print(call(b"", metadata=metadata, timeout=10).decode(), flush=True)
    except grpc.RpcError as exc:
        print("error:" + exc.code().name, flush=True)
channel.close()
"""


@contextlib.asynccontextmanager
async def grpc_backend(name: str, host: str) -> AsyncIterator[int]:
    """A gRPC server on ``host`` that answers every call with its name; yields the port."""

    async def call(request: bytes, context: Any) -> bytes:
        return name.encode()

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(call)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


class GrpcClient:
    """The client subprocess: ``call(cls)`` makes one call and returns the answer."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def call(self, cls: str = "-") -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cls.encode() + b"\n")
        await self.proc.stdin.drain()
        async with asyncio.timeout(20):
            line = await self.proc.stdout.readline()
        if not line:
            raise AssertionError("the gRPC client exited")
        return line.decode().strip()

    async def calls(self, classes: list[str]) -> list[str]:
        return [await self.call(cls) for cls in classes]


@contextlib.asynccontextmanager
async def grpc_client(xds_port: int, tmp_path: Path) -> AsyncIterator[GrpcClient]:
    bootstrap = tmp_path / "grpc-bootstrap.json"
    bootstrap.write_text(
        json.dumps(
            {
                "xds_servers": [
                    {
                        "server_uri": f"127.0.0.1:{xds_port}",
                        "channel_creds": [{"type": "insecure"}],
                        "server_features": ["xds_v3"],
                    }
                ],
                "node": {
                    "id": CLIENT_NODE,
                    "metadata": {"NAMESPACE": "default", "SERVICE_ACCOUNT": "grpc-client"},
                },
            }
        )
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CLIENT,
        TARGET,
        f"/{SERVICE}/{METHOD}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={"GRPC_XDS_BOOTSTRAP": str(bootstrap), "PATH": ""},
    )
    try:
        yield GrpcClient(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_proxyless_grpc_client_calls_through_xds(tmp_path: Path) -> None:
    manifest = tmp_path / "cluster.yaml"
    async with grpc_backend("gpu-0", GPU0) as gpu_port, grpc_backend("cpu-0", CPU0) as cpu_port:

        def write(gpu_ready: bool) -> None:
            write_manifests(
                manifest,
                [
                    inference_service("llama"),
                    model_pod(
                        "gpu-0", app="llama", ip=GPU0, port=gpu_port, gpu=True, ready=gpu_ready
                    ),
                    model_pod("cpu-0", app="llama", ip=CPU0, port=cpu_port),
                ],
            )

        write(gpu_ready=True)
        async with (
            control_plane(ManifestSource(manifest)) as plane,
            grpc_client(plane.ports["xds"], tmp_path) as client,
        ):
            classes = ["critical", "-", "standard", "sheddable", "CRITICAL", "bogus"]
            assert await client.calls(classes) == ["gpu-0"] * len(classes)
            (conn,) = plane.xds.connections.values()
            assert conn.proxy.proxyless
            assert conn.proxy.node_id == CLIENT_NODE

            # The client follows the endpoints: no GPU pod ready, the fallback serves...
            write(gpu_ready=False)

            async def on(backend: str) -> bool:
                return set(await client.calls(["critical", "-"])) == {backend}

            await eventually(lambda: on("cpu-0"), timeout=10, what="the CPU pod serving")
            # ...and back when it recovers.
            write(gpu_ready=True)
            await eventually(lambda: on("gpu-0"), timeout=10, what="the GPU pod serving")

            # Every type the client asked for was accepted, none rejected.
            status = conn.state.sync_status()
            assert {s["status"] for s in status.values()} == {"SYNCED"}, status
            assert len(status) == 4
            for short in ("LDS", "RDS", "CDS", "EDS"):
                assert metric(plane, "inferlane_xds_acks_total", type=short) >= 1
                assert metric(plane, "inferlane_xds_nacks_total", type=short) == 0
