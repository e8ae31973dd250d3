"""The chart's Grafana dashboard against a real Prometheus scraping a running mesh.

A small demo mesh runs on loopback: the control plane (in process), simulated model
servers (bench.gpu_sim: two GPU pods and a CPU fallback) behind a Service with a small
``max-concurrency``, so that some requests are shed, and a client sidecar (a real
Envoy). A real Prometheus scrapes the
control plane's ``/metrics``, the Envoy's ``/stats/prometheus`` and the pods'
``/metrics`` every second, while a short load of every class goes through the sidecar.
Then every panel's query of ``charts/inferlane/dashboards/inferlane.json`` must return
data, and the per-class panels must show each class.

Prometheus comes from Debian's ``prometheus`` package; ``.ci/run`` installs it. The
rule: in CI (the ``CI`` environment variable set, as CI sets it) a missing ``prometheus``
fails this test; elsewhere it skips, saying how to install it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bench.gpu_sim import SimConfig, start_sims
from bench.load import Caller, LengthDist, LoadSpec, run_load
from mesh.manifests import ManifestSource
from tests.e2e.harness import (
    control_plane,
    free_port,
    inference_service,
    model_pod,
    pod,
    sidecar,
    write_manifests,
)
from tests.support.envoy import require_envoy, running_envoy
from tests.support.wait import eventually

pytestmark = pytest.mark.envoy

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "inferlane" / "dashboards"
GPU_PODS = (("gpu-0", "127.0.71.1"), ("gpu-1", "127.0.71.2"))
CPU_POD = ("cpu-0", "127.0.71.3")
CLIENT = "127.0.71.10"
HOST = "llama.default.svc.cluster.local"
CLASSES = {"critical", "standard", "sheddable"}
#: What ``$__rate_interval`` stands for here: several 1 s scrapes.
RATE_INTERVAL = "30s"


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    message = "prometheus is not installed (apt-get install prometheus; .ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message + "; with CI set this fails instead")


def panels() -> Iterator[dict[str, Any]]:
    for path in sorted(DASHBOARD.glob("*.json")):
        for panel in json.loads(path.read_text(encoding="utf-8"))["panels"]:
            if panel["type"] != "row":
                yield panel


def test_the_dashboard_is_well_formed() -> None:
    found = list(panels())
    assert len(found) >= 12
    assert len({p["id"] for p in found}) == len(found)
    for panel in found:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["description"] and panel["targets"]
        assert all(t["expr"] and t["refId"] for t in panel["targets"])


@contextlib.asynccontextmanager
async def prometheus(jobs: dict[str, tuple[str, list[str], dict[str, str]]]) -> AsyncIterator[str]:
    """A real Prometheus scraping ``jobs`` (name -> (metrics path, targets, labels)) every
    second; yields its URL and stops it on exit."""
    binary = prometheus_binary()
    workdir = Path(tempfile.mkdtemp(prefix="inferlane-prometheus-"))
    scrape_configs = [
        {
            "job_name": name,
            "metrics_path": path,
            "static_configs": [{"targets": targets, "labels": labels}],
        }
        for name, (path, targets, labels) in jobs.items()
    ]
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
        "scrape_configs": scrape_configs,
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port("127.0.0.1")
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=(workdir / "prometheus.log").open("wb"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                assert proc.returncode is None, (workdir / "prometheus.log").read_text()[-2000:]
                async with session.get(url + "/-/ready") as response:
                    return response.status == 200

            await eventually(ready, timeout=30, what="Prometheus ready")
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def query(session: aiohttp.ClientSession, url: str, expr: str) -> list[dict[str, Any]]:
    async with session.get(url + "/api/v1/query", params={"query": expr}) as response:
        body = await response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def finite(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in result if math.isfinite(float(r["value"][1]))]


async def test_every_panel_query_returns_data(tmp_path: Path) -> None:
    require_envoy()
    prometheus_binary()
    configs = [
        *(SimConfig.gpu_pod(n, ip, max_num_seqs=2) for n, ip in GPU_PODS),
        SimConfig.cpu_pod(CPU_POD[0], CPU_POD[1]),
    ]
    # Each class may have only its share of two requests per ready pod in flight from the
    # sidecar; beyond it, requests wait briefly, then are shed (503).
    capped = {"inferlane.io/max-concurrency": "2"}
    sims = await start_sims(configs)
    try:
        manifest = tmp_path / "cluster.yaml"
        pods = [
            model_pod(s.name, app="llama", ip=s.config.host, port=s.port, gpu=s.name != CPU_POD[0])
            for s in sims
        ]
        client = pod("chat-0", labels={"app": "chat"}, ip=CLIENT, service_account="chat")
        # The pods have no sidecars, so each caller caps a class itself: past its share of
        # max-concurrency, requests are refused with 503 and the sheds panel has data.
        capped = {"inferlane.io/max-concurrency": "2"}
        write_manifests(manifest, [inference_service("llama", annotations=capped), *pods, client])
        node_id, metadata, outbound = sidecar(CLIENT, "chat-0", service_account="chat")
        async with (
            control_plane(ManifestSource(manifest)) as plane,
            running_envoy(node_id, plane.ports["xds"], metadata=metadata) as envoy,
        ):
            envoy_admin = envoy.admin_url.removeprefix("http://")
            jobs = {
                "inferlane": ("/metrics", [f"127.0.0.1:{plane.ports['admin']}"], {}),
                "envoy": ("/stats/prometheus", [envoy_admin], {"pod": "chat-0"}),
            }
            for sim in sims:
                jobs[f"model-{sim.name}"] = (
                    "/metrics",
                    [f"{sim.config.host}:{sim.port}"],
                    {"pod": sim.name},
                )
            async with prometheus(jobs) as prom, aiohttp.ClientSession() as session:
                await eventually(
                    lambda: _up(session, prom, len(jobs)), timeout=30, what="every target up"
                )
                # Over what the caps admit, so queues build and each caller sheds (503).
                spec = LoadSpec(
                    callers=(Caller("chat-0", 1.0, {c: 1 for c in sorted(CLASSES)}),),
                    host=HOST,
                    rate_rps=60,
                    duration_s=3,
                    # Short answers, so nothing waits for the deadline: the pods are small.
                    output_lengths=LengthDist(median=8, sigma=0.5, low=2, high=32),
                    timeout_s=10,
                    seed=14,
                )
                urls = {"chat-0": f"http://{CLIENT}:{outbound}"}
                load = asyncio.create_task(run_load(spec, urls, progress=False))
                # A config change while Prometheus watches: pushes, ACKs, convergence.
                timeout = {**capped, "inferlane.io/timeout": "critical=20s"}
                objects = [inference_service("llama", annotations=timeout), *pods, client]
                write_manifests(manifest, objects)
                result = await load
                assert {r.cls for r in result.records if r.ok} == CLASSES

                for panel in panels():
                    for target in panel["targets"]:
                        expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)

                        async def answered(expr: str = expr) -> list[dict[str, Any]]:
                            return finite(await query(session, prom, expr))

                        found = await eventually(
                            answered, timeout=30, interval=0.5, what=f"{panel['title']}: {expr}"
                        )
                        if "class" in target["legendFormat"] and "Sheds" not in panel["title"]:
                            classes = {r["metric"].get("class") for r in found}
                            assert classes == CLASSES, (panel["title"], classes)

                # Time to first token is recorded for answers that came from a model server,
                # so never for more requests than the whole-request histogram (which also
                # counts the sidecar's own refusals). That it measures the first byte, not
                # the end, is checked on one stream in tests/e2e_admission/test_streams.py.
                counts = {
                    name: float((await query(session, prom, f"sum({name}_count)"))[0]["value"][1])
                    for name in ("envoy_inferlane_request_ttft", "envoy_inferlane_request_duration")
                }
                ttft_n, whole_n = counts.values()
                assert 0 < ttft_n < whole_n, counts
                # And every request with a first token has a duration at least as long.
                sums = [
                    float((await query(session, prom, f"sum({name}_sum)"))[0]["value"][1])
                    for name in ("envoy_inferlane_request_ttft", "envoy_inferlane_request_duration")
                ]
                assert 0 < sums[0] <= sums[1], sums
    finally:
        for sim in sims:
            await sim.stop()


async def _up(session: aiohttp.ClientSession, url: str, jobs: int) -> bool:
    up = await query(session, url, "up == 1")
    return len(up) == jobs
