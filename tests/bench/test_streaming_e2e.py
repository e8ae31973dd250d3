"""Streaming through real Envoys, with the official OpenAI SDK as the client.

A small mesh from :mod:`bench.testbed` (two simulated GPU pods with sidecars, one calling
sidecar, one gateway, the control plane): a streamed completion through the sidecar and a
streamed chat completion through the gateway arrive token by token, as the pod produces
them, not all at the end: the first token comes long before the last, and the gaps
between chunks follow the pod's engine steps.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from bench.load import ApiKind, Caller
from bench.testbed import Entry, Testbed, TestbedOptions, running_testbed
from bench.topology import SERVICE_HOST, CallerPod, Knobs, Pod, Topology
from tests.support.envoy import require_envoy

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

#: Addresses of this test's own, apart from the demo's and the benchmarks'.
TOPOLOGY = Topology(
    pods=(Pod("llama-gpu-0", "127.0.12.11", gpu=True), Pod("llama-gpu-1", "127.0.12.12", gpu=True)),
    callers=(
        CallerPod(Caller("app", 1.0, {"critical": 1.0}), "127.0.12.21", "app"),
        CallerPod(
            Caller("edge", 1.0, {"critical": 1.0}, ApiKind.CHAT),
            "127.0.12.30",
            "ingress-gateway",
            gateway=True,
        ),
    ),
)
#: A lone sequence's decode step takes 13.2 ms x 5 = 66 ms.
KNOBS = Knobs(slowdown=5.0)
TOKENS = 12


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bed() -> AsyncIterator[Testbed]:
    require_envoy()
    async with running_testbed(TestbedOptions(topology=TOPOLOGY, knobs=KNOBS)) as running:
        yield running


def _client(url: str) -> object:
    import openai

    return openai.AsyncOpenAI(
        base_url=url + "/v1",
        api_key="unused",
        max_retries=0,
        default_headers={"Host": SERVICE_HOST, "x-inference-priority": "critical"},
    )


def _check_arrival(sent: float, arrivals: list[float]) -> None:
    """Tokens came as they were made: the first long before the last, then one a step."""
    assert len(arrivals) == TOKENS
    ttft, total = arrivals[0] - sent, arrivals[-1] - sent
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert ttft < 0.35 * total, (ttft, total)
    assert total > 0.5  # eleven steps of 66 ms at least
    assert statistics.median(gaps) > 0.03  # spread out, not a burst at the end


@pytest.mark.timeout(120)
async def test_completion_streams_through_the_sidecar_as_tokens_are_made(bed: Testbed) -> None:
    import openai

    client = _client(bed.urls[Entry.INFERLANE]["app"])
    assert isinstance(client, openai.AsyncOpenAI)
    sent = time.perf_counter()
    stream = await client.completions.create(
        model="llama",
        prompt="tell me about the fast lane",
        max_tokens=TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals, text, usage = [], "", None
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.text:
                arrivals.append(time.perf_counter())
                text += choice.text
        usage = chunk.usage or usage
    await client.close()
    _check_arrival(sent, arrivals)
    assert text.startswith(" the model says hello")
    assert usage is not None and usage.completion_tokens == TOKENS
    stats = await bed.pods.stats()
    assert sum(s.by_priority.get("critical", 0) for s in stats.values()) >= 1


@pytest.mark.timeout(120)
async def test_chat_streams_through_the_gateway_as_tokens_are_made(bed: Testbed) -> None:
    import openai

    client = _client(bed.urls[Entry.INFERLANE]["edge"])
    assert isinstance(client, openai.AsyncOpenAI)
    sent = time.perf_counter()
    stream = await client.chat.completions.create(
        model="llama",
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=TOKENS,
        stream=True,
    )
    arrivals, roles = [], []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                arrivals.append(time.perf_counter())
    await client.close()
    _check_arrival(sent, arrivals)
    assert roles == ["assistant"]
