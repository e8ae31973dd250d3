"""The simulated model server: slots, FIFO queue, 503 past max_queue, metrics, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from bench.gpu_sim import (
    BadRequest,
    CompletionRequest,
    QueueFull,
    SimConfig,
    SlotPool,
    _parse_args,
    parse_completion_request,
    start_sim,
)
from tests.bench._support import eventually

REPO = Path(__file__).resolve().parents[2]


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """``/metrics`` parsed by prometheus_client's own parser: sample name -> value."""
    async with session.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def completion(max_tokens: int = 4, model: str = "llama") -> dict[str, object]:
    return {"model": model, "prompt": "one two three", "max_tokens": max_tokens}


# --- the slot pool, without sockets -------------------------------------------------


async def test_pool_hands_slots_out_in_arrival_order() -> None:
    pool = SlotPool(slots=1)
    await pool.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        await pool.acquire()
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(4)]
    await eventually(lambda: pool.waiting == 4)
    for expected in range(1, 5):
        pool.release()
        await eventually(lambda: len(order) == expected)  # noqa: B023 (awaited at once)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]
    assert (pool.running, pool.peak_running, pool.peak_waiting) == (1, 1, 4)


async def test_pool_cancelled_waiter_loses_no_slot() -> None:
    pool = SlotPool(slots=1, max_queue=2)
    await pool.acquire()
    first = asyncio.create_task(pool.acquire())
    second = asyncio.create_task(pool.acquire())
    await eventually(lambda: pool.waiting == 2)
    with pytest.raises(QueueFull):
        await pool.acquire()
    first.cancel()
    await eventually(lambda: first.done() and pool.waiting == 1)
    pool.release()
    await asyncio.wait_for(second, 2.0)
    pool.release()
    assert pool.running == 0
    await pool.acquire()  # the slot is free again, without waiting
    assert pool.running == 1


# --- the HTTP server ----------------------------------------------------------------


async def test_slots_bound_running_and_metrics_show_the_queue() -> None:
    cfg = SimConfig(name="pod-a", slots=2, prefill_ms=250.0, ms_per_token=0.0)
    async with await start_sim(cfg) as sim, aiohttp.ClientSession() as session:

        async def post() -> tuple[int, str, float]:
            async with session.post(sim.url + "/v1/completions", json=completion()) as resp:
                body = await resp.json()
                assert body["object"] == "text_completion"
                return (
                    resp.status,
                    resp.headers["x-served-by"],
                    float(resp.headers["x-sim-queued-ms"]),
                )

        posts = [asyncio.create_task(post()) for _ in range(6)]

        async def queued() -> bool:
            metrics = await scrape(session, sim.url)
            running = metrics["vllm:num_requests_running{model_name=llama}"]
            assert running <= 2
            return metrics["vllm:num_requests_waiting{model_name=llama}"] > 0

        await eventually(queued)
        metrics = await scrape(session, sim.url)
        assert metrics["vllm:num_requests_running{model_name=llama}"] == 2
        assert metrics["vllm:gpu_cache_usage_perc{model_name=llama}"] == 1.0
        assert sim.stats().running == 2

        results = await asyncio.gather(*posts)
        assert [(status, pod) for status, pod, _ in results] == [(200, "pod-a")] * 6
        assert sum(1 for *_, q in results if q >= 200.0) == 4  # four had to wait
        stats = sim.stats()
        assert (stats.served, stats.rejected, stats.peak_running, stats.peak_waiting) == (
            6,
            0,
            2,
            4,
        )
        after = await scrape(session, sim.url)
        assert after["vllm:num_requests_running{model_name=llama}"] == 0
        assert after["vllm:num_requests_waiting{model_name=llama}"] == 0
        assert after["sim_requests_total{code=200,model_name=llama}"] == 6
        assert after["vllm:request_success_total{finished_reason=length,model_name=llama}"] == 6
        assert after["vllm:e2e_request_latency_seconds_count{model_name=llama}"] == 6


async def test_503_past_max_queue() -> None:
    cfg = SimConfig(name="pod-b", slots=1, max_queue=1, prefill_ms=400.0, ms_per_token=0.0)
    async with await start_sim(cfg) as sim, aiohttp.ClientSession() as session:

        async def post() -> tuple[int, dict[str, object], str]:
            async with session.post(sim.url + "/v1/completions", json=completion()) as resp:
                return resp.status, await resp.json(), resp.headers["x-served-by"]

        results = await asyncio.gather(*(post() for _ in range(3)))
        statuses = sorted(status for status, _, _ in results)
        assert statuses == [200, 200, 503]
        refused = next(body for status, body, _ in results if status == 503)
        assert refused["code"] == 503 and refused["object"] == "error"
        assert {pod for *_, pod in results} == {"pod-b"}
        assert sim.stats().rejected == 1
        metrics = await scrape(session, sim.url)
        assert metrics["sim_requests_total{code=503,model_name=llama}"] == 1


async def test_completion_body_usage_and_priority_counts() -> None:
    cfg = SimConfig(name="pod-c", host="127.0.0.11", prefill_ms=0.0, ms_per_token=0.0)
    async with await start_sim(cfg) as sim, aiohttp.ClientSession() as session:
        assert sim.url == f"http://127.0.0.11:{sim.port}"
        for priority in ("Critical", "critical", "sheddable"):
            async with session.post(
                sim.url + "/v1/completions",
                json=completion(max_tokens=5),
                headers={"x-inference-priority": priority},
            ) as resp:
                assert resp.status == 200
                body = await resp.json()
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        assert len(body["choices"][0]["text"].split()) == 5
        assert body["id"].startswith("cmpl-")
        assert dict(sim.stats().by_priority) == {"critical": 2, "sheddable": 1}


async def test_bad_requests_get_clear_errors() -> None:
    async with await start_sim(SimConfig(prefill_ms=0.0)) as sim, aiohttp.ClientSession() as s:
        url = sim.url + "/v1/completions"
        async with s.post(url, data=b"{not json") as resp:
            assert resp.status == 400
        async with s.post(url, json=completion(model="mistral")) as resp:
            assert resp.status == 404
            assert "mistral" in (await resp.json())["message"]
        async with s.post(url, json={"prompt": "x", "max_tokens": 0}) as resp:
            assert resp.status == 400
        assert sim.stats().bad_requests == 3
        assert sim.stats().served == 0


async def test_health_follows_set_healthy() -> None:
    async with await start_sim(SimConfig()) as sim, aiohttp.ClientSession() as session:
        async with session.get(sim.url + "/health") as resp:
            assert resp.status == 200
        sim.set_healthy(False)
        async with session.get(sim.url + "/health") as resp:
            assert resp.status == 503


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=10,
    )
)
def test_parse_never_raises(body: object) -> None:
    assert isinstance(parse_completion_request(body, "llama"), CompletionRequest | BadRequest)


@given(
    st.lists(st.text(), max_size=5) | st.text(),
    st.integers(min_value=1, max_value=8192) | st.none(),
)
def test_parse_accepts_valid_bodies(prompt: str | list[str], max_tokens: int | None) -> None:
    parsed = parse_completion_request(
        {"model": "llama", "prompt": prompt, "max_tokens": max_tokens}, "llama"
    )
    assert isinstance(parsed, CompletionRequest)
    assert parsed.max_tokens == (16 if max_tokens is None else max_tokens)


def test_config_capacity_and_profiles() -> None:
    gpu = SimConfig.gpu_pod("g", port=8000)
    assert gpu.service_time_s(16) == pytest.approx(0.052)
    assert gpu.capacity_rps(16) == pytest.approx(8 / 0.052)
    assert SimConfig.cpu_pod("c").capacity_rps(16) < gpu.capacity_rps(16) / 10
    with pytest.raises(ValueError):
        SimConfig(slots=0)


def test_cli_flags_override_the_profile() -> None:
    cfg = _parse_args(["--profile", "cpu", "--name", "cpu-0", "--slots", "3", "--max-queue", "5"])
    assert (cfg.name, cfg.slots, cfg.max_queue, cfg.ms_per_token) == ("cpu-0", 3, 5, 25.0)
    with pytest.raises(SystemExit):
        _parse_args(["--slots", "0"])


async def test_cli_serves_on_a_loopback_alias_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.gpu_sim",
        "--name",
        "llama-gpu-0",
        "--host",
        "127.0.0.12",
        "--port",
        "0",
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 15.0))
        assert ready["url"].startswith("http://127.0.0.12:")
        async with (
            aiohttp.ClientSession() as session,
            session.post(ready["url"] + "/v1/completions", json=completion()) as resp,
        ):
            assert resp.headers["x-served-by"] == "llama-gpu-0"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10.0) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
