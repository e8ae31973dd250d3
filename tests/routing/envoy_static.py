"""Turn generated xDS resources into a static Envoy bootstrap, and run a real Envoy on it.

RDS becomes an inline ``route_config`` and EDS clusters become STATIC clusters with their
ClusterLoadAssignment inlined, so Envoy checks the very messages inferlane would push.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from mesh import xds
from routing.protos import pack

ENVOY = Path(sys.executable).parent / "envoy"
_HCM_TYPE = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name


def _inline_routes(listener: Any, routes: Mapping[str, Any]) -> Any:
    static = type(listener)()
    static.CopyFrom(listener)
    for chain in static.filter_chains:
        for network_filter in chain.filters:
            if network_filter.typed_config.type_url != _HCM_TYPE:
                continue
            manager = hcm_pb2.HttpConnectionManager()
            network_filter.typed_config.Unpack(manager)
            name = manager.rds.route_config_name
            manager.ClearField("rds")
            manager.route_config.CopyFrom(routes[name])
            network_filter.typed_config.CopyFrom(pack(manager))
    return static


def _static_cluster(cluster: Any, assignments: Mapping[str, Any]) -> Any:
    static = cluster_pb2.Cluster()
    static.CopyFrom(cluster)
    if static.type == cluster_pb2.Cluster.EDS:
        static.ClearField("eds_cluster_config")
        static.type = cluster_pb2.Cluster.STATIC
        static.load_assignment.CopyFrom(assignments[static.name])
    return static


def static_bootstrap(
    resources: Mapping[str, Sequence[Any]],
    *,
    keep_listener: Callable[[Any], bool] = lambda _: True,
    edit_assignment: Callable[[Any], None] = lambda _: None,
) -> Any:
    routes = {r.name: r for r in resources[xds.ROUTE]}
    assignments = {}
    for assignment in resources[xds.ENDPOINT]:
        edited = type(assignment)()
        edited.CopyFrom(assignment)
        edit_assignment(edited)
        assignments[edited.cluster_name] = edited
    bootstrap = bootstrap_pb2.Bootstrap()
    bootstrap.node.id = "test~127.0.0.1~test.default~default.svc.cluster.local"
    bootstrap.node.cluster = "test"
    for listener in resources[xds.LISTENER]:
        if keep_listener(listener):
            bootstrap.static_resources.listeners.append(_inline_routes(listener, routes))
    for cluster in resources[xds.CLUSTER]:
        bootstrap.static_resources.clusters.append(_static_cluster(cluster, assignments))
    admin = bootstrap.admin.address.socket_address
    admin.address, admin.port_value = "127.0.0.1", 0
    return bootstrap


def write_bootstrap(bootstrap: Any, path: Path) -> Path:
    path.write_text(json_format.MessageToJson(bootstrap))
    return path


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _poll(check: Callable[[], Any], deadline_s: float, what: str) -> Any:
    deadline = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (OSError, ValueError) as exc:
            last = exc
            result = None
        if result:
            return result
        time.sleep(0.02)
    raise TimeoutError(f"{what} not ready after {deadline_s}s (last error: {last})")


@contextlib.contextmanager
def running_envoy(path: Path, workdir: Path) -> Iterator[dict[str, int]]:
    """Run Envoy on ``path``; yield ``{listener name: bound port}`` once it is ready."""
    admin_file = workdir / "admin.address"
    log = (workdir / "envoy.log").open("w")
    process = subprocess.Popen(
        [
            str(ENVOY),
            "-c",
            str(path),
            "--admin-address-path",
            str(admin_file),
            "--use-dynamic-base-id",
            "--concurrency",
            "1",
            "--log-level",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        admin = _poll(lambda: admin_file.read_text().strip(), 20, "Envoy admin address")

        def listener_ports() -> dict[str, int]:
            if process.poll() is not None:
                raise RuntimeError((workdir / "envoy.log").read_text())
            with urllib.request.urlopen(f"http://{admin}/ready", timeout=2) as ready:
                if ready.read().strip() != b"LIVE":
                    return {}
            with urllib.request.urlopen(f"http://{admin}/listeners?format=json", timeout=2) as r:
                statuses = json.load(r)["listener_statuses"]
            return {
                s["name"]: int(s["local_address"]["socket_address"]["port_value"]) for s in statuses
            }

        yield _poll(listener_ports, 20, "Envoy listeners")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
