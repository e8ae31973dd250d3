"""Token budgets: reserve and settle against charge at the end, side by side.

``python -m bench.tokens`` runs, at the same time and on the same settings, one caller
with ``--concurrency`` streams against a budget of ``--budget`` tokens per window, twice:

- **reserve and settle** (inferlane): a control plane whose proxies reserve each
  request's worst case at admission and settle on its usage;
- **charge at the end** (Envoy AI Gateway's method, the same code in
  ``--token-budget-mode charge-at-end``): a second control plane whose proxies only
  check at admission and charge the usage when the stream ends.

Each has its own simulated GPU pod (:mod:`bench.gpu_sim`, in a child process), its own
Service and its own caller sidecar (a real Envoy), so neither takes GPU time from the
other. Each caller runs a closed loop: every stream, once done, starts the next; a
refused one waits for its ``retry-after`` (and up to a second more, so that callers do
not all return at the same instant), as a well-behaved client does. Requests stream
with ``stream_options.include_usage``, ask ``--max-tokens`` and end on their own after
a long-tailed number of tokens (``sim_output_tokens``), as real answers end at their
end-of-sequence token.

What it measures, per budget window (aligned to the epoch, as the counters are):

- the tokens served for requests admitted in that window (their reported usage, prompt
  included), against the budget: the **overshoot** is the largest window's excess. A
  budget cannot cut a stream, so a request's tokens belong to the window that admitted
  it. Charge-at-end's own books count a request in the window it ends in; that view is
  shown too;
- the budget used: what each window served over the budget, so that a method does not
  meet its bound by refusing work the budget allowed;
- then, on the reserve-and-settle caller with a budget that never binds, **what the
  budget check adds to each request**: time to the response's headers and to the first
  token, against a Service without a budget on the same pod, requests alternating.

Figures from a shared or small machine are indicative; ``--windows 5`` (the default)
is the full run, ``make bench`` runs ``--windows 1 --latency-requests 400``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

from bench.envoy import envoy_binary, running_envoy
from bench.gpu_sim import SimConfig, StepCost
from bench.load import LengthDist, percentile
from bench.testbed import (
    PodHost,
    TestbedError,
    listener_url,
    node_id,
    running_control_plane,
    sidecar_metadata,
    wait_routed,
)
from bench.topology import NAMESPACE, account_document, pod_document, write_documents
from ratelimit.tokens import TokenBudgetMode
from xds_server.app import ControlPlane
from xds_server.rls.runtime import RateLimitSettings

#: Addresses of this benchmark's pods and callers (loopback, its own range).
RESERVE_POD, CHARGE_POD = "127.0.86.1", "127.0.86.2"
RESERVE_CALLER, CHARGE_CALLER = "127.0.86.10", "127.0.86.11"
CALLER_ACCOUNT: Final = "chat"
PORT: Final = 8000
#: The Services: one budgeted per mode, then a generous budget and none at all on the
#: reserve pod, for the latency comparison.
RESERVE, CHARGE, WIDE, OPEN = "llama-reserve", "llama-charge", "wide", "open"
#: A budget no latency probe comes near (the largest a window holds).
WIDE_BUDGET: Final = 2**32 - 1
WINDOWS: Final = {"s": 1, "m": 60, "h": 3600}
#: Prompt lengths in words (one token each to the simulator, about 1.5 by the sidecar's
#: estimate of a byte count over four) and answer lengths in tokens.
PROMPT_WORDS: Final = LengthDist(median=128, sigma=0.6, low=16, high=1024)
ANSWER_TOKENS: Final = LengthDist(median=64, sigma=0.8, low=4, high=4096)


@dataclass(frozen=True)
class TokenBenchOptions:
    """One run. Tokens per window; times in seconds."""

    concurrency: int = 256
    budget: int = 100_000
    window: str = "m"
    #: Complete windows measured, after the partial one the run starts in.
    windows: int = 5
    max_tokens: int = 256
    prompt_words: LengthDist = PROMPT_WORDS
    answer_tokens: LengthDist = ANSWER_TOKENS
    #: The simulated GPU's speed: the calibrated A100 times ``slowdown``, or a flat
    #: ``step_ms`` per engine step (tests).
    slowdown: float = 2.0
    step_ms: float | None = None
    latency_requests: int = 1000
    latency_concurrency: int = 8
    seed: int = 13
    setup_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.window not in WINDOWS:
            raise ValueError(f"window must be one of {', '.join(WINDOWS)}")
        if min(self.concurrency, self.budget, self.windows, self.max_tokens) < 1:
            raise ValueError("concurrency, budget, windows and max_tokens must be positive")

    @property
    def window_s(self) -> int:
        return WINDOWS[self.window]


@dataclass(frozen=True)
class Completed:
    """One admitted request: when it was admitted and ended (Unix time), what it used."""

    admitted_at: float
    ended_at: float
    tokens: int
    ttft_s: float


@dataclass
class ModeResult:
    """What one caller saw, and the per-window totals computed from it."""

    mode: TokenBudgetMode
    completed: list[Completed] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    failed: int = 0

    def served(self, starts: Sequence[int], window_s: int, *, by_end: bool = False) -> list[int]:
        """Tokens of the requests admitted (or, ``by_end``, ended) in each window."""
        out = dict.fromkeys(starts, 0)
        for c in self.completed:
            at = c.ended_at if by_end else c.admitted_at
            start = int(at // window_s) * window_s
            if start in out:
                out[start] += c.tokens
        return [out[s] for s in starts]

    def refused_in(self, starts: Sequence[int], window_s: int) -> list[int]:
        out = dict.fromkeys(starts, 0)
        for at in self.refused:
            start = int(at // window_s) * window_s
            if start in out:
                out[start] += 1
        return [out[s] for s in starts]


@dataclass(frozen=True)
class Latency:
    """Times to the response's headers and to its first token, in ms, for one Service."""

    service: str
    headers_ms: tuple[float, ...]
    first_token_ms: tuple[float, ...]

    def p(self, pct: float, *, first_token: bool = False) -> float:
        value = percentile(self.first_token_ms if first_token else self.headers_ms, pct)
        return math.nan if value is None else value


@dataclass(frozen=True)
class TokenBenchResult:
    options: TokenBenchOptions
    window_starts: tuple[int, ...]
    modes: tuple[ModeResult, ...]
    latency: tuple[Latency, Latency]

    def overshoot(self, mode: ModeResult, *, by_end: bool = False) -> float:
        """The largest window's tokens over the budget, minus one (0.05 is 5 % over)."""
        served = mode.served(self.window_starts, self.options.window_s, by_end=by_end)
        return max(served) / self.options.budget - 1.0

    def used(self, mode: ModeResult) -> float:
        """The mean window's tokens over the budget."""
        served = mode.served(self.window_starts, self.options.window_s)
        return sum(served) / len(served) / self.options.budget

    def to_json(self) -> dict[str, Any]:
        opts = dataclasses.asdict(self.options)
        out: dict[str, Any] = {"options": opts, "window_starts": list(self.window_starts)}
        for mode in self.modes:
            window_s = self.options.window_s
            ttfts = [c.ttft_s * 1000 for c in mode.completed]
            out[str(mode.mode)] = {
                "served": mode.served(self.window_starts, window_s),
                "served_by_end": mode.served(self.window_starts, window_s, by_end=True),
                "refused": mode.refused_in(self.window_starts, window_s),
                "overshoot": self.overshoot(mode),
                "overshoot_by_end": self.overshoot(mode, by_end=True),
                "budget_used": self.used(mode),
                "failed": mode.failed,
                "ttft_p50_ms": percentile(ttfts, 50),
                "ttft_p99_ms": percentile(ttfts, 99),
            }
        budgeted, unbudgeted = self.latency
        out["latency"] = {
            lat.service: {
                "headers_p50_ms": lat.p(50),
                "headers_p99_ms": lat.p(99),
                "first_token_p50_ms": lat.p(50, first_token=True),
                "first_token_p99_ms": lat.p(99, first_token=True),
                "requests": len(lat.headers_ms),
            }
            for lat in (budgeted, unbudgeted)
        }
        out["latency"]["added_p99_ms"] = budgeted.p(99) - unbudgeted.p(99)
        return out


# --- the mesh -------------------------------------------------------------------------


def _service(name: str, app: str, budget: int | None, window: str) -> dict[str, Any]:
    annotations = {
        "inferlane.io/enabled": "true",
        # Streams are long at full batch; the deadline is the client's.
        "inferlane.io/timeout": "critical=600s,standard=600s,sheddable=600s",
    }
    if budget is not None:
        annotations["inferlane.io/token-budget"] = f"{NAMESPACE}/{CALLER_ACCOUNT}={budget}/{window}"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE, "annotations": annotations},
        "spec": {
            "selector": {"app": app},
            "ports": [{"name": "http", "port": PORT, "targetPort": "http"}],
        },
    }


def manifests(opts: TokenBenchOptions, ports: Mapping[str, int]) -> list[dict[str, Any]]:
    """The four Services, the two model pods (at ``ports``) and the two callers."""
    gpu = {"nvidia.com/gpu": 1}
    return [
        _service(RESERVE, RESERVE, opts.budget, opts.window),
        _service(CHARGE, CHARGE, opts.budget, opts.window),
        _service(WIDE, RESERVE, WIDE_BUDGET, opts.window),
        _service(OPEN, RESERVE, None, opts.window),
        account_document(CALLER_ACCOUNT),
        account_document("llama"),
        *(
            pod_document(
                f"{svc}-0", ip, account="llama", labels={"app": svc}, port=ports[svc], resources=gpu
            )
            for svc, ip in ((RESERVE, RESERVE_POD), (CHARGE, CHARGE_POD))
        ),
        *(
            pod_document(
                f"{name}-0",
                ip,
                account=CALLER_ACCOUNT,
                labels={"app": name},
                port=None,
                resources={},
            )
            for name, ip in (("chat-reserve", RESERVE_CALLER), ("chat-charge", CHARGE_CALLER))
        ),
    ]


def sim_configs(opts: TokenBenchOptions) -> list[SimConfig]:
    """One pod per mode, each with room for every stream at once (no queue, no
    preemption): the budget, not the GPU, is what binds."""
    common: dict[str, Any] = {
        "max_num_seqs": max(64, opts.concurrency * 2),
        "kv_cache_tokens": max(
            2**17, opts.concurrency * (opts.prompt_words.high + opts.max_tokens) * 2
        ),
        "max_model_len": opts.prompt_words.high + opts.max_tokens + 64,
        "slowdown": opts.slowdown,
    }
    if opts.step_ms is not None:
        common["cost"] = StepCost.flat(opts.step_ms)
    return [
        SimConfig.gpu_pod(f"{RESERVE}-0", RESERVE_POD, **common),
        SimConfig.gpu_pod(f"{CHARGE}-0", CHARGE_POD, **common),
    ]


@dataclass
class Bed:
    """The running mesh: each mode's caller URL, and the control planes."""

    urls: dict[TokenBudgetMode, str]
    planes: dict[TokenBudgetMode, ControlPlane]


@contextlib.asynccontextmanager
async def running_bed(opts: TokenBenchOptions) -> AsyncIterator[Bed]:
    envoy_binary()
    workdir = Path(tempfile.mkdtemp(prefix="inferlane-tokens-"))
    pods = PodHost(sim_configs(opts), workdir)
    try:
        await pods.start(opts.setup_timeout_s)
        ports = {svc: int(pods.urls[f"{svc}-0"].rsplit(":", 1)[1]) for svc in (RESERVE, CHARGE)}
        manifest = write_documents(workdir / "mesh.yaml", manifests(opts, ports))
        async with contextlib.AsyncExitStack() as stack:
            bed = Bed({}, {})
            for mode, ip, name in (
                (TokenBudgetMode.RESERVE, RESERVE_CALLER, "chat-reserve"),
                (TokenBudgetMode.CHARGE_AT_END, CHARGE_CALLER, "chat-charge"),
            ):
                limits = RateLimitSettings(rls_port=0, token_budget_mode=mode)
                plane = await stack.enter_async_context(
                    running_control_plane(manifest, opts.setup_timeout_s, limits)
                )
                meta = sidecar_metadata(ip, CALLER_ACCOUNT)
                envoy = await stack.enter_async_context(
                    running_envoy(
                        node_id("sidecar", ip, f"{name}-0"), plane.ports["xds"], metadata=meta
                    )
                )
                port = int(meta["INFERLANE_OUTBOUND_PORT"])
                bed.urls[mode] = await listener_url(envoy, opts.setup_timeout_s, port=port)
                bed.planes[mode] = plane
            for mode, services in (
                (TokenBudgetMode.RESERVE, (RESERVE, WIDE, OPEN)),
                (TokenBudgetMode.CHARGE_AT_END, (CHARGE,)),
            ):
                for svc in services:
                    await wait_routed(
                        bed.urls[mode],
                        "standard",
                        opts.setup_timeout_s,
                        f"{mode} to {svc}",
                        host=f"{svc}:{PORT}",
                        model="llama",
                    )
            yield bed
    finally:
        await pods.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- the callers ----------------------------------------------------------------------


def _body(opts: TokenBenchOptions, rng: random.Random, *, max_tokens: int) -> dict[str, Any]:
    words = opts.prompt_words.draw(rng)
    return {
        "model": "llama",
        "prompt": " ".join(["token"] * words),
        "max_tokens": max_tokens,
        "sim_output_tokens": opts.answer_tokens.draw(rng),
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass(frozen=True)
class _Answer:
    status: int
    #: When its headers came (Unix time): the budget's decision, a moment before.
    decided_at: float
    retry_after_s: float
    headers_s: float
    first_token_s: float
    tokens: int


async def _stream(
    session: aiohttp.ClientSession, url: str, host: str, body: Mapping[str, Any]
) -> _Answer:
    """One streamed completion: its status, and for a 200 the times (from its start) to
    the headers and to the first token, and the usage's total tokens."""
    sent = time.perf_counter()
    headers = {"Host": host}
    async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
        headers_s = time.perf_counter() - sent
        decided_at = time.time()
        if resp.status != 200:
            await resp.read()
            retry = resp.headers.get("retry-after", "1")
            retry_s = float(retry) if retry.isdigit() else 1.0
            return _Answer(resp.status, decided_at, retry_s, headers_s, 0.0, 0)
        first_token_s, tokens = 0.0, 0
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            if not first_token_s:
                first_token_s = time.perf_counter() - sent
            if b'"usage": {' in line:
                tokens = int(json.loads(line[6:])["usage"]["total_tokens"])
        return _Answer(200, decided_at, 0.0, headers_s, first_token_s, tokens)


async def _caller(
    opts: TokenBenchOptions, url: str, host: str, result: ModeResult, *, until: float, seed: int
) -> None:
    """``opts.concurrency`` closed-loop streams from one caller, until ``until``."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def stream(index: int) -> None:
            rng = random.Random(seed * 1_000_003 + index)
            while time.time() < until:
                body = _body(opts, rng, max_tokens=opts.max_tokens)
                try:
                    answer = await _stream(session, url, host, body)
                except (aiohttp.ClientError, TimeoutError):
                    result.failed += 1
                    await asyncio.sleep(1.0)
                    continue
                if answer.status == 429:
                    result.refused.append(answer.decided_at)
                    await asyncio.sleep(answer.retry_after_s + rng.random())
                elif answer.status == 200 and answer.tokens:
                    result.completed.append(
                        Completed(
                            answer.decided_at, time.time(), answer.tokens, answer.first_token_s
                        )
                    )
                else:
                    result.failed += 1

        await asyncio.gather(*(stream(i) for i in range(opts.concurrency)))


async def _latency(opts: TokenBenchOptions, url: str) -> tuple[Latency, Latency]:
    """Requests alternating between the generously budgeted Service and the one without
    a budget (same pod), ``latency_concurrency`` at a time."""
    times: dict[str, tuple[list[float], list[float]]] = {WIDE: ([], []), OPEN: ([], [])}
    per_worker = max(1, opts.latency_requests // opts.latency_concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker(index: int) -> None:
            rng = random.Random(opts.seed + index)
            for i in range(per_worker):
                svc = (WIDE, OPEN)[(i + index) % 2]
                body = {**_body(opts, rng, max_tokens=16), "sim_output_tokens": 4}
                answer = await _stream(session, url, f"{svc}:{PORT}", body)
                if answer.status == 200:
                    times[svc][0].append(answer.headers_s * 1000)
                    times[svc][1].append(answer.first_token_s * 1000)

        await asyncio.gather(*(worker(i) for i in range(opts.latency_concurrency)))
    wide, open_ = (Latency(s, tuple(times[s][0]), tuple(times[s][1])) for s in (WIDE, OPEN))
    return wide, open_


async def run_bench(opts: TokenBenchOptions) -> TokenBenchResult:
    async with running_bed(opts) as bed:
        window_s = opts.window_s
        first = (int(time.time() // window_s) + 1) * window_s
        starts = tuple(first + i * window_s for i in range(opts.windows))
        until = starts[-1] + window_s
        results = {mode: ModeResult(mode) for mode in bed.urls}
        hosts = {TokenBudgetMode.RESERVE: RESERVE, TokenBudgetMode.CHARGE_AT_END: CHARGE}
        await asyncio.gather(
            *(
                _caller(
                    opts,
                    bed.urls[mode],
                    f"{hosts[mode]}:{PORT}",
                    results[mode],
                    until=until,
                    seed=opts.seed + i,
                )
                for i, mode in enumerate(bed.urls)
            )
        )
        latency = await _latency(opts, bed.urls[TokenBudgetMode.RESERVE])
    return TokenBenchResult(opts, starts, tuple(results.values()), latency)


# --- the report -----------------------------------------------------------------------


def format_result(result: TokenBenchResult) -> list[str]:
    opts = result.options
    window = {"s": "second", "m": "minute", "h": "hour"}[opts.window]
    lines = [
        f"bench.tokens: one caller, {opts.concurrency} concurrent streams, a budget of "
        f"{opts.budget:,} tokens a {window}, {opts.windows} window(s) measured",
        "",
        f"{'window':>8}  " + "  ".join(f"{m.mode!s:>22}" for m in result.modes),
    ]
    served = {m.mode: m.served(result.window_starts, opts.window_s) for m in result.modes}
    refused = {m.mode: m.refused_in(result.window_starts, opts.window_s) for m in result.modes}
    for i, start in enumerate(result.window_starts):
        cells = [
            f"{served[m][i]:>9,} {served[m][i] / opts.budget:5.2f}x {refused[m][i]:>4}r"
            for m in served
        ]
        lines.append(
            f"{time.strftime('%H:%M:%S', time.localtime(start)):>8}  "
            + "  ".join(f"{c:>22}" for c in cells)
        )
    lines.append("")
    for m in result.modes:
        ttfts = [c.ttft_s * 1000 for c in m.completed]
        lines.append(
            f"{m.mode!s:>14}: overshoot {result.overshoot(m):+.1%} (by end of stream "
            f"{result.overshoot(m, by_end=True):+.1%}), budget used {result.used(m):.0%}, "
            f"TTFT p99 {percentile(ttfts, 99) or math.nan:,.0f} ms, {m.failed} failed"
        )
    budgeted, unbudgeted = result.latency
    lines += [
        "",
        f"budget check (reserve and settle, {opts.latency_concurrency} at a time, "
        f"{len(budgeted.headers_ms)}+{len(unbudgeted.headers_ms)} requests):",
        f"  headers     p50 {budgeted.p(50):6.1f} ms vs {unbudgeted.p(50):6.1f} ms without; "
        f"p99 {budgeted.p(99):6.1f} vs {unbudgeted.p(99):6.1f}: "
        f"+{budgeted.p(99) - unbudgeted.p(99):.1f} ms",
        f"  first token p50 {budgeted.p(50, first_token=True):6.1f} ms vs "
        f"{unbudgeted.p(50, first_token=True):6.1f} ms without; p99 "
        f"{budgeted.p(99, first_token=True):6.1f} vs {unbudgeted.p(99, first_token=True):6.1f}",
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tokens", description=__doc__)
    defaults = TokenBenchOptions()
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--budget", type=int, default=defaults.budget, help="tokens a window")
    parser.add_argument("--window", choices=sorted(WINDOWS), default=defaults.window)
    parser.add_argument("--windows", type=int, default=defaults.windows)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--slowdown", type=float, default=defaults.slowdown)
    parser.add_argument("--latency-requests", type=int, default=defaults.latency_requests)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        opts = TokenBenchOptions(
            concurrency=args.concurrency,
            budget=args.budget,
            window=args.window,
            windows=args.windows,
            max_tokens=args.max_tokens,
            slowdown=args.slowdown,
            latency_requests=args.latency_requests,
            seed=args.seed,
        )
        result = asyncio.run(run_bench(opts))
    except (ValueError, TestbedError) as exc:
        print(f"bench.tokens: {exc}", file=sys.stderr)
        return 1
    print("\n".join(format_result(result)))
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
