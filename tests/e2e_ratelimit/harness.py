"""Shared pieces of the rate-limit end-to-end tests: a control plane with rate-limit settings.

Pod IPs are loopback addresses of each module's own (``127.0.7N.x``), so modules never clash
with ``tests/e2e`` (127.0.3N.x), ``tests/e2e_mtls`` (127.0.5N.x) or the demo. Manifests,
sidecars and clients come from the mTLS harness: backends are reached through their own
sidecar over mTLS, as in a real mesh.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from google.protobuf import json_format

from bench.envoy import Envoy
from mesh.manifests import ManifestSource
from tests.e2e import harness as e2e
from xds_server.ads.debounce import DebounceSettings
from xds_server.app import ControlPlane, ServeSettings
from xds_server.auth.settings import SecuritySettings
from xds_server.rls.runtime import RateLimitSettings

LOCAL_FILTER = "envoy.filters.http.local_ratelimit"


def serve_settings(ca_dir: Path, ratelimit: RateLimitSettings) -> ServeSettings:
    return ServeSettings(
        host="127.0.0.1",
        xds_port=0,
        admin_port=0,
        debounce=DebounceSettings(quiet=0.02, max_delay=0.2),
        shutdown_grace=0.2,
        security=SecuritySettings(ca_dir=ca_dir),
        ratelimit=ratelimit,
    )


def control_plane(
    manifest: Path, settings: ServeSettings
) -> contextlib.AbstractAsyncContextManager[ControlPlane]:
    """A ControlPlane on ``manifest``, in this event loop; yields once its world is loaded."""
    return e2e.control_plane(ManifestSource(manifest, poll_interval=0.05), settings)


admin_get = e2e.admin_text


def sample(metrics_text: str, name: str, **labels: str) -> float | None:
    """One sample of a Prometheus text page (None when the series is absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


async def inbound_bucket_ms(envoy: Envoy, priority: str) -> float | None:
    """Milliseconds per token of ``priority``'s bucket on Envoy's inbound route config, as
    Envoy holds it (None when it has none): fill interval over tokens per fill."""
    dump = await envoy.admin_json("/config_dump?resource=dynamic_route_configs")
    for entry in dump.get("configs", []):
        config = entry.get("route_config", {})
        if config.get("name") != "inbound":
            continue
        for vhost in config.get("virtual_hosts", []):
            packed = vhost.get("typed_per_filter_config", {}).get(LOCAL_FILTER)
            if packed is None:
                continue
            limit = local_rate_limit_pb2.LocalRateLimit()
            body = {k: v for k, v in packed.items() if k != "@type"}
            json_format.ParseDict(body, limit)
            for d in limit.descriptors:
                if d.entries[0].value == priority:
                    bucket = d.token_bucket
                    return float(
                        bucket.fill_interval.ToMilliseconds() / bucket.tokens_per_fill.value
                    )
    return None


async def inbound_cap(envoy: Envoy, priority: str) -> int | None:
    """The most requests of ``priority`` the sidecar's inbound cluster admits at once, as
    Envoy holds it (its DEFAULT circuit-breaker threshold); None without that cluster."""
    dump = await envoy.admin_json("/config_dump?resource=dynamic_active_clusters")
    for entry in dump.get("configs", []):
        cluster = entry.get("cluster", {})
        name = cluster.get("name", "")
        if name.startswith("inbound|") and name.split("|")[2] == priority:
            thresholds = cluster.get("circuit_breakers", {}).get("thresholds", [{}])
            return int(thresholds[0].get("max_requests", 1024))
    return None


async def rds_updates(envoy: Envoy, route_config: str = "inbound") -> int:
    """Updates of one route configuration Envoy accepted over its lifetime. (A SotW route
    response carries every route configuration, so each subscription counts each push.)"""
    stats = await envoy.stats("rds")
    return sum(v for k, v in stats.items() if k.endswith(f".rds.{route_config}.update_success"))


def statuses(results: list[tuple[int, Any]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for status, _ in results:
        out[status] = out.get(status, 0) + 1
    return out
