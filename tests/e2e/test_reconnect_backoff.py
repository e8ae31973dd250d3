"""How a proxy reconnects when its ADS stream fails: the bootstrap's back-off, in Envoy."""

from __future__ import annotations

import asyncio

import pytest

from bench.envoy import Envoy
from tests.support.envoy import require_envoy
from tests.support.wait import eventually
from xds_server.sidecar.bootstrap import BootstrapError, BootstrapOptions, bootstrap

NODE = "sidecar~10.0.0.1~chat-0.default~default.svc.cluster.local"


def test_the_bootstrap_caps_the_reconnect_back_off() -> None:
    [service] = bootstrap(BootstrapOptions(node_id=NODE))["dynamic_resources"]["ads_config"][
        "grpc_services"
    ]
    assert service["envoy_grpc"]["retry_policy"] == {
        "retry_back_off": {"base_interval": "0.5s", "max_interval": "4s"}
    }
    with pytest.raises(BootstrapError, match="back-off"):
        bootstrap(BootstrapOptions(node_id=NODE, retry_base_s=2, retry_max_s=1))


@pytest.mark.envoy
async def test_envoy_retries_a_failing_stream_within_the_cap() -> None:
    """A server that accepts and drops every connection: Envoy's default back-off (up to
    30 s) would try about five times in five seconds; capped at 0.2 s, it tries dozens."""
    require_envoy()
    attempts = 0

    async def drop(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    opts = BootstrapOptions(node_id=NODE, xds_port=port, admin_port=0, retry_base_s=0.05,
                            retry_max_s=0.2)  # fmt: skip
    envoy = Envoy(opts)
    try:
        await envoy.start()

        async def retried() -> bool:
            return attempts >= 12

        await eventually(retried, timeout=5, what="12 ADS connection attempts")
    finally:
        await envoy.stop()
        server.close()
        await server.wait_closed()
