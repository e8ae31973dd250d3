"""Metrics of the primary and its workers, summed as one control plane's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from xds_server.ads.metrics import XdsMetrics
from xds_server.workers.aggregate import SummedMetrics, families, registry_of


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_counters_sum_and_a_dead_workers_counts_stay() -> None:
    primary, worker1, worker2 = XdsMetrics(), XdsMetrics(), XdsMetrics()
    for m, pushes, connected in ((primary, 1, 1), (worker1, 10, 5), (worker2, 100, 7)):
        m.pushes.labels("RDS").inc(pushes)
        m.connected.labels("sotw").set(connected)
        m.generation.set(4)
        m.convergence.labels("RDS").observe(0.02)
    summed = SummedMetrics(primary.registry)
    summed.update(1, families(worker1.registry))
    summed.update(2, families(worker2.registry))
    registry = registry_of(summed)
    assert _value(registry, "inferlane_xds_pushes_total", type="RDS") == 111
    assert _value(registry, "inferlane_xds_connected_proxies", mode="sotw") == 13
    # Every process has the same generation: it is not a sum.
    assert _value(registry, "inferlane_xds_config_generation") == 4
    assert _value(registry, "inferlane_xds_convergence_seconds_count", type="RDS") == 3
    assert _value(registry, "inferlane_xds_convergence_seconds_bucket", type="RDS", le="0.025") == 3
    # Worker 2 dies: its streams are gone, its counts are not (no counter goes backwards).
    summed.retire(2)
    assert _value(registry, "inferlane_xds_pushes_total", type="RDS") == 111
    assert _value(registry, "inferlane_xds_connected_proxies", mode="sotw") == 6
    # Its replacement starts from zero and adds on.
    fresh = XdsMetrics()
    fresh.pushes.labels("RDS").inc(2)
    summed.update(2, families(fresh.registry))
    assert _value(registry, "inferlane_xds_pushes_total", type="RDS") == 113
