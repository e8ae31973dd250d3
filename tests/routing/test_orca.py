"""Why endpoint choice does not use ORCA: what Envoy 1.40 makes of vLLM's load reports.

Envoy's ``client_side_weighted_round_robin`` sets a host's weight to ``rps_fractional /
utilization`` from the ORCA reports in its responses, and ignores a report without a
positive ``rps_fractional``. vLLM's reports carry only ``named_metrics``
(``kv_cache_usage_perc``, ``num_requests_waiting``), and only on non-streamed responses.
This test runs a real Envoy with that policy over two backends: the ``JSON`` and
``TEXT`` forms are parsed (a report with ``rps_fractional`` moves the weights), but
vLLM's own report leaves every weight at 1, which is plain round robin. If a later Envoy
or vLLM changes this, this test says so. docs/performance.md has the comparison.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.routing.envoy_static import ENVOY, running_envoy

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not ENVOY.exists(), reason="no envoy binary in the venv"),
]

_CSWRR = (
    "type.googleapis.com/envoy.extensions.load_balancing_policies."
    "client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin"
)
_HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


class _Reporting(BaseHTTPRequestHandler):
    """Answers with an ORCA header in the form its server was given (``{kv}`` filled)."""

    def do_GET(self) -> None:
        server: Any = self.server
        self.send_response(200)
        self.send_header("endpoint-load-metrics", server.report.format(kv=server.kv))
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def backends() -> Iterator[list[ThreadingHTTPServer]]:
    """Two backends: one nearly idle (KV cache 10 %), one nearly full (90 %)."""
    servers: list[Any] = []
    try:
        for kv in (0.1, 0.9):
            server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Reporting)
            server.kv, server.report = kv, ""
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
        yield servers
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def _bootstrap(ports: list[int]) -> dict[str, Any]:
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "pool"},
        # What a route would add to get vLLM's reports.
        "request_headers_to_add": [
            {"header": {"key": "endpoint-load-metrics-format", "value": "JSON"}}
        ],
    }
    manager = {
        "@type": _HCM,
        "stat_prefix": "orca",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    hosts = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
        for p in ports
    ]
    policy = {
        "@type": _CSWRR,
        "blackout_period": "0s",
        "weight_update_period": "0.05s",
        "metric_names_for_computing_utilization": ["named_metrics.kv_cache_usage_perc"],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "orca",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
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
                    "name": "pool",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_balancing_policy": {
                        "policies": [
                            {
                                "typed_extension_config": {
                                    "name": "cswrr",
                                    "typed_config": policy,
                                }
                            }
                        ]
                    },
                    "load_assignment": {
                        "cluster_name": "pool",
                        "endpoints": [{"lb_endpoints": hosts}],
                    },
                }
            ],
        },
    }


def _weights(admin: str) -> list[int]:
    with urllib.request.urlopen(f"http://{admin}/clusters?format=json", timeout=5) as r:
        data = json.load(r)
    (pool,) = [c for c in data["cluster_statuses"] if c["name"] == "pool"]
    return sorted(int(h.get("weight", 1)) for h in pool["host_statuses"])


@pytest.mark.parametrize(
    ("report", "weighed"),
    [
        # vLLM's report, exactly: parsed, but no rps_fractional, so no weight.
        ('JSON {{"named_metrics": {{"kv_cache_usage_perc": {kv}, "num_requests_waiting": 0.0}}}}',
         False),
        ("TEXT named_metrics.kv_cache_usage_perc={kv}, named_metrics.num_requests_waiting=0.0",
         False),
        # The same with rps_fractional: both forms move the weights.
        ('JSON {{"rps_fractional": 10, "named_metrics": {{"kv_cache_usage_perc": {kv}}}}}', True),
        ("TEXT rps_fractional=10, named_metrics.kv_cache_usage_perc={kv}", True),
    ],
)  # fmt: skip
def test_envoy_weighs_orca_reports_only_with_a_request_rate(
    backends: list[Any], report: str, weighed: bool, tmp_path: Path
) -> None:
    for server in backends:
        server.report = report
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(_bootstrap([s.server_address[1] for s in backends])))
    with running_envoy(path, tmp_path) as ports:
        admin = (tmp_path / "admin.address").read_text().strip()
        for _ in range(40):
            urllib.request.urlopen(f"http://127.0.0.1:{ports['orca']}/", timeout=5).read()
        # 10 / 0.9 and 10 / 0.1: the idle backend would weigh nine times the full one.
        expected = [11, 100] if weighed else [1, 1]
        deadline = time.monotonic() + 5  # weights are recomputed every 50 ms
        while (weights := _weights(admin)) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert weights == expected
