"""The pure parts of bench/adaptive.py: manifest edits, warm-up trimming, the control spec,
the options' checks and the RLS table. (The benchmark itself runs for minutes; its
numbers are in docs/performance.md.)"""

from __future__ import annotations

import dataclasses

import pytest

from bench.adaptive import (
    ADAPTIVE_ANNOTATION,
    CRITICAL_ONLY,
    RELOCATED,
    STATIC,
    AdaptiveBenchOptions,
    DriveResult,
    RlsOverhead,
    _scenario_spec,
    after_warmup,
    annotate_llama,
    bench_pods,
    format_rls,
    main,
    relocate,
)
from bench.demo import ScenarioResult, pod_configs
from bench.load import LoadResult, LoadSpec, RequestRecord
from tests.mesh.objects import pod, service


def test_annotations_and_pod_addresses_are_rewritten_on_a_copy() -> None:
    docs = [service("llama", annotations={"a": "1"}), pod("gpu-0", ip="127.0.0.11")]
    edited = annotate_llama(docs, {ADAPTIVE_ANNOTATION: "true", "a": None})
    assert edited[0]["metadata"]["annotations"] == {ADAPTIVE_ANNOTATION: "true"}
    assert docs[0]["metadata"]["annotations"] == {"a": "1"}
    moved = relocate(docs, RELOCATED)
    assert moved[1]["status"]["podIP"] == "127.0.1.11"
    assert docs[1]["status"]["podIP"] == "127.0.0.11"
    assert {p.host for p in bench_pods()} == {RELOCATED[c.host] for c in pod_configs()}


def _record(cls: str, started_s: float) -> RequestRecord:
    return RequestRecord(cls=cls, status=200, latency_ms=150.0, served_by="x", started_s=started_s)


def test_warmup_is_cut_and_the_control_sends_only_critical() -> None:
    spec = LoadSpec(url="http://x", rate_rps=100.0, duration_s=10.0)
    records = (_record("critical", 0.5), _record("sheddable", 4.9), _record("critical", 5.0))
    run = ScenarioResult(STATIC, LoadResult(spec, records, 10.0), {})
    assert [r.started_s for r in after_warmup(run, 5.0).load.records] == [5.0]
    control = _scenario_spec(CRITICAL_ONLY, spec)
    assert dict(control.mix) == {"critical": 1.0}
    assert control.rate_rps == pytest.approx(30.0)  # the default mix is 30 % critical
    assert _scenario_spec(STATIC, spec) is spec


def test_bad_options_are_refused() -> None:
    for changes in ({"loads": (0.0,)}, {"scenarios": ("nope",)}, {"repeat": 0}):
        with pytest.raises(ValueError):
            AdaptiveBenchOptions(**changes)
    assert AdaptiveBenchOptions().limit() == 27.0  # half of a GPU pod's 54 requests/s
    with pytest.raises(SystemExit):
        main(["--rls-concurrency", "0"])


def test_rls_table_shows_the_added_latency() -> None:
    off = DriveResult(requests=100, failures=0, seconds=1.0, latencies_ms=(1.0,) * 100)
    on = dataclasses.replace(off, requests=50, latencies_ms=(3.0,) * 50)
    text = format_rls([RlsOverhead("memory", 1, off, on, 50.0)], 5.0)
    assert "p50 +2.00 ms, p99 +2.00 ms" in text
    assert "memory" in text and "50" in text
