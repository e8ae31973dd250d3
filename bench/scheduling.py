"""What passing the class to vLLM's scheduler costs at the pod's sidecar.

``python -m bench.scheduling`` runs one real Envoy with two routes to the same echo
backend: one plain, one with the Lua script that writes the class into the body
(``routing.scheduling``, as ``inferlane.io/scheduling-policy: priority`` configures it).
It sends the same requests through each, one at a time, for prompt bodies of several
sizes, and reports the latency each route adds per request (p50 and p99 of the
difference between the two routes' medians over alternating rounds, so drift on this
shared machine hits both alike).

What it measures is the sidecar's cost alone: buffering the body and one Lua call. What
the scheduling buys (critical first at a full batch) is a property of the model server;
the simulator models it (``bench.gpu_sim``, ``--scheduling-policy priority``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
from collections.abc import Sequence
from typing import Any, Final

import aiohttp
from aiohttp import web

from bench.envoy import EnvoyMissing, envoy_binary
from bench.testbed import StaticEnvoy
from mesh.model import Priority
from routing import scheduling

_HCM: Final = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
_ROUTER: Final = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_LUA: Final = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
_LUA_ROUTE: Final = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute"
SIZES: Final = (1_024, 32_768, 262_144)


def _bootstrap(listen: int, backend: int) -> dict[str, Any]:
    lua_route = {
        "match": {"prefix": "/lua"},
        "route": {"cluster": "echo", "prefix_rewrite": "/"},
        "request_body_buffer_limit": scheduling.MAX_BODY_BYTES,
        "typed_per_filter_config": {
            scheduling.LUA_FILTER: {
                "@type": _LUA_ROUTE,
                "source_code": {"inline_string": scheduling.script(Priority.SHEDDABLE)},
            }
        },
    }
    plain_route = {"match": {"prefix": "/"}, "route": {"cluster": "echo"}}
    manager = {
        "@type": _HCM,
        "stat_prefix": "bench",
        "route_config": {
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [lua_route, plain_route]}]
        },
        "http_filters": [
            {"name": scheduling.LUA_FILTER, "typed_config": {"@type": _LUA}},
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
    }
    address = {"socket_address": {"address": "127.0.0.1", "port_value": backend}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "echo",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "echo",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
                    },
                }
            ],
        },
    }


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(text=str(len(body)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def measure(rounds: int, per_round: int) -> list[tuple[int, float, float, float]]:
    """(body bytes, plain median ms, Lua median ms, p99 of the per-round difference)."""
    app = web.Application(client_max_size=2 * max(SIZES))
    app.router.add_post("/{tail:.*}", _echo)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    backend = _free_port()
    await web.TCPSite(runner, "127.0.0.1", backend).start()
    listen = _free_port()
    envoy = StaticEnvoy(_bootstrap(listen, backend))
    out = []
    try:
        await envoy.start()
        async with aiohttp.ClientSession() as session:
            loop = asyncio.get_running_loop()

            async def timed(path: str, body: bytes) -> float:
                started = loop.time()
                async with session.post(f"http://127.0.0.1:{listen}{path}", data=body) as r:
                    await r.read()
                    assert r.status == 200, r.status
                return (loop.time() - started) * 1000

            for size in SIZES:
                prompt = "w" * (size - 40)
                body = json.dumps({"model": "llama", "prompt": prompt}).encode()
                plain, lua, diffs = [], [], []
                for _ in range(rounds):
                    a = [await timed("/", body) for _ in range(per_round)]
                    b = [await timed("/lua", body) for _ in range(per_round)]
                    plain += a
                    lua += b
                    diffs.append(statistics.median(b) - statistics.median(a))
                diffs.sort()
                p99 = diffs[min(len(diffs) - 1, int(0.99 * len(diffs)))]
                out.append((len(body), statistics.median(plain), statistics.median(lua), p99))
    finally:
        await envoy.stop()
        await runner.cleanup()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scheduling", description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        envoy_binary()
        rows = asyncio.run(measure(args.rounds, args.per_round))
    except EnvoyMissing as exc:
        print(f"bench.scheduling: {exc}", file=sys.stderr)
        return 2
    print("| body | plain p50 | with the class written p50 | added (p50) | added (p99 of rounds) |")
    print("|---:|---:|---:|---:|---:|")
    for size, plain, lua, p99 in rows:
        print(
            f"| {size / 1024:.0f} KiB | {plain:.2f} ms | {lua:.2f} ms | "
            f"{lua - plain:+.2f} ms | {p99:+.2f} ms |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
