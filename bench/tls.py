"""Convergence over TLS: gRPC's own TLS against the Python relay it replaced.

``python -m bench.tls`` runs each scenario in two modes, side by side in one run:

* **relay** (the baseline): TLS terminated by Python's ``ssl`` module on the control
  plane's event loop, every byte relayed to the gRPC server's plaintext loopback port.
  This is how the TLS xDS port was served before (grpcio cannot ask for an optional client
  certificate); :class:`Relay` keeps that byte path runnable for the comparison;
* **grpc**: TLS terminated by gRPC's core (BoringSSL) on the mutual-TLS port, as
  ``inferlane serve`` serves 15011 now.

The scenarios are ``bench.convergence``'s: real Envoys (``--envoys``) and synthetic SotW
streams in a separate process (``--streams``, ``--per-channel`` of them on each
connection: one by default, as each proxy has a connection of its own), each connecting
over mutual TLS with a workload certificate from a fresh mesh CA, then several changes of
the world that change every proxy's routes. Reported per scenario and mode: p50 and p99
of the seconds from a change to each proxy's ACK, the slowest "all ACKed", the time to
connect and sync, and the control plane's CPU seconds for the whole scenario (connecting
included: the relay also does the TLS handshakes on the event loop). Each scenario runs
``--rounds`` times per mode, in alternating order; then the ratios relay / grpc of the
medians over the rounds.

Streams pass the default authorizer here: the modes differ in the byte path alone. The
machine's cores are shared by the control plane, the Envoys and the synthetic clients, so
these are upper bounds of what a dedicated control plane would show.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import ssl
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from bench.convergence import (
    EXAMPLE,
    HEADER,
    PlaneFactory,
    Result,
    envoy_scenario,
    synthetic_scenario,
)
from mesh.manifests import load_world
from mesh.model import World
from mtls.ca import CertificateAuthority
from routing.generator import MeshGenerator
from xds_server.ads.cache import ConfigCache
from xds_server.ads.server import SERVER_OPTIONS, XdsServer
from xds_server.auth.transport import server_credentials
from xds_server.sidecar.bootstrap import TlsSettings

MODES = ("relay", "grpc")
#: The names the control plane's certificate carries; proxies check ``inferlane``.
SERVER_NAMES = ["inferlane", "127.0.0.1"]


class Relay:
    """The baseline byte path: TLS in Python's ``ssl`` on the event loop, relayed to a
    plaintext port (a client certificate asked for, and verified when sent, as before)."""

    def __init__(self, context: ssl.SSLContext, backend_port: int) -> None:
        self._context = context
        self._backend_port = backend_port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", 0, ssl=self._context, ssl_handshake_timeout=10
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._backend_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()

        pumps = [
            asyncio.create_task(pump(reader, up_writer)),
            asyncio.create_task(pump(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (writer, up_writer):
                w.transport.abort()


def _relay_context(ca: CertificateAuthority, directory: Path) -> ssl.SSLContext:
    issued = ca.issue_server(SERVER_NAMES)
    (directory / "server.crt").write_bytes(issued.chain_pem)
    (directory / "server.key").write_bytes(issued.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(directory / "server.crt", directory / "server.key")
    context.load_verify_locations(cadata=ca.trust_bundle_pem.decode("ascii"))
    context.verify_mode = ssl.CERT_OPTIONAL
    context.set_alpn_protocols(["h2"])
    return context


def tls_plane(mode: str, ca: CertificateAuthority, directory: Path) -> PlaneFactory:
    """A control plane whose proxies connect over TLS, terminated as ``mode`` says."""

    @contextlib.asynccontextmanager
    async def plane(world: World) -> AsyncIterator[tuple[ConfigCache, XdsServer, int]]:
        cache = ConfigCache()
        xds = XdsServer(cache)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        xds.add_to(server)
        relay: Relay | None = None
        if mode == "grpc":
            credentials = await asyncio.to_thread(server_credentials, ca, SERVER_NAMES)
            port = server.add_secure_port("127.0.0.1:0", credentials.mtls)
        else:
            relay = Relay(_relay_context(ca, directory), server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        if relay is not None:
            port = await relay.start()
        cache.update(MeshGenerator(world, {}))
        try:
            yield cache, xds, port
        finally:
            if relay is not None:
                await relay.close()
            await server.stop(None)

    return plane


@dataclasses.dataclass
class Row:
    mode: str
    result: Result
    #: The control plane's CPU seconds (this process) for the whole scenario.
    cpu_s: float


#: The figures compared, as (label, what to read of a row).
FIGURES: tuple[tuple[str, Callable[[Row], float]], ...] = (
    ("p50", lambda r: r.result.p50_ms),
    ("p99", lambda r: r.result.p99_ms),
    ("all ACKed", lambda r: r.result.slowest_all_acked_ms),
    ("connect", lambda r: r.result.connect_s),
    ("control-plane CPU", lambda r: r.cpu_s),
)


def compare(rows: list[Row]) -> str:
    """relay / grpc for each figure, each side the median over its rounds."""
    parts = []
    for label, figure in FIGURES:
        relay, native = (
            statistics.median(figure(r) for r in rows if r.mode == mode) for mode in MODES
        )
        parts.append(f"{label} {relay / native:.2f}x" if native > 0 else f"{label} n/a")
    return "  relay / grpc (medians): " + ", ".join(parts)


async def run(
    envoys: list[int],
    streams: list[int],
    changes: int,
    rate: float,
    *,
    rounds: int = 1,
    per_channel: int = 1,
) -> list[Row]:
    """Each scenario ``rounds`` times in both modes, the order alternating (ABBA), so that
    neither mode always runs first on a warm or a tired machine."""
    world = load_world(EXAMPLE)
    ca = CertificateAuthority.generate()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="inferlane-bench-tls-") as tmp:
        directory = Path(tmp)
        issued = ca.issue_workload("cluster.local", "bench", "client")
        (directory / "root.pem").write_bytes(ca.trust_bundle_pem)
        (directory / "tls.crt").write_bytes(issued.chain_pem)
        (directory / "tls.key").write_bytes(issued.key_pem)
        tls = TlsSettings(
            str(directory / "root.pem"), str(directory / "tls.crt"), str(directory / "tls.key")
        )

        async def scenario(kind: str, n: int, mode: str) -> Row:
            plane = tls_plane(mode, ca, directory)
            started = time.process_time()
            if kind == "envoys":
                result = await envoy_scenario(
                    world, n, changes, plane=plane, tls=tls, scenario=f"Envoy mTLS ({mode})"
                )
            else:
                result = await synthetic_scenario(
                    world,
                    n,
                    changes,
                    rate,
                    plane=plane,
                    tls_dir=directory,
                    per_channel=per_channel,
                    scenario=f"synthetic mTLS ({mode})",
                )
            return Row(mode, result, time.process_time() - started)

        print(f"{'mode':<6} {HEADER} {'CPU s':>7}", flush=True)
        for kind, counts in (("envoys", envoys), ("streams", streams)):
            for n in counts:
                these = []
                for round_ in range(rounds):
                    for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                        row = await scenario(kind, n, mode)
                        print(f"{mode:<6} {row.result.row()} {row.cpu_s:>7.2f}", flush=True)
                        these.append(row)
                rows.extend(these)
                print(compare(these), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--envoys", default="10", help="comma-separated counts of real Envoys")
    p.add_argument("--streams", default="1000", help="counts of synthetic streams")
    p.add_argument("--changes", type=int, default=5, help="changes measured per scenario")
    p.add_argument("--rate", type=float, default=500, help="synthetic streams opened per second")
    p.add_argument("--rounds", type=int, default=4, help="runs of each scenario in each mode")
    p.add_argument(
        "--per-channel", type=int, default=1, help="synthetic streams on each connection"
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()

    def counts(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    rows = asyncio.run(
        run(
            counts(a.envoys),
            counts(a.streams),
            a.changes,
            a.rate,
            rounds=a.rounds,
            per_channel=a.per_channel,
        )
    )
    if a.json:
        a.json.write_text(
            json.dumps(
                [{"mode": r.mode, "cpu_s": r.cpu_s, **dataclasses.asdict(r.result)} for r in rows],
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
