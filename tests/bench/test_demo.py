"""The demo (``python -m bench.demo``) end to end, shortened: the benchmark mesh (four GPU
pods and a CPU pod with sidecars, four calling sidecars and a gateway, real Envoys) at
twice the GPU pool's capacity, through inferlane and through a Kubernetes Service over
the GPU pods; the table and the PNG show both, failures included, and everything the
demo started is gone afterwards."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest

from bench.demo import DemoOptions, format_report, main, run_demo
from bench.load import LengthDist
from bench.testbed import INFERLANE, SERVICE_RR, in_use
from bench.topology import SERVICE_PORT, Topology
from bench.wait import eventually
from tests.support.envoy import require_envoy

#: Short outputs keep the run (and its drain) short.
TOPOLOGY = dataclasses.replace(Topology(), output_lengths=LengthDist(12, 0.6, 4, 48))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.envoy
@pytest.mark.timeout(150)
async def test_demo_runs_the_mesh_against_the_fair_baseline_and_cleans_up(tmp_path: Path) -> None:
    require_envoy()
    opts = DemoOptions(
        load=2.0,
        duration_s=8.0,
        warmup_s=2.0,
        deadline_s=30.0,
        ttft_deadline_s=5.0,
        topology=TOPOLOGY,
        out_dir=tmp_path,
        progress=False,
    )

    result = await run_demo(opts)

    assert list(result.points) == [INFERLANE.name, SERVICE_RR.name]
    ours, theirs = result.points[INFERLANE.name], result.points[SERVICE_RR.name]
    # The very same arrivals went through both.
    assert [(r.caller, r.cls) for r in ours.runs[0].load.records[:20]] == [
        (r.caller, r.cls) for r in theirs.runs[0].load.records[:20]
    ]
    assert len(ours.records) == len(theirs.records) > 100
    for point in (ours, theirs):
        summary = point.summary()
        assert {cls for cls, s in summary.items() if s.requests} == {
            "critical",
            "standard",
            "sheddable",
        }
        # The CPU fallback got nothing while the GPU pods were healthy.
        assert point.runs[0].pods["llama-cpu-0"].by_priority == {}
        assert all(point.runs[0].pods[p].generated_tokens > 0 for p in point.gpu_pods)
        assert 0.3 < point.goodput_share < 1.2
        served = {pod for s in summary.values() for pod in s.served_by}
        assert served <= set(point.gpu_pods)
    # Only inferlane's requests carry their class to the pods through sidecars; every
    # caller's classes arrived as sent.
    classes = {c for s in ours.runs[0].pods.values() for c in s.by_priority}
    assert classes == {"critical", "standard", "sheddable"}

    report = format_report(result)
    for needle in (
        "== inferlane ==",
        "== k8s-service ==",
        "critical",
        "sheddable",
        "goodput",
        "peak sheddable per pod",
        "(cap 16)",
    ):
        assert needle in report
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every process and task it started is gone, and the pods' addresses are free again.
    assert len(result.pids) >= 12
    assert not [pid for pid in result.pids if _pid_alive(pid)]
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "inferlane-control-plane"]

    async def addresses_free() -> bool:
        return not [p.ip for p in TOPOLOGY.pods if in_use(p.ip, SERVICE_PORT)]

    await eventually(addresses_free, timeout=10, what="the pods' addresses free again")


def test_bad_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--warmup", "50", "--duration", "10"])
    assert "warm-up" in capsys.readouterr().err
