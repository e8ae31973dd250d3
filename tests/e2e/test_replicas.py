"""Two ``inferlane serve`` replicas on the same inputs: identical versions, and a proxy that
loses its replica reconnects to the other without a failed request (issue 6, item 4).

The replicas share nothing but their inputs and the CA (one ``--ca-dir`` here, as
``--ca-secret`` shares it in a cluster): versions are hashes of the serialized resources,
so any replica computes what any other would, and workload certificates derive from the
CA's key, the identity and the renewal period, so the sidecar's secrets are the same
bytes in both and the failover sends it no secret either.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import bench.envoy
from tests.e2e.harness import (
    Client,
    envoy_versions,
    http_session,
    inference_service,
    model_pod,
    sidecar,
    write_manifests,
)
from tests.e2e.test_restart import (
    CLIENT_POD,
    CLIENT_SA,
    LLAMA,
    TYPES,
    Serve,
    Steady,
    _wait_reconnected,
    assert_mid_period,
    serving,
    with_secrets,
)
from tests.support.backends import echo_server
from tests.support.envoy import require_envoy, running_envoy
from tests.support.wait import eventually
from xds_server.sidecar.bootstrap import BootstrapOptions, bootstrap

pytestmark = pytest.mark.envoy

GPU0, CPU0, EMBED0 = "127.0.39.1", "127.0.39.3", "127.0.39.5"


def two_replica_bootstrap(second_port: int) -> Callable[[BootstrapOptions], str]:
    """The usual bootstrap, with the xDS cluster listing both replicas, as a Kubernetes
    Service in front of the Deployment would, and fast ADS reconnects."""

    def make(opts: BootstrapOptions) -> str:
        document = bootstrap(opts)
        for service in document["dynamic_resources"]["ads_config"]["grpc_services"]:
            service["envoy_grpc"]["retry_policy"] = {
                "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.2s"}
            }
        xds = document["static_resources"]["clusters"][0]
        endpoints = xds["load_assignment"]["endpoints"][0]["lb_endpoints"]
        endpoints.append(
            {
                "endpoint": {
                    "address": {
                        "socket_address": {"address": opts.xds_host, "port_value": second_port}
                    }
                }
            }
        )
        return yaml.safe_dump(document, sort_keys=False)

    return make


async def test_replica_failover_keeps_versions_and_traffic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_envoy()
    assert_mid_period()
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    client_ip = "127.0.39.10"
    async with (
        echo_server("gpu-0", host=GPU0) as gpu0,
        echo_server("cpu-0", host=CPU0) as cpu0,
        contextlib.AsyncExitStack() as stack,
    ):
        write_manifests(
            manifests / "llama.yaml",
            [
                inference_service("llama"),
                model_pod("gpu-0", app="llama", ip=GPU0, port=gpu0.port, gpu=True),
                model_pod("cpu-0", app="llama", ip=CPU0, port=cpu0.port),
                *with_secrets(client_ip, EMBED0),
            ],
        )
        session = await stack.enter_async_context(http_session())
        ca_dir = tmp_path / "ca"
        a = await stack.enter_async_context(serving(manifests, 0, tmp_path / "a", ca_dir=ca_dir))
        b = await stack.enter_async_context(serving(manifests, 0, tmp_path / "b", ca_dir=ca_dir))
        monkeypatch.setattr(bench.envoy, "bootstrap_yaml", two_replica_bootstrap(b.ports["xds"]))
        node_id, metadata, outbound = sidecar(client_ip, CLIENT_POD, service_account=CLIENT_SA)
        envoy = await stack.enter_async_context(
            running_envoy(node_id, a.ports["xds"], metadata=metadata)
        )
        client = Client(session, client_ip, outbound)
        await client.wait_served_by(LLAMA, ["gpu-0"])

        async def serving_replica() -> Serve | None:
            for replica in (a, b):
                connections = await replica.json(session, "/debug/connections")
                if any(c["node_id"] == node_id for c in connections):
                    return replica
            return None

        active = await eventually(serving_replica, what="the Envoy connected to a replica")
        assert active is not None
        other = b if active is a else a
        await _wait_reconnected(session, active, node_id)
        before = await envoy_versions(envoy)
        assert {("secret", "default"), ("secret", "ROOTCA")} <= set(before)
        dump = await active.json(session, f"/debug/config_dump?proxy={node_id}")

        steady = Steady(client)
        loop = asyncio.create_task(steady.run(), name="steady-requests")
        try:
            await steady.more(20)
            active.proc.kill()
            await active.proc.wait()
            await _wait_reconnected(session, other, node_id)
            await steady.more(20)
        finally:
            steady.stop()
            await loop
        assert steady.failures == []
        assert cpu0.requests == 0
        # The other replica computed the very same versions and had nothing to send.
        assert await envoy_versions(envoy) == before
        other_dump = await other.json(session, f"/debug/config_dump?proxy={node_id}")
        versions = {
            t: {n: r["version"] for n, r in by_name.items()}
            for t, by_name in dump["resources"].items()
        }
        other_versions = {
            t: {n: r["version"] for n, r in by_name.items()}
            for t, by_name in other_dump["resources"].items()
        }
        assert other_versions == versions
        sent = await other.samples(session, "inferlane_xds_resources_sent_total")
        assert {t: sent.get(t, 0) for t in TYPES} == dict.fromkeys(TYPES, 0)
