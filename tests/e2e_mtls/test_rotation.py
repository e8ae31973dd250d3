"""Certificate rotation under a steady request loop (issue 4, #2).

Workload certificates live four seconds here, so they are renewed every two (each
identity's renewal period is half the lifetime). A client sidecar sends a request every
few milliseconds through the server sidecar while both rotate several times: no request
may fail, each Envoy's ``/certs`` shows a new serial after each renewal, and the backend
sees new client certificates (the hash in ``x-forwarded-client-cert``) as new connections
are made.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import timedelta
from pathlib import Path

import pytest

from tests.e2e_mtls.harness import (
    SERVICE_PORT,
    XFCC,
    Http,
    Sidecar,
    control_plane,
    header,
    inference_service,
    llama_pod,
    own_serials,
    running,
    settings,
    spiffe,
    workload_pod,
    write_manifests,
)
from tests.support.backends import echo_server
from tests.support.envoy import require_envoy
from tests.support.wait import eventually

pytestmark = pytest.mark.envoy

GPU, CHAT = "127.0.52.1", "127.0.52.10"
LLAMA = f"llama:{SERVICE_PORT}"
TTL = timedelta(seconds=4)
ROTATIONS = 3


async def test_rotation_under_load_fails_no_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_envoy()
    manifest = tmp_path / "mesh.yaml"
    http = Http()
    async with echo_server("gpu-0", host=GPU) as backend:
        write_manifests(
            manifest,
            [
                inference_service("llama"),
                llama_pod("gpu-0", GPU, backend.port),
                workload_pod("chat-0", ip=CHAT, service_account="chat"),
            ],
        )
        server, client = Sidecar(GPU, "gpu-0"), Sidecar(CHAT, "chat-0")
        async with control_plane(manifest, settings(tmp_path / "ca", cert_ttl=TTL)) as plane:
            xds = plane.ports["xds"]
            async with (
                # The server speaks Delta ADS, the client State-of-the-World.
                running(server.options(xds, delta=True)) as server_envoy,
                running(client.options(xds)) as client_envoy,
            ):

                async def served() -> bool:
                    status, body = await http.get(CHAT, client.outbound_port, LLAMA)
                    return status == 200 and body == "gpu-0"

                await eventually(served, timeout=20, what="client -> server sidecar -> gpu-0")
                backend.headers.clear()

                seen: dict[str, set[str]] = {"client": set(), "server": set()}
                failures: list[str] = []
                requests = 0
                stop = asyncio.Event()

                async def watch() -> None:
                    while not stop.is_set():
                        seen["client"] |= await own_serials(client_envoy, spiffe("chat"))
                        seen["server"] |= await own_serials(server_envoy, spiffe("llama"))
                        await asyncio.sleep(0.1)

                async def load() -> None:
                    nonlocal requests
                    while not stop.is_set():
                        requests += 1
                        try:
                            status, body = await http.get(CHAT, client.outbound_port, LLAMA)
                        except Exception as exc:
                            failures.append(repr(exc))
                            continue
                        if (status, body) != (200, "gpu-0"):
                            failures.append(f"{status} {body[:200]}")
                        await asyncio.sleep(0.01)

                tasks = [asyncio.create_task(watch()), asyncio.create_task(load())]
                started = time.monotonic()

                async def rotated() -> bool:
                    return min(len(s) for s in seen.values()) > ROTATIONS

                try:
                    await eventually(rotated, timeout=25, interval=0.2, what="several rotations")
                finally:
                    stop.set()
                    await asyncio.gather(*tasks)
                elapsed = time.monotonic() - started

                assert failures == [], f"{len(failures)} of {requests} failed: {failures[:5]}"
                assert requests > 100
                hashes = {
                    m.group(1)
                    for h in backend.headers
                    if (m := re.search(r"Hash=([0-9a-f]+)", header(h, XFCC) or ""))
                }
                # New connections (made at least every second) present new certificates.
                assert len(hashes) >= ROTATIONS
                assert plane.secrets is not None and plane.secrets.renewed >= 2 * ROTATIONS
                # Renewal at half life: about two seconds per rotation, not continuously.
                assert elapsed > ROTATIONS * 1.2
