"""Token budgets through real Envoys, the rate-limit service and a simulated vLLM (issue 13).

Callers use the official OpenAI client through their own sidecar (SotW ADS, and Delta
once). Each request names its prompt's size (``x-inferlane-prompt-tokens``, as counted by
the simulator), so that a reservation is exactly its prompt plus ``max_tokens``;
``sim_output_tokens`` makes the simulated answer end before ``max_tokens``, as real ones
do. Windows are an hour long, so none rolls over during a test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from mesh.analyze import analyze
from mesh.manifests import load_world
from mesh.model import PRIORITY_HEADER, REFUSED_HEADER
from ratelimit.tokens import PROMPT_TOKENS_HEADER
from tests.e2e.harness import admin_text
from tests.e2e_ratelimit.conftest import RedisServer
from tests.e2e_ratelimit.harness import Caller, ModelMesh, model_mesh
from tests.support.envoy import require_envoy
from tests.support.wait import eventually
from xds_server.rls.runtime import RateLimitSettings

pytestmark = pytest.mark.envoy

GPU, MISTRAL_GPU = "127.0.81.1", "127.0.81.2"
CHAT, BATCH, CHAT_1 = "127.0.81.10", "127.0.81.11", "127.0.81.12"
#: Five words: the simulator counts five prompt tokens.
PROMPT = "one two three four five"
PROMPT_TOKENS = 5
USED = "inferlane_token_budget_used_tokens_total"
RETURNED = "inferlane_token_budget_returned_tokens_total"
RESERVED = "inferlane_token_budget_reserved_tokens_total"
SETTLED = "inferlane_token_budget_settlements_total"


async def complete(
    caller: Caller,
    *,
    max_tokens: int,
    output: int | None = None,
    priority: str = "standard",
    host: str = "llama:8000",
    model: str = "llama",
) -> tuple[int, Any, Any]:
    """One completion: ``(status, headers, body)``; the body parsed from JSON."""
    client = caller.openai(host)
    extra: dict[str, Any] = {} if output is None else {"sim_output_tokens": output}
    try:
        raw = await client.completions.with_raw_response.create(
            model=model,
            prompt=PROMPT,
            max_tokens=max_tokens,
            extra_body=extra,
            extra_headers={PRIORITY_HEADER: priority, PROMPT_TOKENS_HEADER: str(PROMPT_TOKENS)},
        )
        return raw.status_code, raw.headers, raw.parse()
    except openai.APIStatusError as exc:
        return exc.status_code, exc.response.headers, exc.response.json()
    finally:
        await client.close()


async def settled(mesh: ModelMesh, count: float, budget: str = "default/chat") -> None:
    """Wait until ``count`` ends of requests replaced their reservation."""

    async def done() -> bool:
        return mesh.sample(SETTLED, outcome="replaced") >= count

    await eventually(done, timeout=10, what=f"{count} settlements of {budget}")


async def test_over_its_budget_a_caller_gets_429_and_others_are_untouched(
    tmp_path: Path,
) -> None:
    require_envoy()
    budgets = "default/chat=600/h,*=100000/h,critical:default/batch=600/h"
    services = {"llama": (GPU, {"inferlane.io/token-budget": budgets})}
    async with model_mesh(tmp_path, services, {"chat-0": CHAT, "batch-0": BATCH}) as mesh:
        chat, batch = mesh.callers["chat-0"], mesh.callers["batch-0"]
        # Each request reserves 5 + 200 tokens and uses as many: two fit in 600, not three.
        for _ in range(2):
            status, headers, body = await complete(chat, max_tokens=200)
            assert status == 200, body
            assert body.usage.total_tokens == 205
        status, headers, body = await complete(chat, max_tokens=200)
        assert status == 429
        assert headers[REFUSED_HEADER] == "token-budget"
        assert 0 < int(headers["retry-after"]) <= 3600
        assert headers["x-ratelimit-limit"] == '600, 600;w=3600;name="default/llama:default/chat"'
        assert headers["x-ratelimit-remaining"] == "190"
        assert int(headers["x-ratelimit-reset"]) == int(headers["retry-after"])
        assert body["error"]["type"] == "token_budget_exceeded"
        assert "reserves 205 tokens" in body["error"]["message"]
        assert "190 remain" in body["error"]["message"]
        # batch draws on its own budget (the * entry), untouched by chat's.
        assert [(await complete(batch, max_tokens=200))[0] for _ in range(3)] == [200] * 3
        # critical is never charged unless an entry names it: chat's is not...
        critical = [(await complete(chat, max_tokens=200, priority="critical"))[0] for _ in "123"]
        assert critical == [200] * 3
        # ...batch's is (critical:default/batch=600/h), apart from its standard budget.
        critical = [(await complete(batch, max_tokens=200, priority="critical"))[0] for _ in "123"]
        assert critical == [200, 200, 429]
        assert (
            mesh.sample(
                "inferlane_token_budget_refused_total",
                service="default/llama",
                budget="default/chat",
            )
            == 1
        )
        assert (
            mesh.sample(
                "inferlane_token_budget_refused_total",
                service="default/llama",
                budget="critical:default/batch",
            )
            == 1
        )
        page = json.loads(await admin_text(mesh.plane, "/debug/ratelimits"))
        budgets_seen = {
            (b["budget"], c["caller"]): c
            for b in page["global"]["token_budgets"]
            for c in b["callers"]
        }
        chat_window = budgets_seen[("default/chat", "default/chat")]
        assert chat_window["refused"] == 1 and chat_window["reserved"] == 410
        assert budgets_seen[("*", "default/batch")]["reserved"] == 615


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_unused_reserved_tokens_come_back(tmp_path: Path, delta: bool) -> None:
    require_envoy()
    services = {"llama": (GPU, {"inferlane.io/token-budget": "default/chat=100000/h"})}
    async with model_mesh(tmp_path, services, {"chat-0": CHAT}, delta=delta) as mesh:
        chat = mesh.callers["chat-0"]
        status, first, body = await complete(chat, max_tokens=1000, output=10)
        assert status == 200 and body.usage.total_tokens == PROMPT_TOKENS + 10
        reserved = PROMPT_TOKENS + 1000
        left_by_reservation = int(first["x-ratelimit-remaining"])
        assert left_by_reservation == 100000 - reserved
        await settled(mesh, 1)
        assert mesh.sample(RETURNED, service="default/llama", budget="default/chat") == 990
        status, second, _ = await complete(chat, max_tokens=1000, output=10)
        # Before the second reservation, the budget held 990 more than the first
        # reservation had left: only what the first request used stayed charged.
        assert int(second["x-ratelimit-remaining"]) + reserved - left_by_reservation == 990


async def test_streamed_and_whole_completions_are_settled_from_their_usage(
    tmp_path: Path,
) -> None:
    require_envoy()
    services = {"llama": (GPU, {"inferlane.io/token-budget": "default/chat=100000/h"})}
    async with model_mesh(tmp_path, services, {"chat-0": CHAT}) as mesh:
        client = mesh.callers["chat-0"].openai()
        used: list[int] = []
        common: dict[str, Any] = {
            "model": "llama",
            "max_tokens": 500,
            "extra_body": {"sim_output_tokens": 7},
        }
        whole = await client.completions.create(prompt=PROMPT, **common)
        used.append(whole.usage.total_tokens)
        chat = await client.chat.completions.create(
            messages=[{"role": "user", "content": PROMPT}], **common
        )
        used.append(chat.usage.total_tokens)
        for stream in (
            await client.completions.create(
                prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **common
            ),
            await client.chat.completions.create(
                messages=[{"role": "user", "content": PROMPT}],
                stream=True,
                stream_options={"include_usage": True},
                **common,
            ),
        ):
            usage = None
            async for chunk in stream:
                usage = chunk.usage or usage
            assert usage is not None
            used.append(usage.total_tokens)
        await settled(mesh, 4)
        assert mesh.sample(USED, service="default/llama", budget="default/chat") == sum(used)
        reserved = mesh.sample(RESERVED, service="default/llama", budget="default/chat")
        returned = mesh.sample(RETURNED, service="default/llama", budget="default/chat")
        assert returned == reserved - sum(used)

        # A stream that reports no usage, and one whose client leaves, are charged their
        # reservation: nothing settles them.
        plain = await client.completions.create(prompt=PROMPT, stream=True, **common)
        async for _ in plain:
            pass
        slow = {**common, "max_tokens": 400, "extra_body": {}}
        abandoned = await client.completions.create(prompt=PROMPT, stream=True, **slow)
        async for _ in abandoned:
            break
        await abandoned.close()
        sim = mesh.sims["llama"]

        async def aborted() -> bool:
            return sim.stats().aborted == 1

        await eventually(aborted, what="the model server to drop the abandoned stream")
        marker = await client.completions.create(prompt=PROMPT, **common)
        await settled(mesh, 5)
        assert (
            mesh.sample(USED, service="default/llama", budget="default/chat")
            == sum(used) + marker.usage.total_tokens
        )
        assert mesh.sample(SETTLED, outcome="replaced") == 5
        await client.close()


async def test_two_rate_limit_replicas_sharing_redis_hold_one_budget(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    require_envoy()
    services = {"llama": (GPU, {"inferlane.io/token-budget": "default/chat=1000/h"})}
    limits = RateLimitSettings(rls_port=0, redis_url=redis_server.url, redis_timeout_s=0.5)
    callers = {"chat-0": CHAT, "chat-1": CHAT_1}
    async with model_mesh(tmp_path, services, callers, limits=limits, replicas=2) as mesh:
        # Two pods of one caller, each asking its own control plane's service.
        rls = {p.ratelimits.port for p in mesh.planes}
        assert len(rls) == 2
        chat_0, chat_1 = mesh.callers["chat-0"], mesh.callers["chat-1"]
        statuses = []
        for i in range(6):
            status, _, _ = await complete(chat_0 if i % 2 == 0 else chat_1, max_tokens=200)
            statuses.append(status)
        # 205 tokens each: four fit in the one budget of 1000, whichever replica counts.
        assert statuses == [200, 200, 200, 200, 429, 429]
        for plane in mesh.planes:
            reserved = plane.ratelimits.registry.get_sample_value(
                RESERVED, {"service": "default/llama", "budget": "default/chat"}
            )
            assert reserved == 410


async def test_a_bad_budget_is_reported_and_served_at_its_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_envoy()
    services = {
        "llama": (GPU, {"inferlane.io/token-budget": "default/chat=lots/m"}),
        "mistral": (MISTRAL_GPU, {"inferlane.io/token-budget": "default/chat=300/h"}),
    }
    async with model_mesh(tmp_path, services, {"chat-0": CHAT}) as mesh:
        chat = mesh.callers["chat-0"]
        page = json.loads(await admin_text(mesh.plane, "/debug/services"))
        errors = {s["name"]: s["errors"] for s in page["services"]}
        assert errors["mistral"] == []
        (error,) = errors["llama"]
        assert "inferlane.io/token-budget" in str(error) and "lots" in str(error)
        assert any("token-budget" in m and "lots" in m for m in caplog.messages)
        # llama is served at the default, no budget: nothing refuses or charges chat...
        statuses = [(await complete(chat, max_tokens=200))[0] for _ in range(4)]
        assert statuses == [200] * 4
        # ...while mistral's budget, next to it, still holds.
        mistral = [
            (await complete(chat, max_tokens=200, host="mistral:8000", model="mistral"))[0]
            for _ in range(2)
        ]
        assert mistral == [200, 429]
        assert mesh.sample(RESERVED, service="default/llama", budget="default/chat") == 0
        findings = analyze(load_world(tmp_path / "mesh.yaml"))
        assert any(f.code == "IL0001" and "token-budget" in f.message for f in findings)
