"""Prometheus metrics of the xDS server, on a registry of its own.

Each server owns its registry, so several servers in one process (tests, benchmarks)
never collide, and ``/metrics`` shows exactly one server's view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mesh import xds

#: Buckets from 1 ms to 10 s: a push is usually live in milliseconds, Istio's production
#: p90 is 1.5 s, and anything past 10 s is a stall.
CONVERGENCE_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True)
class TypeMetrics:
    """One type's labelled children, resolved once: ``labels()`` is too slow per push."""

    pushes: Any
    push_bytes: Any
    resources_sent: Any
    acks: Any
    nacks: Any
    stale: Any
    convergence: Any


class XdsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.connected = Gauge(
            "inferlane_xds_connected_proxies", "Open ADS streams.", ["mode"], registry=r
        )
        self.pushes = Counter(
            "inferlane_xds_pushes_total", "Responses sent, by type.", ["type"], registry=r
        )
        self.resources_sent = Counter(
            "inferlane_xds_resources_sent_total",
            "Resources carried by responses, by type.",
            ["type"],
            registry=r,
        )
        self.push_bytes = Counter(
            "inferlane_xds_push_bytes_total", "Bytes of responses sent.", ["type"], registry=r
        )
        self.nacks = Counter(
            "inferlane_xds_nacks_total",
            "Responses a proxy rejected, by type.",
            ["type"],
            registry=r,
        )
        self.acks = Counter(
            "inferlane_xds_acks_total", "Responses a proxy accepted, by type.", ["type"], registry=r
        )
        self.stale = Counter(
            "inferlane_xds_stale_requests_total",
            "Requests dropped for a superseded nonce.",
            ["type"],
            registry=r,
        )
        self.rejected_streams = Counter(
            "inferlane_xds_rejected_streams_total",
            "Streams closed for a bad request or a client past a bound, by reason "
            "(over_limit: a StreamLimits bound; write_timeout: the client stopped reading).",
            ["reason"],
            registry=r,
        )
        self.throttled_reads = Counter(
            "inferlane_xds_throttled_reads_total",
            "Times a stream stopped reading because the client sent requests faster than "
            "they were applied (its inbox was full).",
            registry=r,
        )
        self.convergence = Histogram(
            "inferlane_xds_convergence_seconds",
            "From a config change to the proxy's ACK of it.",
            ["type"],
            buckets=CONVERGENCE_BUCKETS,
            registry=r,
        )
        self.generation_failures = Counter(
            "inferlane_xds_generation_failures_total",
            "Snapshots that could not be generated; the proxy keeps its last config.",
            registry=r,
        )
        self.push_triggers = Counter(
            "inferlane_xds_push_triggers_total",
            "Pushes by the reasons they carry (world, proxy, secret, adaptive); a push with "
            "several reasons counts once under each.",
            ["reason"],
            registry=r,
        )
        self.generation = Gauge(
            "inferlane_xds_config_generation", "The current config generation.", registry=r
        )

        self._by_type: dict[str, TypeMetrics] = {}

    def of(self, type_url: str) -> TypeMetrics:
        found = self._by_type.get(type_url)
        if found is None:
            t = xds.short(type_url)
            found = self._by_type[type_url] = TypeMetrics(
                pushes=self.pushes.labels(t),
                push_bytes=self.push_bytes.labels(t),
                resources_sent=self.resources_sent.labels(t),
                acks=self.acks.labels(t),
                nacks=self.nacks.labels(t),
                stale=self.stale.labels(t),
                convergence=self.convergence.labels(t),
            )
        return found
