"""A simulated vLLM-like model server: OpenAI completions, fixed slots, a FIFO queue.

Each server has ``slots`` concurrent sequences (vLLM's ``max_num_seqs``). A request
takes a slot when one is free, otherwise it waits in a FIFO queue behind the busy
slots. Holding a slot costs ``prefill_ms + ms_per_token * max_tokens`` of (simulated)
time. With ``max_queue`` set, a request that finds the queue full gets 503 at once.

``/metrics`` exposes the gauges a vLLM server exposes (``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:gpu_cache_usage_perc``), so anything that reads
a real server's saturation reads this one too. The KV-cache usage is modelled as the
share of busy slots: each running sequence holds its share of the cache.

Everything runs on the event loop (no threads), and each server has its own
Prometheus registry, so many simulated pods can share one process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import time
import uuid
from collections import Counter as CountMap
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh.model import PRIORITY_HEADER

log = logging.getLogger(__name__)

#: The response header that names the pod which served a request.
SERVED_BY_HEADER = "x-served-by"
#: The response header with the time a request waited for a slot, in milliseconds.
QUEUED_MS_HEADER = "x-sim-queued-ms"
#: Largest ``max_tokens`` a request may ask for (a context-length stand-in).
MAX_TOKENS_LIMIT = 8192
#: How long ``stop()`` lets in-flight requests finish before cancelling them, in seconds.
SHUTDOWN_GRACE_S = 1.0

_WORDS = ("the", "model", "says", "hello", "to", "a", "fast", "lane", "for", "tokens")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class SimConfig:
    """One simulated model-server pod.

    The defaults describe a small GPU pod; :meth:`gpu_pod` and :meth:`cpu_pod` give the
    two profiles the demo uses.
    """

    #: Pod name, returned in ``x-served-by``.
    name: str = "sim-0"
    #: Any loopback address works on Linux (all of 127.0.0.0/8), e.g. ``127.0.0.11``.
    host: str = "127.0.0.1"
    #: 0 binds any free port; :attr:`RunningSim.port` tells which.
    port: int = 0
    #: Sequences served at once (vLLM's ``max_num_seqs``).
    slots: int = 8
    #: Fixed cost of a request once it holds a slot, in milliseconds.
    prefill_ms: float = 20.0
    #: Decode cost per generated token, in milliseconds (2 ms is a mid-size model on a GPU).
    ms_per_token: float = 2.0
    #: Requests allowed to wait for a slot; beyond it, 503. None means unbounded (vLLM).
    max_queue: int | None = None
    #: The served model name; requests naming another model get 404, as from vLLM.
    model: str = "llama"

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"slots must be at least 1, got {self.slots}")
        if self.prefill_ms < 0 or self.ms_per_token < 0:
            raise ValueError("prefill_ms and ms_per_token must not be negative")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"max_queue must not be negative, got {self.max_queue}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")

    @classmethod
    def gpu_pod(cls, name: str, host: str = "127.0.0.1", port: int = 0) -> SimConfig:
        """A GPU pod: 8 slots, 20 ms prefill, 2 ms per token (52 ms for 16 tokens)."""
        return cls(name=name, host=host, port=port, slots=8, prefill_ms=20.0, ms_per_token=2.0)

    @classmethod
    def cpu_pod(cls, name: str, host: str = "127.0.0.1", port: int = 0) -> SimConfig:
        """A CPU fallback pod: 2 slots, 100 ms prefill, 25 ms per token (500 ms for 16)."""
        return cls(name=name, host=host, port=port, slots=2, prefill_ms=100.0, ms_per_token=25.0)

    def service_time_s(self, max_tokens: int) -> float:
        """Seconds one request holds a slot."""
        return (self.prefill_ms + self.ms_per_token * max_tokens) / 1000.0

    def capacity_rps(self, max_tokens: int = 16) -> float:
        """Requests per second this pod completes when every slot is always busy."""
        service = self.service_time_s(max_tokens)
        return float("inf") if service == 0 else self.slots / service


@dataclass(frozen=True)
class SimStats:
    """A snapshot of one simulated pod's counters and current load."""

    name: str
    served: int
    rejected: int
    bad_requests: int
    running: int
    waiting: int
    peak_running: int
    peak_waiting: int
    #: Requests received per ``x-inference-priority`` value (lower-cased; "" when absent).
    by_priority: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


class QueueFull(Exception):
    """The wait queue is at ``max_queue``: the request is refused."""


class SlotPool:
    """A fixed number of slots, handed out in arrival order, with a bounded wait queue.

    ``asyncio.Semaphore`` does not promise FIFO hand-off in every Python version, and it
    has no queue bound; this small pool does both. A released slot goes straight to the
    oldest waiter, so a newcomer can never overtake the queue.
    """

    def __init__(self, slots: int, max_queue: int | None = None) -> None:
        self._slots = slots
        self._free = slots
        self._max_queue = max_queue
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.peak_running = 0
        self.peak_waiting = 0

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def running(self) -> int:
        return self._slots - self._free

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self) -> None:
        """Take a slot, waiting in line if none is free. Raises QueueFull past max_queue."""
        if self._free > 0 and not self._waiters:
            self._take()
            return
        if self._max_queue is not None and self.waiting >= self._max_queue:
            raise QueueFull
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.peak_waiting = max(self.peak_waiting, self.waiting)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived as we were cancelled: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back: to the oldest live waiter if there is one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands; running is unchanged
                return
        self._free += 1

    def _take(self) -> None:
        self._free -= 1
        self.peak_running = max(self.peak_running, self.running)


@dataclass(frozen=True)
class CompletionRequest:
    """The parts of an OpenAI completions body that the simulator uses."""

    model: str
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class BadRequest:
    """Why a completions body was refused, with the HTTP status to answer."""

    message: str
    status: int = 400


def parse_completion_request(body: object, served_model: str) -> CompletionRequest | BadRequest:
    """Check a decoded JSON body; never raises. Prompt tokens are counted as words."""
    if not isinstance(body, dict):
        return BadRequest("the request body must be a JSON object")
    model = body.get("model", served_model)
    if not isinstance(model, str):
        return BadRequest("'model' must be a string")
    if model != served_model:
        return BadRequest(f"The model `{model}` does not exist.", status=404)
    prompt_tokens = _count_prompt_tokens(body.get("prompt"))
    if prompt_tokens is None:
        return BadRequest("'prompt' must be a string, a list of strings or a list of token ids")
    max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = 16
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        return BadRequest("'max_tokens' must be an integer")
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        return BadRequest(f"'max_tokens' must be between 1 and {MAX_TOKENS_LIMIT}")
    return CompletionRequest(model=model, prompt_tokens=prompt_tokens, max_tokens=max_tokens)


def _count_prompt_tokens(prompt: object) -> int | None:
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return sum(len(p.split()) for p in prompt)
    if isinstance(prompt, list) and all(
        isinstance(p, int) and not isinstance(p, bool) for p in prompt
    ):
        return len(prompt)
    return None


class _GaugeCollector(Collector):
    """Reads the pool's live state at scrape time, so the gauges are never stale."""

    def __init__(self, pool: SlotPool, model: str) -> None:
        self._pool = pool
        self._model = model

    def collect(self) -> Iterable[Metric]:
        pool = self._pool
        yield self._gauge("vllm:num_requests_running", "Requests holding a slot.", pool.running)
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting for a slot.", pool.waiting)
        yield self._gauge(
            "vllm:gpu_cache_usage_perc",
            "KV-cache usage, 0 to 1 (modelled as busy slots over slots).",
            pool.running / pool.slots,
        )

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([self._model], value)
        return family


class _Sim:
    """The request handlers and counters of one simulated pod."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.pool = SlotPool(cfg.slots, cfg.max_queue)
        self.healthy = True
        self.registry = CollectorRegistry()
        self.registry.register(_GaugeCollector(self.pool, cfg.model))
        self._requests = Counter(
            "sim_requests",
            "Completion requests answered, by HTTP status code.",
            ["model_name", "code"],
            registry=self.registry,
        )
        self._success = Counter(
            "vllm:request_success",
            "Requests that finished generating.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            ["model_name"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time spent waiting for a slot.",
            ["model_name"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._by_priority: CountMap[str] = CountMap()
        self._served = 0
        self._rejected = 0
        self._bad = 0

    def stats(self) -> SimStats:
        return SimStats(
            name=self.cfg.name,
            served=self._served,
            rejected=self._rejected,
            bad_requests=self._bad,
            running=self.pool.running,
            waiting=self.pool.waiting,
            peak_running=self.pool.peak_running,
            peak_waiting=self.pool.peak_waiting,
            by_priority=MappingProxyType(dict(self._by_priority)),
        )

    async def completions(self, request: web.Request) -> web.Response:
        self._by_priority[request.headers.get(PRIORITY_HEADER, "").lower()] += 1
        try:
            body: object = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        parsed = parse_completion_request(body, self.cfg.model)
        if isinstance(parsed, BadRequest):
            self._bad += 1
            return self._error(parsed.status, parsed.message, "BadRequestError")

        loop = asyncio.get_running_loop()
        arrived = loop.time()
        try:
            await self.pool.acquire()
        except QueueFull:
            self._rejected += 1
            return self._error(503, "The server is at capacity; try again later.", "Overloaded")
        queued = loop.time() - arrived
        try:
            await asyncio.sleep(self.cfg.service_time_s(parsed.max_tokens))
        finally:
            self.pool.release()

        self._served += 1
        self._success.labels(self.cfg.model, "length").inc()
        self._e2e.labels(self.cfg.model).observe(loop.time() - arrived)
        self._queue_time.labels(self.cfg.model).observe(queued)
        self._requests.labels(self.cfg.model, "200").inc()
        return web.json_response(
            _completion_body(parsed),
            headers={SERVED_BY_HEADER: self.cfg.name, QUEUED_MS_HEADER: f"{queued * 1000:.1f}"},
        )

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def health(self, _request: web.Request) -> web.Response:
        if self.healthy:
            return web.Response(text="ok")
        return web.Response(text="unhealthy", status=503)

    def _error(self, status: int, message: str, kind: str) -> web.Response:
        self._requests.labels(self.cfg.model, str(status)).inc()
        body = {"object": "error", "message": message, "type": kind, "code": status}
        return web.json_response(body, status=status, headers={SERVED_BY_HEADER: self.cfg.name})


def _completion_body(req: CompletionRequest) -> dict[str, object]:
    text = " " + " ".join(_WORDS[i % len(_WORDS)] for i in range(req.max_tokens))
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
        "usage": {
            "prompt_tokens": req.prompt_tokens,
            "completion_tokens": req.max_tokens,
            "total_tokens": req.prompt_tokens + req.max_tokens,
        },
    }


class RunningSim:
    """A started simulator. Stop it with :meth:`stop` (or use it as an async context)."""

    def __init__(self, sim: _Sim, runner: web.AppRunner, port: int) -> None:
        self._sim = sim
        self._runner = runner
        self.port = port

    @property
    def config(self) -> SimConfig:
        return self._sim.cfg

    @property
    def name(self) -> str:
        return self._sim.cfg.name

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.11:8000``."""
        return f"http://{self._sim.cfg.host}:{self.port}"

    def stats(self) -> SimStats:
        return self._sim.stats()

    def set_healthy(self, healthy: bool) -> None:
        """Make ``/health`` answer 200 or 503 (to drive health-check failover)."""
        self._sim.healthy = healthy

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> RunningSim:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()


def build_app(cfg: SimConfig) -> tuple[web.Application, _Sim]:
    sim = _Sim(cfg)
    app = web.Application()
    app.router.add_post("/v1/completions", sim.completions)
    app.router.add_get("/metrics", sim.metrics)
    app.router.add_get("/health", sim.health)
    return app, sim


async def start_sim(cfg: SimConfig) -> RunningSim:
    """Start one simulated pod on ``cfg.host:cfg.port`` and return once it accepts."""
    app, sim = build_app(cfg)
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port)
        await site.start()
        port = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    log.info("simulated pod %s serving %s on %s:%d", cfg.name, cfg.model, cfg.host, port)
    return RunningSim(sim, runner, port)


async def start_sims(cfgs: Sequence[SimConfig]) -> list[RunningSim]:
    """Start several pods; if one fails, the ones already started are stopped."""
    started: list[RunningSim] = []
    try:
        for cfg in cfgs:
            started.append(await start_sim(cfg))
    except BaseException:
        for sim in started:
            await sim.stop()
        raise
    return started


def _parse_args(argv: Sequence[str] | None) -> SimConfig:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_sim", description="A simulated vLLM-like model server."
    )
    parser.add_argument("--profile", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--name", default="sim-0")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--slots", type=int)
    parser.add_argument("--prefill-ms", type=float)
    parser.add_argument("--ms-per-token", type=float)
    parser.add_argument("--max-queue", type=int)
    parser.add_argument("--model", default="llama")
    args = parser.parse_args(argv)
    profile = SimConfig.gpu_pod if args.profile == "gpu" else SimConfig.cpu_pod
    overrides = {
        key: value
        for key, value in (
            ("slots", args.slots),
            ("prefill_ms", args.prefill_ms),
            ("ms_per_token", args.ms_per_token),
            ("max_queue", args.max_queue),
        )
        if value is not None
    }
    try:
        base = profile(args.name, args.host, args.port)
        return dataclasses.replace(base, model=args.model, **overrides)
    except ValueError as exc:
        parser.error(str(exc))


async def _serve(cfg: SimConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sim = await start_sim(cfg)
    try:
        # One line on stdout that a parent process can wait for (the port may be 0).
        print(json.dumps({"name": cfg.name, "url": sim.url, "port": sim.port}), flush=True)
        await stop.wait()
    finally:
        await sim.stop()


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = _parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(cfg))


if __name__ == "__main__":
    main()
