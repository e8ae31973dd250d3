"""Metrics of several processes, summed into one control plane's ``/metrics``.

Each worker keeps its own registry and sends its samples when the primary asks. Counters
and histograms are summed over the primary and every worker; a worker that died keeps
contributing its last counts, so no sum ever goes backwards (Prometheus would read that
as a counter reset). Gauges are summed over live processes only (open streams are a sum);
gauges every process sets alike (the config generation) are taken from the primary.

prometheus_client's multiprocess mode would do the summing through files, but it is
chosen per process by an environment variable at import time, for every registry at
once; this keeps each server's registry its own, as the tests and benchmarks need.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

#: (name, type, documentation, [(sample name, labels, value)]).
Family = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]

#: Gauges every process sets to the same value: the primary's is the one.
SHARED_GAUGES = frozenset({"inferlane_xds_config_generation"})


def families(registry: CollectorRegistry) -> list[Family]:
    """A registry's samples as plain, picklable data (``_created`` samples left out)."""
    return [
        (
            m.name,
            m.type,
            m.documentation,
            [
                (s.name, dict(s.labels), s.value)
                for s in m.samples
                if not s.name.endswith("_created")
            ],
        )
        for m in registry.collect()
    ]


def _created(sample: str) -> bool:
    return sample.endswith("_created")


class SummedMetrics:
    """A collector: the primary's registry plus every worker's samples, summed."""

    def __init__(self, own: CollectorRegistry) -> None:
        self.own = own
        #: Worker index -> its latest samples, while it lives.
        self.live: dict[int, list[Family]] = {}
        #: The last counts of workers that died (counters and histograms only).
        self.retired: list[list[Family]] = []

    def update(self, worker: int, samples: list[Family]) -> None:
        self.live[worker] = samples

    def retire(self, worker: int) -> None:
        samples = self.live.pop(worker, None)
        if samples is not None:
            self.retired.append([f for f in samples if f[1] != "gauge"])

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        sources: list[tuple[list[Family], bool]] = [(families(self.own), True)]
        sources += [(f, False) for f in self.live.values()]
        sources += [(f, False) for f in self.retired]
        for samples, own in sources:
            for name, kind, doc, values in samples:
                if not own and name in SHARED_GAUGES:
                    continue
                if name not in merged:
                    merged[name] = Metric(name, doc, kind)
                    sums[name] = {}
                into = sums[name]
                for sample, labels_of, value in values:
                    key = (sample, tuple(sorted(labels_of.items())))
                    into[key] = into.get(key, 0.0) + value
        for name, metric in merged.items():
            for (sample, labels), value in sums[name].items():
                metric.add_sample(sample, dict(labels), value)
            yield metric


def registry_of(collector: Any, extra: Iterable[Any] = ()) -> CollectorRegistry:
    """A registry that exposes ``collector`` (and ``extra`` collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    for c in (collector, *extra):
        registry.register(c)
    return registry
