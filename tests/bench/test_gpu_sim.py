"""The simulated vLLM server: the scheduler without sockets, then the HTTP server (SSE,
usage, metrics, ORCA, occupancy, aborts), then the command line."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from bench.gpu_sim import (
    LLAMA_8B_A100,
    Api,
    BadRequest,
    CompletionRequest,
    Phase,
    Policy,
    Scheduler,
    Seq,
    SimConfig,
    SimStats,
    StepCost,
    _parse_args,
    parse_request,
    saturated_throughput,
    start_sim,
)
from tests.bench._support import eventually

REPO = Path(__file__).resolve().parents[2]


def run_to_end(sched: Scheduler, limit: int = 10_000) -> list[tuple[float, list[Seq]]]:
    """Step the scheduler in virtual time until idle; each step's end time and tokens."""
    now, out = 0.0, list[tuple[float, list[Seq]]]()
    for _ in range(limit):
        step = sched.schedule(now)
        if step is None:
            return out
        now += step.duration_s
        out.append((now, sched.complete(step, now)))
    raise AssertionError("the scheduler did not go idle")


def seq(prompt: int = 8, out: int = 4, at: float = 0.0, priority: int = 0) -> Seq:
    return Seq(prompt_tokens=prompt, max_tokens=out, arrival=at, priority=priority)


# --- the cost model -----------------------------------------------------------------


def test_step_cost_is_calibrated_on_the_published_points() -> None:
    # Decode alone and with 8 sequences at ~1,088 tokens of context (1024 in, 128 out).
    one = LLAMA_8B_A100.step_ms(1, 1, 1088)
    eight = LLAMA_8B_A100.step_ms(8, 8, 8 * 1088)
    assert one == pytest.approx(1000 / 75, rel=0.02)  # 75 tokens/s alone
    assert 8 * 1000 / eight / (1000 / one) == pytest.approx(6.6, rel=0.03)  # 6.6x at 8
    # A 1,369-token prefill is compute-bound: about 117 ms, plus its context's attention.
    assert LLAMA_8B_A100.step_ms(10, 1369, 1369) == pytest.approx(116.5, rel=0.02)
    # Flat cost ignores the batch.
    assert StepCost.flat(10).step_ms(64, 4096, 10**6) == 10


# --- the scheduler ------------------------------------------------------------------


def test_batching_slows_decode_and_max_num_seqs_queues_the_rest() -> None:
    sched = Scheduler(SimConfig(max_num_seqs=4))
    alone = Scheduler(SimConfig(max_num_seqs=4))
    alone.add(seq())
    for _ in range(6):
        sched.add(seq())
    first_alone, first_batch = alone.schedule(0), sched.schedule(0)
    assert first_alone is not None and first_batch is not None
    assert len(sched.running) == 4 and sched.waiting.live == 2
    assert len(first_batch.tokens) == 4
    # Past prefill, a decode step of four sequences takes longer than one of one.
    for s, step in ((alone, first_alone), (sched, first_batch)):
        s.complete(step, step.duration_s)
    d1, d4 = alone.schedule(1.0), sched.schedule(1.0)
    assert d1 is not None and d4 is not None
    assert set(d4.tokens.values()) == {1}
    assert d4.duration_s > d1.duration_s
    steps = run_to_end(sched)
    assert all(len(sched.running) <= 4 for _ in steps)
    assert sched.idle and sched.generated_tokens == 6 * 4 - 4 + 4  # every token once


def test_a_full_kv_cache_queues_requests_until_blocks_free() -> None:
    # 64 tokens of cache: one request of 40 prompt + 8 output fits, a second does not.
    cfg = SimConfig(max_num_seqs=8, kv_cache_tokens=64, block_size=16, max_model_len=64)
    sched = Scheduler(cfg)
    a, b = seq(40, 8, at=0), seq(40, 8, at=0.001)
    sched.add(a)
    sched.add(b)
    step = sched.schedule(0)
    assert step is not None and list(step.tokens) == [a]
    assert b.phase is Phase.WAITING and sched.kv_cache_usage == 0.75
    first_b = None
    for end, emitted in run_to_end(sched):
        if b in emitted and first_b is None:
            first_b = end
    assert a.finished_at is not None and first_b is not None and first_b > a.finished_at
    assert sched.free_blocks == sched.total_blocks and sched.preemptions == 0


@pytest.mark.parametrize("policy", list(Policy))
def test_preemption_when_the_cache_runs_out(policy: Policy) -> None:
    """Two requests fit at admission but not once they grow: one is preempted, recomputed
    later, and still gets exactly its tokens. fcfs preempts the last admitted; priority
    the lowest priority (largest number), whatever the order."""
    cfg = SimConfig(
        max_num_seqs=8,
        kv_cache_tokens=64,
        block_size=16,
        max_model_len=64,
        scheduling_policy=policy,
    )
    sched = Scheduler(cfg)
    low = seq(16, 24, at=0.0, priority=1 if policy is Policy.PRIORITY else 0)
    high = seq(16, 24, at=0.001)
    sched.add(low)
    sched.add(high)
    run_to_end(sched)
    victim = high if policy is Policy.FCFS else low
    survivor = low if victim is high else high
    assert victim.preemptions >= 1 and survivor.preemptions == 0
    assert sched.preemptions == victim.preemptions
    assert victim.generated == survivor.generated == 24
    assert survivor.finished_at is not None and victim.finished_at is not None
    assert survivor.finished_at < victim.finished_at
    assert sched.free_blocks == sched.total_blocks


def test_priority_policy_admits_lower_numbers_first_and_fcfs_by_arrival() -> None:
    for policy, expected in ((Policy.PRIORITY, [2, 1, 0]), (Policy.FCFS, [0, 1, 2])):
        sched = Scheduler(SimConfig(max_num_seqs=1, scheduling_policy=policy))
        seqs = [
            seq(at=i * 0.001, priority=2 - i if policy is Policy.PRIORITY else 0) for i in (0, 1, 2)
        ]
        blocker = seq(at=-1)
        sched.add(blocker)
        sched.schedule(0)  # the blocker holds the only slot
        for s in seqs:
            sched.add(s)
        run_to_end(sched)
        order = sorted(seqs, key=lambda s: s.first_token_at or 0)
        assert [seqs.index(s) for s in order] == expected


def test_long_prompts_are_prefilled_in_chunks_beside_decodes() -> None:
    sched = Scheduler(SimConfig(max_num_batched_tokens=512))
    decoding = seq(8, 50)
    sched.add(decoding)
    run_step = sched.schedule(0)
    assert run_step is not None
    sched.complete(run_step, 0.01)
    long = seq(1500, 2)
    sched.add(long)
    sizes = []
    for _ in range(4):
        step = sched.schedule(1.0)
        assert step is not None
        assert sum(step.tokens.values()) <= 512 and step.tokens[decoding] == 1
        sizes.append(step.tokens.get(long, 0))
        sched.complete(step, 1.0)
    # Three chunks (the last one samples the first token), then one decode: done.
    assert sizes == [511, 511, 478, 1]
    assert long.generated == 2 and long.phase is Phase.FINISHED


def test_abort_frees_the_cache_wherever_the_request_is() -> None:
    sched = Scheduler(SimConfig(max_num_seqs=1))
    running, waiting = seq(), seq()
    sched.add(running)
    sched.add(waiting)
    step = sched.schedule(0)
    assert step is not None
    sched.abort(waiting, 0.0)
    sched.abort(running, 0.0)
    sched.abort(running, 0.0)  # twice is harmless
    assert sched.complete(step, 0.01) == []  # an aborted sequence gets no token
    assert sched.idle and sched.free_blocks == sched.total_blocks
    assert sched.schedule(0.02) is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 60), st.integers(1, 30), st.integers(0, 3), st.booleans()),
        min_size=1,
        max_size=25,
    ),
    st.sampled_from(list(Policy)),
    st.integers(1, 6),
)
def test_the_cache_is_conserved_and_every_request_ends(
    requests: list[tuple[int, int, int, bool]], policy: Policy, max_seqs: int
) -> None:
    cfg = SimConfig(
        max_num_seqs=max_seqs,
        kv_cache_tokens=96,
        block_size=16,
        max_model_len=96,
        max_num_batched_tokens=64,
        scheduling_policy=policy,
    )
    sched = Scheduler(cfg)
    seqs = [
        seq(p, o, at=i * 0.01, priority=pr if policy is Policy.PRIORITY else 0)
        for i, (p, o, pr, _) in enumerate(requests)
    ]
    rng = random.Random(len(requests))
    for s in seqs:
        sched.add(s)
    now = 0.0
    for _ in range(20_000):
        step = sched.schedule(now)
        if step is None:
            break
        assert len(sched.running) <= max_seqs
        assert sum(step.tokens.values()) <= 64
        held = sum(s.blocks for s in seqs)
        assert held + sched.free_blocks == sched.total_blocks
        now += step.duration_s
        sched.complete(step, now)
        for s, (_, _, _, abort) in zip(seqs, requests, strict=True):
            if abort and not s.done and rng.random() < 0.05:
                sched.abort(s, now)
    assert sched.idle and sched.free_blocks == sched.total_blocks
    for s in seqs:
        assert s.done
        if s.phase is Phase.FINISHED:
            assert s.generated == s.max_tokens


def test_saturated_throughput_is_deterministic_and_grows_with_the_batch() -> None:
    def lengths(seed: int = 3) -> Any:
        rng = random.Random(seed)
        while True:
            yield rng.randint(50, 400), rng.randint(10, 100)

    small = saturated_throughput(SimConfig(max_num_seqs=8), lengths(), seconds=60)
    assert small == saturated_throughput(SimConfig(max_num_seqs=8), lengths(), seconds=60)
    large = saturated_throughput(SimConfig(max_num_seqs=32), lengths(), seconds=60)
    assert large.tokens_per_s > 1.5 * small.tokens_per_s
    assert large.mean_batch == pytest.approx(32, rel=0.05)
    # Flat 10 ms steps, 4 sequences, no prefill cost: 400 tokens/s, however they split.
    flat = SimConfig(max_num_seqs=4, cost=StepCost.flat(10.0), max_num_batched_tokens=8192)
    assert saturated_throughput(flat, lengths(), seconds=60).tokens_per_s == pytest.approx(
        400, rel=0.1
    )
    slow = saturated_throughput(dataclass_replace(SimConfig(max_num_seqs=8), 2.0), lengths())
    assert slow.tokens_per_s == pytest.approx(small.tokens_per_s / 2, rel=0.05)


def dataclass_replace(cfg: SimConfig, slowdown: float) -> SimConfig:
    import dataclasses

    return dataclasses.replace(cfg, slowdown=slowdown)


# --- parsing ------------------------------------------------------------------------


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=10,
    ),
    st.sampled_from(list(Api)),
)
def test_parse_never_raises(body: object, api: Api) -> None:
    assert isinstance(parse_request(body, api, SimConfig()), CompletionRequest | BadRequest)


def test_parse_examples() -> None:
    cfg = SimConfig(max_model_len=100)
    ok = parse_request(
        {
            "prompt": [1, 2, 3],
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        Api.COMPLETIONS,
        cfg,
    )
    assert ok == CompletionRequest(Api.COMPLETIONS, "llama", 3, 5, True, True, 0)
    chat = parse_request({"messages": [{"role": "user", "content": "a b"}]}, Api.CHAT, cfg)
    assert isinstance(chat, CompletionRequest) and chat.prompt_tokens == 6
    assert chat.max_tokens == 16  # the default
    too_long = parse_request({"prompt": "x " * 90, "max_tokens": 20}, Api.COMPLETIONS, cfg)
    assert isinstance(too_long, BadRequest) and "maximum context length is 100" in too_long.message
    refused = parse_request({"prompt": "x", "priority": 3}, Api.COMPLETIONS, cfg)
    assert refused == BadRequest("Got priority 3 but Priority scheduling is not enabled.")
    prio = SimConfig(scheduling_policy=Policy.PRIORITY)
    taken = parse_request({"prompt": "x", "priority": -3}, Api.COMPLETIONS, prio)
    assert isinstance(taken, CompletionRequest) and taken.priority == -3
    unasked = parse_request(
        {"prompt": "x", "stream_options": {"include_usage": True}}, Api.COMPLETIONS, cfg
    )
    assert isinstance(unasked, BadRequest)


# --- the HTTP server ----------------------------------------------------------------


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """``/metrics`` parsed by prometheus_client's own parser: sample name -> value."""
    async with session.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


async def read_events(resp: aiohttp.ClientResponse) -> list[tuple[float, str]]:
    """Each SSE ``data:`` payload with the time it arrived."""
    out = []
    buffer = b""
    async for chunk in resp.content.iter_any():
        now = time.perf_counter()
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            assert event.startswith(b"data: "), event
            out.append((now, event[len(b"data: ") :].decode()))
    assert buffer == b""
    return out


async def test_completions_stream_a_chunk_per_token_then_usage_and_done() -> None:
    cfg = SimConfig(name="pod-a", cost=StepCost.flat(40.0))
    async with await start_sim(cfg) as sim, aiohttp.ClientSession() as session:
        body = {
            "model": "llama",
            "prompt": "one two three",
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sent = time.perf_counter()
        async with session.post(sim.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert resp.headers["x-served-by"] == "pod-a"
            events = await read_events(resp)
        assert events[-1][1] == "[DONE]"
        usage = json.loads(events[-2][1])
        assert usage["choices"] == [] and usage["usage"] == {
            "prompt_tokens": 3,
            "completion_tokens": 5,
            "total_tokens": 8,
        }
        tokens = [json.loads(data) for _, data in events[:-2]]
        assert [t["choices"][0]["text"] for t in tokens] == [
            " the",
            " model",
            " says",
            " hello",
            " to",
        ]
        assert [t["choices"][0]["finish_reason"] for t in tokens] == [None] * 4 + ["length"]
        assert len({t["id"] for t in tokens}) == 1 and tokens[0]["object"] == "text_completion"
        # Tokens arrive as the steps end (40 ms apart), not all at the end.
        first, last = events[0][0] - sent, events[-3][0] - sent
        assert first < 0.5 * last
        assert last - first > 0.12  # four more steps of 40 ms


async def test_chat_stream_starts_with_the_role_and_the_body_carries_usage() -> None:
    sim_cfg = SimConfig(cost=StepCost.flat(1.0))
    async with await start_sim(sim_cfg) as sim, aiohttp.ClientSession() as session:
        messages = [{"role": "user", "content": "hi"}]
        body = {"model": "llama", "messages": messages, "max_tokens": 3, "stream": True}
        async with session.post(sim.url + "/v1/chat/completions", json=body) as resp:
            events = [json.loads(d) for _, d in await read_events(resp) if d != "[DONE]"]
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        contents = [e["choices"][0]["delta"]["content"] for e in events[1:]]
        assert contents == [" the", " model", " says"]
        assert all("usage" not in e for e in events)  # not asked for
        del body["stream"]
        async with session.post(sim.url + "/v1/chat/completions", json=body) as resp:
            whole = await resp.json()
        assert whole["object"] == "chat.completion"
        assert whole["choices"][0]["message"]["content"] == " the model says"
        assert whole["usage"]["completion_tokens"] == 3


async def test_an_answer_that_ends_before_max_tokens_reports_what_it_made() -> None:
    async with (
        await start_sim(SimConfig(cost=StepCost.flat(1.0))) as sim,
        aiohttp.ClientSession() as session,
    ):
        body = {"prompt": "one two", "max_tokens": 1000, "sim_output_tokens": 3}
        async with session.post(sim.url + "/v1/completions", json=body) as resp:
            whole = await resp.json()
        assert whole["choices"][0]["finish_reason"] == "stop"
        assert whole["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(sim.url + "/v1/completions", json=streamed) as resp:
            events = [json.loads(d) for _, d in await read_events(resp) if d != "[DONE]"]
        assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, "stop"]
        assert events[-1]["usage"]["completion_tokens"] == 3
        longer = {**body, "max_tokens": 2}  # max_tokens still caps the answer
        async with session.post(sim.url + "/v1/completions", json=longer) as resp:
            capped = await resp.json()
        assert capped["choices"][0]["finish_reason"] == "length"
        assert capped["usage"]["completion_tokens"] == 2
        bad = {**body, "sim_output_tokens": 0}
        async with session.post(sim.url + "/v1/completions", json=bad) as resp:
            assert resp.status == 400


async def test_orca_header_in_json_and_text_on_whole_responses_only() -> None:
    cfg = SimConfig(max_num_seqs=1, cost=StepCost.flat(20.0))
    async with await start_sim(cfg) as sim, aiohttp.ClientSession() as session:
        url = sim.url + "/v1/completions"
        body = {"prompt": "x", "max_tokens": 10}
        json_format = {"endpoint-load-metrics-format": "JSON"}
        # The report is taken when the response is sent: three requests queue behind it.
        probe = asyncio.create_task(session.post(url, json=body, headers=json_format))
        await eventually(lambda: len(sim.scheduler.running) == 1)
        busy = [
            asyncio.create_task(session.post(url, json={"prompt": "x", "max_tokens": 40}))
            for _ in range(3)
        ]
        async with await probe as r:
            header = r.headers["endpoint-load-metrics"]
        assert header.startswith("JSON ")
        report = json.loads(header[5:])
        assert set(report) == {"named_metrics"}
        assert report["named_metrics"]["num_requests_waiting"] >= 2.0
        assert 0 < report["named_metrics"]["kv_cache_usage_perc"] <= 1
        async with session.post(
            url, json=body, headers={"endpoint-load-metrics-format": "text"}
        ) as r:
            text = r.headers["endpoint-load-metrics"]
        assert text.startswith("TEXT named_metrics.kv_cache_usage_perc=")
        assert ", named_metrics.num_requests_waiting=" in text
        async with session.post(url, json=body) as r:
            assert "endpoint-load-metrics" not in r.headers
        stream = {**body, "stream": True}
        async with session.post(
            url, json=stream, headers={"endpoint-load-metrics-format": "JSON"}
        ) as r:
            assert "endpoint-load-metrics" not in r.headers  # vLLM: JSON responses only
            await r.read()
        for task in busy:
            (await task).release()
    cfg = SimConfig(orca_on_streams=True, cost=StepCost.flat(1.0))
    async with await start_sim(cfg) as sim, aiohttp.ClientSession() as session:
        headers = {"endpoint-load-metrics-format": "JSON"}
        async with session.post(sim.url + "/v1/completions", json=stream, headers=headers) as r:
            assert r.headers["endpoint-load-metrics"].startswith("JSON {")
            await r.read()


async def test_metrics_follow_the_batch_the_queue_and_the_cache() -> None:
    cfg = SimConfig(max_num_seqs=2, cost=StepCost.flat(30.0))
    async with await start_sim(cfg) as sim, aiohttp.ClientSession() as session:
        body = {"prompt": "a b c d", "max_tokens": 6, "stream": True}

        async def one() -> None:
            async with session.post(sim.url + "/v1/completions", json=body) as resp:
                await resp.read()

        tasks = [asyncio.create_task(one()) for _ in range(5)]

        async def queued() -> bool:
            m = await scrape(session, sim.url)
            assert m["vllm:num_requests_running{model_name=llama}"] <= 2
            return m["vllm:num_requests_waiting{model_name=llama}"] == 3

        await eventually(queued)
        m = await scrape(session, sim.url)
        assert m["vllm:num_requests_running{model_name=llama}"] == 2
        assert m["vllm:kv_cache_usage_perc{model_name=llama}"] > 0
        await asyncio.gather(*tasks)
        m = await scrape(session, sim.url)
        assert m["vllm:num_requests_running{model_name=llama}"] == 0
        assert m["vllm:kv_cache_usage_perc{model_name=llama}"] == 0
        assert m["vllm:time_to_first_token_seconds_count{model_name=llama}"] == 5
        assert m["vllm:inter_token_latency_seconds_count{model_name=llama}"] == 5 * 5
        assert m["vllm:e2e_request_latency_seconds_count{model_name=llama}"] == 5
        assert m["vllm:request_queue_time_seconds_count{model_name=llama}"] == 5
        assert m["vllm:generation_tokens_total{model_name=llama}"] == 30
        assert m["vllm:prompt_tokens_total{model_name=llama}"] == 20
        assert m["vllm:request_success_total{finished_reason=length,model_name=llama}"] == 5
        # The last three waited a whole request (6 steps of 30 ms) or more.
        assert m["vllm:request_queue_time_seconds_bucket{le=0.1,model_name=llama}"] == 2


async def test_occupancy_per_class_is_read_from_the_pod_and_reset() -> None:
    cfg = SimConfig(max_num_seqs=2, cost=StepCost.flat(20.0))
    async with await start_sim(cfg) as sim, aiohttp.ClientSession() as session:

        async def one(cls: str | None) -> None:
            headers = {"x-inference-priority": cls} if cls else {}
            body = {"prompt": "x", "max_tokens": 5}
            async with session.post(sim.url + "/v1/completions", json=body, headers=headers) as r:
                await r.read()

        await asyncio.gather(*(one(c) for c in ["Sheddable"] * 3 + ["critical", None]))
        async with session.get(sim.url + "/sim/stats") as resp:
            stats = SimStats.from_json(await resp.json())
        assert stats.peak_in_flight == {"sheddable": 3, "critical": 1, "none": 1}
        assert sum(stats.peak_running_by_class.values()) >= 2
        assert max(stats.peak_running_by_class.values()) <= 2
        assert stats.by_priority == {"sheddable": 3, "critical": 1, "none": 1}
        assert stats.served == 5 and stats.generated_tokens == 25 and stats.in_flight == {}
        assert sum(stats.tokens_per_bucket) == 25
        assert stats.tokens_between(stats.since, time.time() + 1) == 25
        async with session.post(sim.url + "/sim/reset") as resp:
            after = SimStats.from_json(await resp.json())
        assert after.peak_in_flight == {} and after.served == 0 and after.since > stats.since


async def test_a_client_inventing_classes_cannot_grow_the_counters() -> None:
    from bench.gpu_sim import MAX_CLASSES

    async with await start_sim(SimConfig(cost=StepCost.flat(0.0))) as sim:
        async with aiohttp.ClientSession() as session:
            for i in range(MAX_CLASSES + 10):
                headers = {"x-inference-priority": f"class-{i}-" + "x" * 100}
                body = {"prompt": "x", "max_tokens": 1}
                async with session.post(
                    sim.url + "/v1/completions", json=body, headers=headers
                ) as resp:
                    assert resp.status == 200
        counted = sim.stats().by_priority
        assert len(counted) == MAX_CLASSES + 1 and counted["other"] == 10
        assert max(len(c) for c in counted) <= 32


async def test_a_client_that_leaves_aborts_its_request() -> None:
    cfg = SimConfig(max_num_seqs=1, cost=StepCost.flat(20.0))
    async with await start_sim(cfg) as sim, aiohttp.ClientSession() as session:
        url = sim.url + "/v1/completions"
        body = {"prompt": "x", "max_tokens": 1000, "stream": True}
        resp = await session.post(url, json=body)
        await resp.content.readuntil(b"\n\n")  # the first token has come
        waiting = asyncio.create_task(session.post(url, json={"prompt": "y", "max_tokens": 2}))
        await eventually(lambda: sim.scheduler.waiting.live == 1)
        resp.close()  # the streaming client goes away mid-stream
        await eventually(lambda: sim.stats().aborted == 1)
        done = await asyncio.wait_for(waiting, 5)
        assert done.status == 200  # the freed slot went to the queued request
        done.release()
        assert sim.scheduler.idle and sim.stats().in_flight == {}


async def test_priority_scheduling_lets_critical_jump_the_queue() -> None:
    cfg = SimConfig(max_num_seqs=1, scheduling_policy=Policy.PRIORITY, cost=StepCost.flat(10.0))
    async with await start_sim(cfg) as sim, aiohttp.ClientSession() as session:
        order: list[int] = []

        async def one(priority: int, tokens: int = 3) -> None:
            body = {"prompt": "x", "max_tokens": tokens, "priority": priority}
            async with session.post(sim.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                await resp.read()
            order.append(priority)

        first = asyncio.create_task(one(5, tokens=20))
        await eventually(lambda: len(sim.scheduler.running) == 1)
        low = [asyncio.create_task(one(5)) for _ in range(3)]
        await eventually(lambda: sim.scheduler.waiting.live == 3)
        high = asyncio.create_task(one(0))
        await asyncio.gather(first, high, *low)
        assert order[:2] == [5, 0]  # the running one, then the critical one
    async with await start_sim(SimConfig()) as sim, aiohttp.ClientSession() as session:
        body = {"prompt": "x", "priority": 1}
        async with session.post(sim.url + "/v1/completions", json=body) as resp:
            assert resp.status == 400
            assert "Priority scheduling is not enabled" in (await resp.json())["message"]


async def test_bad_requests_get_clear_errors() -> None:
    async with await start_sim(SimConfig()) as sim, aiohttp.ClientSession() as s:
        url = sim.url + "/v1/completions"
        async with s.post(url, data=b"{not json") as resp:
            assert resp.status == 400
        async with s.post(url, json={"model": "mistral", "prompt": "x"}) as resp:
            assert resp.status == 404
            assert "mistral" in (await resp.json())["message"]
        async with s.post(url, json={"prompt": "x", "max_tokens": 0}) as resp:
            assert resp.status == 400
        async with s.post(sim.url + "/v1/chat/completions", json={"messages": "hi"}) as resp:
            assert resp.status == 400
        async with s.get(sim.url + "/v1/models") as resp:
            assert (await resp.json())["data"][0]["id"] == "llama"
        assert sim.stats().bad_requests == 4 and sim.stats().served == 0


async def test_health_follows_set_healthy() -> None:
    async with await start_sim(SimConfig()) as sim, aiohttp.ClientSession() as session:
        async with session.get(sim.url + "/health") as resp:
            assert resp.status == 200
        sim.set_healthy(False)
        async with session.get(sim.url + "/health") as resp:
            assert resp.status == 503


async def test_the_official_openai_sdk_streams_from_the_pod() -> None:
    import openai

    async with await start_sim(SimConfig(cost=StepCost.flat(5.0))) as sim:
        client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="none", max_retries=0)
        stream = await client.completions.create(
            model="llama",
            prompt="hello",
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        texts, usage = [], None
        async for chunk in stream:
            texts += [c.text for c in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(texts) == " the model says hello"
        assert usage is not None and usage.completion_tokens == 4
        chat = await client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert chat.choices[0].message.content == " the model"
        await client.close()


# --- the command line ----------------------------------------------------------------


def test_cli_flags_and_pod_files(tmp_path: Path) -> None:
    [cfg] = _parse_args(["--profile", "cpu", "--name", "cpu-0", "--max-num-seqs", "3"])
    assert (cfg.name, cfg.max_num_seqs, cfg.cost.base_ms) == ("cpu-0", 3, 90.0)
    [prio] = _parse_args(["--scheduling-policy", "priority", "--slowdown", "2"])
    assert prio.scheduling_policy is Policy.PRIORITY and prio.slowdown == 2
    with pytest.raises(SystemExit):
        _parse_args(["--max-num-seqs", "0"])
    pods = [SimConfig.gpu_pod("a", slowdown=1.5).to_json(), SimConfig.cpu_pod("b").to_json()]
    path = tmp_path / "pods.json"
    path.write_text(json.dumps(pods))
    loaded = _parse_args(["--pods", str(path)])
    assert loaded == [SimConfig.gpu_pod("a", slowdown=1.5), SimConfig.cpu_pod("b")]
    path.write_text('[{"max_num_seqs": -1}]')
    with pytest.raises(SystemExit):
        _parse_args(["--pods", str(path)])


async def test_cli_serves_several_pods_and_stops_on_sigterm(tmp_path: Path) -> None:
    pods = tmp_path / "pods.json"
    pods.write_text(
        json.dumps([SimConfig.gpu_pod(f"gpu-{i}", "127.0.0.12").to_json() for i in (0, 1)])
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.gpu_sim",
        "--pods",
        str(pods),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 15.0))
        urls = [p["url"] for p in ready["pods"]]
        assert len(urls) == 2 and all(u.startswith("http://127.0.0.12:") for u in urls)
        async with aiohttp.ClientSession() as session:
            for i, url in enumerate(urls):
                body = {"prompt": "x", "max_tokens": 2}
                async with session.post(url + "/v1/completions", json=body) as resp:
                    assert resp.headers["x-served-by"] == f"gpu-{i}"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10.0) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
