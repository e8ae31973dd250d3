"""Every refusal says why, through real Envoys (SPEC "Refusals").

``llama``'s pod has its own sidecar: it refuses a second sheddable request within its
local rate (``rate-limit``) and critical from a caller not on its list
(``critical-caller``). The caller's sidecar refuses a third standard request in the hour
(``global-rate-limit``), a request over the caller's token budget (``token-budget``), and
sheddable requests over their share of ``mistral``'s concurrency (``concurrency``). A
refusal is a 429, 403 or 503 that carries ``x-inferlane-refused``; a model server's own
error never does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from mesh.model import PRIORITY_HEADER, REFUSED_HEADER
from tests.e2e_mtls.harness import SERVICE_PORT, TD, client_tls
from tests.e2e_ratelimit.harness import Caller, model_mesh
from tests.support.envoy import require_envoy
from tests.support.wait import eventually

pytestmark = pytest.mark.envoy

GPU, MISTRAL_GPU, CHAT = "127.0.82.1", "127.0.82.2", "127.0.82.10"
LLAMA = {
    "inferlane.io/rate-limit": "sheddable=0.01",  # one, then one more per 100 s
    "inferlane.io/global-rate-limit": f"standard={2 / 3600}",  # two an hour
    "inferlane.io/critical-callers": "default/ops,default/chat",
    "inferlane.io/token-budget": "critical:default/chat=300/h",
}
MISTRAL = {"inferlane.io/max-concurrency": "2"}


async def post(
    session: aiohttp.ClientSession,
    caller: Caller,
    priority: str,
    *,
    service: str = "llama",
    max_tokens: int = 200,
) -> tuple[int, str | None, str | None]:
    """One completion: (status, x-inferlane-refused, retry-after)."""
    body = {"model": service, "prompt": "one two three", "max_tokens": max_tokens}
    headers = {"Host": f"{service}:{SERVICE_PORT}", PRIORITY_HEADER: priority}
    async with session.post(caller.url + "/v1/completions", json=body, headers=headers) as r:
        await r.read()
        return r.status, r.headers.get(REFUSED_HEADER), r.headers.get("retry-after")


async def test_each_refusal_names_its_reason(tmp_path: Path) -> None:
    require_envoy()
    services = {"llama": (GPU, LLAMA), "mistral": (MISTRAL_GPU, MISTRAL)}
    async with (
        model_mesh(tmp_path, services, {"chat-0": CHAT}, backend_sidecars=True) as mesh,
        aiohttp.ClientSession() as session,
    ):
        chat, server = mesh.callers["chat-0"], mesh.backends["llama"]

        async def through_llamas_sidecar() -> bool:
            headers = {"Host": f"llama:{SERVICE_PORT}", PRIORITY_HEADER: "critical"}
            async with session.get(chat.url + "/v1/models", headers=headers) as resp:
                await resp.read()
            stats = await server.envoy.stats("downstream_rq_2xx")
            return any(k.startswith("http.inbound_") and v > 0 for k, v in stats.items())

        await eventually(through_llamas_sidecar, timeout=20, what="llama's own sidecar in path")

        # rate-limit: the endpoint's sidecar admits one sheddable request per 100 s.
        assert (await post(session, chat, "sheddable"))[:2] == (200, None)
        status, reason, _ = await post(session, chat, "sheddable")
        assert (status, reason) == (429, "rate-limit")

        # global-rate-limit: the caller's sidecar, two standard requests an hour.
        for _ in range(2):
            assert (await post(session, chat, "standard"))[:2] == (200, None)
        status, reason, retry_after = await post(session, chat, "standard")
        assert (status, reason) == (429, "global-rate-limit")
        assert retry_after is not None and 0 < int(retry_after) <= 3600

        # token-budget: chat's critical requests draw on 300 tokens an hour.
        assert (await post(session, chat, "critical", max_tokens=150))[:2] == (200, None)
        status, reason, retry_after = await post(session, chat, "critical", max_tokens=150)
        assert (status, reason) == (429, "token-budget")
        assert retry_after is not None

        # critical-caller: a peer with a mesh certificate not on the list, straight to the
        # endpoint's sidecar (its own sidecar would have lowered it to standard).
        assert mesh.plane.secrets is not None
        ca = mesh.plane.secrets.ca
        url = f"https://{GPU}:{server.sidecar.inbound_port}/v1"

        async def direct(account: str, path: str, priority: str) -> tuple[int, str | None]:
            tls = client_tls(ca, ca.issue_workload(TD, "default", account), tmp_path / account)
            headers = {"Host": f"llama:{SERVICE_PORT}", PRIORITY_HEADER: priority}
            connector = aiohttp.TCPConnector(ssl=tls)
            async with (
                aiohttp.ClientSession(connector=connector) as mtls,
                mtls.get(url + path, headers=headers) as resp,
            ):
                return resp.status, resp.headers.get(REFUSED_HEADER)

        assert await direct("batch", "/models", "critical") == (403, "critical-caller")
        assert await direct("ops", "/models", "critical") == (200, None)
        # Not a refusal: the model server's own 404 carries no reason.
        assert await direct("batch", "/nothing", "standard") == (404, None)

        # concurrency: mistral's sheddable share of max-concurrency 2 is one request in
        # flight (and one waiting) from this sidecar; more at once are shed with 503.
        slow = [
            post(session, chat, "sheddable", service="mistral", max_tokens=300) for _ in range(6)
        ]
        results = await asyncio.gather(*slow)
        assert (503, "concurrency") in [(s, r) for s, r, _ in results]
        assert all(r is None for s, r, _ in results if s == 200)
