"""Issue 10, "What it must show" 3 (the timeout half): streams and the class timeout.

The class timeout (``inferlane.io/timeout``, 1 s here) is how long a request may go
without a byte from the model server. A streamed completion of 3 s, through a sidecar and
through the gateway, read with the official OpenAI client: tokens arrive as they are
produced (the first long before the last), and the stream completes although it lasts
three times the timeout. A model server that stalls for longer than the timeout has its
stream cut; a non-streamed answer that takes longer gets 504.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e_admission.harness import LLAMA, Mesh, complete, mesh, sim
from tests.support.envoy import require_envoy

pytestmark = pytest.mark.envoy

TIMEOUT = {"inferlane.io/timeout": "standard=1s,sheddable=1s"}
TOKENS = 60


async def _stream(url: str, priority: str) -> tuple[int, float, float]:
    """Stream a completion with the OpenAI client: (tokens, first token s, total s)."""
    client = openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key="unused",
        max_retries=0,
        timeout=30,
        default_headers={"Host": LLAMA, "x-inference-priority": priority},
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    first: float | None = None
    tokens = 0
    async with client:
        stream = await client.completions.create(
            model="llama", prompt="hello", max_tokens=TOKENS, stream=True
        )
        async for chunk in stream:
            words = len(chunk.choices[0].text.split()) if chunk.choices else 0
            if words and first is None:
                first = loop.time() - started
            tokens += words
    assert first is not None
    return tokens, first, loop.time() - started


async def test_a_stream_longer_than_the_timeout_completes_while_tokens_flow(
    tmp_path: Path,
) -> None:
    require_envoy()
    pods = [sim("gpu-0", "127.0.93.1", step_ms=50)]  # 60 tokens: 3 s
    m: Mesh
    async with mesh(tmp_path, TIMEOUT, pods, ["127.0.93.10"], gateway_ip="127.0.93.20") as m:
        for url, priority in ((m.caller_url(), "standard"), (m.gateway_url, "sheddable")):
            tokens, first_s, total_s = await _stream(url, priority)
            assert tokens == TOKENS
            assert total_s > 2.0, total_s  # twice the class timeout, and more
            assert first_s < total_s / 4, (first_s, total_s)
        # The caller's sidecar recorded the one stream it carried: its time to first token
        # (the first byte of the answer) is a fraction of the whole request.
        text = await m.caller_envoys[0].admin_get("/stats/prometheus")
        sums = {
            sample.name.removeprefix("envoy_inferlane_request_").removesuffix("_sum"): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.endswith("_sum")
            and sample.name.startswith("envoy_inferlane_request_")
            and "|standard|" in sample.labels.get("cluster", "")
        }
        assert sums["duration"] > 2000 and 0 < sums["ttft"] < sums["duration"] / 4, sums


async def test_a_stalled_model_server_is_cut_after_the_timeout(tmp_path: Path) -> None:
    require_envoy()
    pods = [sim("gpu-0", "127.0.94.1", step_ms=1800)]  # a token every 1.8 s
    async with (
        mesh(tmp_path, TIMEOUT, pods, ["127.0.94.10"]) as m,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, _, body = await complete(session, m.caller_url(), "standard", 3)
        assert status == 504, body
        assert loop.time() - started < 1.7
        started = loop.time()
        request = {"model": "llama", "prompt": "hi", "max_tokens": 3, "stream": True}
        url = f"{m.caller_url()}/v1/completions"
        received = b""
        async with session.post(url, json=request, headers={"Host": LLAMA}) as resp:
            # The stream had started, then no token came for longer than the timeout:
            # Envoy resets it at 1 s, before the first token (1.8 s) reaches it. The
            # client sees the connection close a second later (Envoy's delayed close).
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk
        assert received == b""
        assert loop.time() - started < 3.0  # the second token would come at 3.6 s
