"""A simulated vLLM model server: continuous batching, a KV cache, streaming, its metrics.

What it models, after vLLM's V1 engine (``vllm/v1/core/sched/scheduler.py``):

- **Continuous batching in engine steps.** Each step runs every sequence in the batch:
  one token for a decoding sequence, a chunk of its prompt for a prefilling one, at most
  ``max_num_batched_tokens`` tokens in all. Running sequences are scheduled first; waiting
  ones join only while fewer than ``max_num_seqs`` run and only in a step that preempted
  nothing. A step's time follows :class:`StepCost`: a full batch decodes more slowly than
  a half-empty one, and a long prompt slows the step it is prefilled in.
- **A KV cache of ``kv_cache_tokens``** in blocks of ``block_size`` tokens, allocated as
  a sequence grows. A waiting request that does not fit stays queued. When a running
  sequence cannot grow, one is preempted and recomputed later (vLLM's default): the last
  admitted under ``fcfs``, the lowest priority (largest ``priority``, then latest arrival)
  under ``priority``.
- **Scheduling policy.** ``fcfs`` (vLLM's default) queues by arrival, and a request whose
  body carries a non-zero ``priority`` is refused with 400, as vLLM does. ``priority``
  (vLLM's ``--scheduling-policy priority``) queues by ``(priority, arrival)``, lower first.
- **The OpenAI API**: ``/v1/completions`` and ``/v1/chat/completions``, with ``stream:
  true`` as server-sent events, one chunk per token, ``data: [DONE]`` at the end, and
  ``usage`` in the JSON body, or in a last chunk when ``stream_options.include_usage``.
  Exactly ``max_tokens`` tokens are generated (as with ``ignore_eos``), unless the body
  sets ``sim_output_tokens``: the simulated answer then ends on its own after that many
  (``finish_reason: stop``), as a real one ends at its end-of-sequence token. A client that
  disconnects aborts its request, as in vLLM.
- **What vLLM exports**: ``/metrics`` (``vllm:num_requests_running``,
  ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``, TTFT, inter-token, queue
  and end-to-end histograms, token and preemption counters) and ORCA load reports: a
  request carrying ``endpoint-load-metrics-format: JSON`` (or ``TEXT``) gets
  ``endpoint-load-metrics`` with ``kv_cache_usage_perc`` and ``num_requests_waiting``.
  Like vLLM, only non-streamed responses carry it, unless ``orca_on_streams`` is set.

What it adds for benchmarks: ``/sim/stats`` (JSON: counters, each class's peak occupancy
read from ``x-inference-priority``, generated tokens over time) and ``POST /sim/reset``.

The calibration (:data:`LLAMA_8B_A100`) and its sources are in ``docs/performance.md``.
The scheduler (:class:`Scheduler`) does no I/O and keeps no clock of its own: the server
runs it in real time on the event loop (:class:`Engine`), and :func:`saturated_throughput`
runs it in virtual time to compute a pod's capacity in an instant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import heapq
import itertools
import json
import logging
import math
import signal
import time
import uuid
from collections import Counter as CountMap
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

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
SERVED_BY_HEADER: Final = "x-served-by"
#: ORCA: the request header asking for a load report, and the response header carrying it.
ORCA_FORMAT_HEADER: Final = "endpoint-load-metrics-format"
ORCA_HEADER: Final = "endpoint-load-metrics"
#: How ``stop()`` lets in-flight requests finish before cancelling them, in seconds.
SHUTDOWN_GRACE_S: Final = 1.0
#: A step that starts up to this late (a timer's usual overshoot) is made up by the next.
CATCH_UP_S: Final = 0.005
#: Width of one bucket of the generated-tokens timeline in ``/sim/stats``, in seconds.
TIMELINE_BUCKET_S: Final = 0.1
#: Buckets kept after a reset: ten minutes (later tokens are counted, not timed).
TIMELINE_BUCKETS: Final = 6000
#: The class a request without (or with an empty) ``x-inference-priority`` is counted as.
NO_CLASS: Final = "none"
#: Distinct class names counted per pod; more (a hostile client) are counted as "other".
MAX_CLASSES: Final = 16

_WORDS: Final = ("the", "model", "says", "hello", "to", "a", "fast", "lane", "for", "tokens")
_TOKEN_TEXT: Final = tuple(" " + w for w in _WORDS)
_LATENCY_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_ITL_BUCKETS: Final = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


# --- the model of the GPU ----------------------------------------------------------


@dataclass(frozen=True)
class StepCost:
    """What one engine step costs, in milliseconds: a roofline with an attention term.

    ``max(base_ms + per_seq_ms x sequences, per_token_ms x tokens) + per_kv_token_ms x
    context``. Decoding is bound by memory bandwidth: each step streams the weights once
    (``base_ms``) plus a per-sequence cost. Prefill is bound by compute: ``per_token_ms``
    per token of the step. Attention reads every scheduled sequence's whole context.
    """

    base_ms: float
    per_seq_ms: float
    per_token_ms: float
    per_kv_token_ms: float

    def __post_init__(self) -> None:
        values = (self.base_ms, self.per_seq_ms, self.per_token_ms, self.per_kv_token_ms)
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"step costs must be finite and not negative: {self}")

    @classmethod
    def flat(cls, ms: float) -> StepCost:
        """Every step costs ``ms``, whatever the batch: the fixed-cost model, for tests."""
        return cls(base_ms=ms, per_seq_ms=0.0, per_token_ms=0.0, per_kv_token_ms=0.0)

    def step_ms(self, sequences: int, tokens: int, context_tokens: int) -> float:
        weights = self.base_ms + self.per_seq_ms * sequences
        return max(weights, self.per_token_ms * tokens) + self.per_kv_token_ms * context_tokens


#: Llama-3.1-8B-Instruct (BF16) on one A100-40GB, calibrated on published vLLM runs (see
#: docs/performance.md): decode 13.3 ms a step alone and 16.2 ms with 8 sequences at about
#: 1,100 tokens of context; a 1,369-token prefill in about 117 ms; attention reads 128 KiB
#: of KV per token of context at the A100-40GB's 1.555 TB/s.
LLAMA_8B_A100: Final = StepCost(
    base_ms=12.9, per_seq_ms=0.32, per_token_ms=0.085, per_kv_token_ms=0.0000843
)
#: KV-cache tokens of Llama-3.1-8B on an A100-40GB at vLLM's default 90 % memory use
#: (about 17 GB left for the cache after 16 GB of weights, 128 KiB a token).
LLAMA_8B_A100_KV_TOKENS: Final = 131_072
#: A CPU fallback (llama.cpp, a 4-bit 8B model, a few cores): not calibrated, only far
#: slower than any GPU, with a handful of parallel slots.
CPU_FALLBACK: Final = StepCost(base_ms=90.0, per_seq_ms=10.0, per_token_ms=12.0, per_kv_token_ms=0)


class Policy(enum.StrEnum):
    """vLLM's ``--scheduling-policy``."""

    FCFS = "fcfs"
    PRIORITY = "priority"


@dataclass(frozen=True)
class SimConfig:
    """One simulated model-server pod. :meth:`gpu_pod` and :meth:`cpu_pod` are the two
    profiles the benchmarks use."""

    #: Pod name, returned in ``x-served-by``.
    name: str = "sim-0"
    #: Any loopback address works on Linux (all of 127.0.0.0/8), e.g. ``127.0.0.11``.
    host: str = "127.0.0.1"
    #: 0 binds any free port; :attr:`RunningSim.port` tells which.
    port: int = 0
    #: The served model name; requests naming another model get 404, as from vLLM.
    model: str = "llama"
    #: Sequences in the running batch at most (vLLM's ``--max-num-seqs``).
    max_num_seqs: int = 64
    #: Tokens one step computes at most (``--max-num-batched-tokens``): chunked prefill.
    max_num_batched_tokens: int = 2048
    #: KV-cache capacity, in tokens.
    kv_cache_tokens: int = LLAMA_8B_A100_KV_TOKENS
    block_size: int = 16
    #: Prompt plus output tokens one request may have (``--max-model-len``).
    max_model_len: int = 8192
    scheduling_policy: Policy = Policy.FCFS
    cost: StepCost = LLAMA_8B_A100
    #: Every step takes this many times longer than ``cost`` says: a slower GPU, or the
    #: whole model run slower so that a shared machine keeps up with the token stream.
    slowdown: float = 1.0
    #: ``max_tokens`` when a request gives none (vLLM's completions default).
    default_max_tokens: int = 16
    #: Send the ORCA header on streamed responses too (vLLM sends it on JSON ones only).
    orca_on_streams: bool = False

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        if self.block_size < 1 or self.kv_cache_tokens < max(self.block_size, self.max_model_len):
            raise ValueError("kv_cache_tokens must hold max_model_len (vLLM refuses to start)")
        if self.max_model_len < 2 or not 1 <= self.default_max_tokens < self.max_model_len:
            raise ValueError("max_model_len must exceed default_max_tokens, itself >= 1")
        if not math.isfinite(self.slowdown) or self.slowdown <= 0:
            raise ValueError(f"slowdown must be positive, got {self.slowdown}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        object.__setattr__(self, "scheduling_policy", Policy(self.scheduling_policy))

    @classmethod
    def gpu_pod(cls, name: str, host: str = "127.0.0.1", port: int = 0, **kw: Any) -> SimConfig:
        """Llama-3.1-8B on an A100-40GB (:data:`LLAMA_8B_A100`)."""
        return cls(name=name, host=host, port=port, **kw)

    @classmethod
    def cpu_pod(cls, name: str, host: str = "127.0.0.1", port: int = 0, **kw: Any) -> SimConfig:
        """A CPU fallback (:data:`CPU_FALLBACK`): four slots, 0.1 s a step, slow prompts."""
        kw.setdefault("max_num_seqs", 4)
        kw.setdefault("max_num_batched_tokens", 512)
        kw.setdefault("kv_cache_tokens", 16_384)
        return cls(name=name, host=host, port=port, cost=CPU_FALLBACK, **kw)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SimConfig:
        fields = dict(data)
        if isinstance(fields.get("cost"), Mapping):
            fields["cost"] = StepCost(**fields["cost"])
        return cls(**fields)


# --- the scheduler: no I/O, no clock -------------------------------------------------


class Phase(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(eq=False)
class Seq:
    """One request inside the engine. Times are whatever clock the caller passes in."""

    prompt_tokens: int
    max_tokens: int
    arrival: float
    priority: int = 0
    cls: str = NO_CLASS
    id: int = field(default_factory=itertools.count().__next__)
    #: Tokens whose KV is computed (reset to 0 by a preemption: recomputed on resume).
    computed: int = 0
    generated: int = 0
    blocks: int = 0
    preemptions: int = 0
    phase: Phase = Phase.WAITING
    first_scheduled: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    #: When the token before the last one came (for the inter-token histogram).
    prev_token_at: float | None = None
    finished_at: float | None = None

    @property
    def tokens(self) -> int:
        """Prompt plus generated tokens: what the KV cache must hold to go on."""
        return self.prompt_tokens + self.generated

    @property
    def done(self) -> bool:
        return self.phase in (Phase.FINISHED, Phase.ABORTED)


@dataclass(frozen=True)
class Step:
    """One planned engine step: who computes how many tokens, and how long it takes."""

    tokens: Mapping[Seq, int]
    duration_s: float
    preempted: tuple[Seq, ...] = ()


class _Waiting:
    """The waiting queue: by arrival (fcfs, preempted requests back at the front) or by
    (priority, arrival). Aborted requests are skipped lazily, so an abort costs O(1)."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._fifo: deque[Seq] = deque()
        self._heap: list[tuple[int, float, int, Seq]] = []
        self.live = 0

    def push(self, seq: Seq, front: bool = False) -> None:
        self.live += 1
        if self._policy is Policy.PRIORITY:
            heapq.heappush(self._heap, (seq.priority, seq.arrival, seq.id, seq))
        elif front:
            self._fifo.appendleft(seq)
        else:
            self._fifo.append(seq)

    def peek(self) -> Seq | None:
        if self._policy is Policy.PRIORITY:
            while self._heap and self._heap[0][3].phase is not Phase.WAITING:
                heapq.heappop(self._heap)
            return self._heap[0][3] if self._heap else None
        while self._fifo and self._fifo[0].phase is not Phase.WAITING:
            self._fifo.popleft()
        return self._fifo[0] if self._fifo else None

    def pop(self) -> Seq:
        seq = self.peek()
        assert seq is not None
        if self._policy is Policy.PRIORITY:
            heapq.heappop(self._heap)
        else:
            self._fifo.popleft()
        self.live -= 1
        return seq


class Scheduler:
    """vLLM's V1 scheduling loop, one step at a time. :meth:`schedule` plans a step (and
    does its preemptions and admissions), :meth:`complete` applies it once its time is up.
    """

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.total_blocks = cfg.kv_cache_tokens // cfg.block_size
        self.free_blocks = self.total_blocks
        self.running: list[Seq] = []
        self.waiting = _Waiting(cfg.scheduling_policy)
        self.preemptions = 0
        self.generated_tokens = 0

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.free_blocks / self.total_blocks

    @property
    def idle(self) -> bool:
        return not self.running and self.waiting.live == 0

    def add(self, seq: Seq) -> None:
        seq.phase = Phase.WAITING
        self.waiting.push(seq)

    def abort(self, seq: Seq, now: float) -> None:
        """Drop a request wherever it is (its client went away). Safe to call twice."""
        if seq.done:
            return
        if seq.phase is Phase.WAITING:
            self.waiting.live -= 1
        else:
            self.running.remove(seq)
        self._free(seq)
        seq.phase = Phase.ABORTED
        seq.finished_at = now

    def schedule(self, now: float) -> Step | None:
        """Plan the next step; None when there is nothing to run."""
        budget = self.cfg.max_num_batched_tokens
        planned: dict[Seq, int] = {}
        preempted: list[Seq] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            want = min(seq.tokens - seq.computed, budget)
            while not self._grow(seq, seq.computed + want):
                victim = self._victim()
                index = self.running.index(victim)
                self._preempt(victim)
                preempted.append(victim)
                if victim in planned:
                    budget += planned.pop(victim)
                if index < i:
                    i -= 1
                if victim is seq:
                    break
            if seq.phase is not Phase.RUNNING:
                break
            planned[seq] = want
            budget -= want
            i += 1
        if not preempted:
            while budget > 0 and len(self.running) < self.cfg.max_num_seqs:
                head = self.waiting.peek()
                if head is None:
                    break
                want = min(head.tokens - head.computed, budget)
                if not self._grow(head, head.computed + want):
                    break
                self.waiting.pop()
                head.phase = Phase.RUNNING
                if head.first_scheduled is None:
                    head.first_scheduled = now
                self.running.append(head)
                planned[head] = want
                budget -= want
        if not planned:
            return None
        tokens = sum(planned.values())
        context = sum(seq.computed + n for seq, n in planned.items())
        ms = self.cfg.cost.step_ms(len(planned), tokens, context) * self.cfg.slowdown
        return Step(tokens=planned, duration_s=ms / 1000.0, preempted=tuple(preempted))

    def complete(self, step: Step, now: float) -> list[Seq]:
        """Apply a step: each sequence that caught up with its tokens samples one. Returns
        the sequences that got a token (the finished ones among them)."""
        out: list[Seq] = []
        for seq, n in step.tokens.items():
            if seq.phase is not Phase.RUNNING:
                continue  # aborted while the step ran
            seq.computed += n
            if seq.computed < seq.tokens:
                continue  # a prompt chunk: no token yet
            seq.generated += 1
            self.generated_tokens += 1
            if seq.first_token_at is None:
                seq.first_token_at = now
            seq.prev_token_at, seq.last_token_at = seq.last_token_at, now
            out.append(seq)
            if seq.generated >= seq.max_tokens:
                self.running.remove(seq)
                self._free(seq)
                seq.phase = Phase.FINISHED
                seq.finished_at = now
        return out

    def _grow(self, seq: Seq, tokens: int) -> bool:
        need = -(-tokens // self.cfg.block_size) - seq.blocks
        if need > self.free_blocks:
            return False
        if need > 0:
            self.free_blocks -= need
            seq.blocks += need
        return True

    def _free(self, seq: Seq) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0

    def _victim(self) -> Seq:
        if self.cfg.scheduling_policy is Policy.PRIORITY:
            return max(self.running, key=lambda s: (s.priority, s.arrival))
        return self.running[-1]

    def _preempt(self, seq: Seq) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        seq.phase = Phase.WAITING
        self.waiting.push(seq, front=True)


@dataclass(frozen=True)
class Throughput:
    """What a pod sustains with a queue that never empties."""

    tokens_per_s: float
    requests_per_s: float
    #: Mean running batch over the measured time.
    mean_batch: float


def saturated_throughput(
    cfg: SimConfig,
    lengths: Iterable[tuple[int, int]],
    *,
    seconds: float = 300.0,
    warmup_s: float = 30.0,
) -> Throughput:
    """Run the scheduler in virtual time with a queue that is never empty, requests drawn
    from ``lengths`` (prompt tokens, output tokens), and count what completes after
    ``warmup_s``. Deterministic for deterministic ``lengths``; takes well under a second."""
    sched = Scheduler(cfg)
    source: Iterator[tuple[int, int]] = iter(lengths)
    now = 0.0
    tokens = requests = 0
    batch_time = 0.0
    while now < warmup_s + seconds:
        while sched.waiting.live < cfg.max_num_seqs:
            prompt, output = next(source)
            sched.add(Seq(prompt_tokens=prompt, max_tokens=output, arrival=now))
        step = sched.schedule(now)
        if step is None:
            raise ValueError(f"{cfg.name}: a request from `lengths` never fits in the KV cache")
        now += step.duration_s
        emitted = sched.complete(step, now)
        if now > warmup_s:
            tokens += len(emitted)
            requests += sum(1 for s in emitted if s.phase is Phase.FINISHED)
            batch_time += len(sched.running) * step.duration_s
    measured = now - warmup_s
    return Throughput(tokens / measured, requests / measured, batch_time / measured)


# --- the request side: parsing, never raising ---------------------------------------


class Api(enum.Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"


@dataclass(frozen=True)
class CompletionRequest:
    """The parts of an OpenAI request body that the simulator uses."""

    api: Api
    model: str
    prompt_tokens: int
    max_tokens: int
    stream: bool = False
    include_usage: bool = False
    priority: int = 0
    #: Tokens the answer ends after on its own (``sim_output_tokens``), if fewer than
    #: ``max_tokens``; None: it runs to ``max_tokens``.
    output_tokens: int | None = None

    @property
    def generates(self) -> int:
        """Tokens this request generates."""
        return min(self.max_tokens, self.output_tokens or self.max_tokens)

    @property
    def finish_reason(self) -> str:
        return "stop" if self.generates < self.max_tokens else "length"


@dataclass(frozen=True)
class BadRequest:
    """Why a body was refused, with the HTTP status to answer."""

    message: str
    status: int = 400


def parse_request(body: object, api: Api, cfg: SimConfig) -> CompletionRequest | BadRequest:
    """Check a decoded JSON body; never raises. Prompt tokens are counted as words (or as
    token ids, for a completions prompt given as a list of integers)."""
    if not isinstance(body, dict):
        return BadRequest("the request body must be a JSON object")
    model = body.get("model", cfg.model)
    if not isinstance(model, str):
        return BadRequest("'model' must be a string")
    if model != cfg.model:
        return BadRequest(f"The model `{model}` does not exist.", status=404)
    if api is Api.CHAT:
        prompt = _count_chat_tokens(body.get("messages"))
        if prompt is None:
            return BadRequest("'messages' must be a non-empty list of {role, content} objects")
    else:
        prompt = _count_prompt_tokens(body.get("prompt"))
        if prompt is None:
            return BadRequest("'prompt' must be a string, a list of strings or of token ids")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = cfg.default_max_tokens
    if not _is_int(max_tokens) or max_tokens < 1:
        return BadRequest("'max_tokens' must be a positive integer")
    if prompt + max_tokens > cfg.max_model_len:
        return BadRequest(
            f"This model's maximum context length is {cfg.max_model_len} tokens. However, you"
            f" requested {prompt + max_tokens} tokens ({prompt} in the messages,"
            f" {max_tokens} in the completion)."
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        return BadRequest("'stream' must be a boolean")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return BadRequest("'stream_options' must be an object")
    include_usage = bool((options or {}).get("include_usage", False))
    if include_usage and not stream:
        return BadRequest("Stream options can only be defined when `stream=True`.")
    priority = body.get("priority", 0)
    if not _is_int(priority) or not -(2**31) <= priority < 2**31:
        return BadRequest("'priority' must be a 32-bit integer")
    if priority != 0 and cfg.scheduling_policy is not Policy.PRIORITY:
        return BadRequest(f"Got priority {priority} but Priority scheduling is not enabled.")
    output = body.get("sim_output_tokens")
    if output is not None and (not _is_int(output) or output < 1):
        return BadRequest("'sim_output_tokens' must be a positive integer")
    return CompletionRequest(
        api, model, prompt, max_tokens, stream, include_usage, priority, output
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count_prompt_tokens(prompt: object) -> int | None:
    if isinstance(prompt, str):
        return max(1, len(prompt.split()))
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return max(1, sum(len(p.split()) for p in prompt))
    if isinstance(prompt, list) and prompt and all(_is_int(p) for p in prompt):
        return len(prompt)
    return None


def _count_chat_tokens(messages: object) -> int | None:
    if not isinstance(messages, list) or not messages:
        return None
    total = 0
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None
        content = message.get("content", "")
        if isinstance(content, list):  # content parts: count the text ones
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            return None
        total += len(content.split()) + 4  # a chat template adds a few tokens a message
    return total


# --- the server ----------------------------------------------------------------------


@dataclass
class _Occupancy:
    """Requests per class that the pod holds (queued or running), now and at most."""

    now: CountMap[str] = field(default_factory=CountMap)
    peak: CountMap[str] = field(default_factory=CountMap)
    peak_running: CountMap[str] = field(default_factory=CountMap)

    def enter(self, cls: str) -> None:
        self.now[cls] += 1
        self.peak[cls] = max(self.peak[cls], self.now[cls])

    def leave(self, cls: str) -> None:
        self.now[cls] -= 1

    def reset(self) -> None:
        self.now = CountMap({c: n for c, n in self.now.items() if n})
        self.peak = CountMap(self.now)
        self.peak_running = CountMap()


class _Gauges(Collector):
    """Reads the engine's live state at scrape time, so the gauges are never stale."""

    def __init__(self, sim: _Sim) -> None:
        self._sim = sim

    def collect(self) -> Iterable[Metric]:
        sched = self._sim.sched
        model = self._sim.cfg.model
        for name, doc, value in (
            ("vllm:num_requests_running", "Requests in the running batch.", len(sched.running)),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", sched.waiting.live),
            ("vllm:kv_cache_usage_perc", "KV-cache usage, 0 to 1.", sched.kv_cache_usage),
        ):
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([model], float(value))
            yield family


class _Sim:
    """One pod: the engine loop, the handlers, the counters."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.sched = Scheduler(cfg)
        self.healthy = True
        self.occupancy = _Occupancy()
        self._wake = asyncio.Event()
        self._updates: dict[Seq, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self._reset_at = time.time()
        self._timeline: list[int] = []
        self._counts: CountMap[str] = CountMap()
        self._by_priority: CountMap[str] = CountMap()
        self._peak_running = 0
        self._peak_waiting = 0
        self._late_s = 0.0
        self._busy_s = 0.0
        self.registry = CollectorRegistry()
        self.registry.register(_Gauges(self))
        labels = ["model_name"]
        reg = self.registry
        self._requests = Counter(
            "sim_requests",
            "Requests answered, by HTTP status.",
            ["model_name", "code"],
            registry=reg,
        )
        self._success = Counter(
            "vllm:request_success",
            "Requests that finished.",
            ["model_name", "finished_reason"],
            registry=reg,
        )
        self._prompt_total = Counter("vllm:prompt_tokens", "Prefilled.", labels, registry=reg)
        self._gen_total = Counter("vllm:generation_tokens", "Generated.", labels, registry=reg)
        self._preempt_total = Counter("vllm:num_preemptions", "Preemptions.", labels, registry=reg)
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Arrival to first token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self._itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between two tokens of a request.",
            labels,
            buckets=_ITL_BUCKETS,
            registry=reg,
        )
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Arrival to last token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self._queue = Histogram(
            "vllm:request_queue_time_seconds",
            "Arrival to first scheduled.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )

    # -- the engine loop

    def start(self) -> None:
        self._task = asyncio.create_task(self._engine(), name=f"gpu-sim-{self.cfg.name}")
        self._task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "simulated pod %s: the engine stopped", self.cfg.name, exc_info=task.exception()
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _engine(self) -> None:
        """Steps back to back while there is work, each as long as the cost model says.

        Steps are laid end to end on the loop's clock, so the millisecond a timer wakes
        late is made up by the next step. A step that starts later than
        :data:`CATCH_UP_S` (the loop was busy elsewhere) starts when it can instead, and
        the lateness is counted (``late_s`` in ``/sim/stats``): a disturbed run shows up
        rather than hiding in the results.
        """
        loop = asyncio.get_running_loop()
        planned_end = loop.time()
        while True:
            self._wake.clear()
            now = loop.time()
            step = self.sched.schedule(now)
            if step is None:
                await self._wake.wait()
                planned_end = loop.time()
                continue
            self._note_step(step)
            if now - planned_end > CATCH_UP_S:
                self._late_s += now - planned_end
                planned_end = now
            planned_end += step.duration_s
            self._busy_s += step.duration_s
            await asyncio.sleep(max(0.0, planned_end - loop.time()))
            done = loop.time()
            for seq in self.sched.complete(step, done):
                self._on_token(seq, done)

    def _note_step(self, step: Step) -> None:
        sched = self.sched
        self._peak_running = max(self._peak_running, len(sched.running))
        self._peak_waiting = max(self._peak_waiting, sched.waiting.live)
        peaks = self.occupancy.peak_running
        for cls, n in CountMap(seq.cls for seq in sched.running).items():
            peaks[cls] = max(peaks[cls], n)
        if step.preempted:
            self._preempt_total.labels(self.cfg.model).inc(len(step.preempted))

    def _on_token(self, seq: Seq, now: float) -> None:
        model = self.cfg.model
        self._gen_total.labels(model).inc()
        bucket = int((time.time() - self._reset_at) / TIMELINE_BUCKET_S)
        if bucket < TIMELINE_BUCKETS:
            if bucket >= len(self._timeline):
                self._timeline.extend([0] * (bucket + 1 - len(self._timeline)))
            self._timeline[bucket] += 1
        if seq.prev_token_at is None:
            self._ttft.labels(model).observe(now - seq.arrival)
            if seq.first_scheduled is not None:
                self._queue.labels(model).observe(seq.first_scheduled - seq.arrival)
        else:
            self._itl.labels(model).observe(now - seq.prev_token_at)
        event = self._updates.get(seq)
        if event is not None:
            event.set()

    # -- handlers

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, Api.COMPLETIONS)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, Api.CHAT)

    async def _serve(self, request: web.Request, api: Api) -> web.StreamResponse:
        cls = self._class_of(request)
        self._by_priority[cls] += 1
        try:
            body: object = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        parsed = parse_request(body, api, self.cfg)
        if isinstance(parsed, BadRequest):
            self._counts["bad_requests"] += 1
            return self._error(parsed.status, parsed.message, "BadRequestError")
        loop = asyncio.get_running_loop()
        seq = Seq(
            prompt_tokens=parsed.prompt_tokens,
            max_tokens=parsed.generates,
            arrival=loop.time(),
            priority=parsed.priority,
            cls=cls,
        )
        updated = asyncio.Event()
        self._updates[seq] = updated
        self.occupancy.enter(cls)
        self._prompt_total.labels(self.cfg.model).inc(seq.prompt_tokens)
        self.sched.add(seq)
        self._wake.set()
        try:
            if parsed.stream:
                return await self._stream(request, parsed, seq, updated)
            return await self._whole(request, parsed, seq, updated)
        finally:
            self._updates.pop(seq, None)
            self.occupancy.leave(cls)
            if not seq.done:
                self.sched.abort(seq, loop.time())
                self._counts["aborted"] += 1

    def _class_of(self, request: web.Request) -> str:
        cls = request.headers.get(PRIORITY_HEADER, "").strip().lower()[:32] or NO_CLASS
        if cls not in self._by_priority and len(self._by_priority) >= MAX_CLASSES:
            return "other"
        return cls

    async def _whole(
        self, request: web.Request, req: CompletionRequest, seq: Seq, updated: asyncio.Event
    ) -> web.Response:
        while not seq.done:
            await updated.wait()
            updated.clear()
        self._finished(seq, req)
        headers = {SERVED_BY_HEADER: self.cfg.name, **self._orca(request)}
        return web.json_response(_response_body(req, seq.generated), headers=headers)

    async def _stream(
        self, request: web.Request, req: CompletionRequest, seq: Seq, updated: asyncio.Event
    ) -> web.StreamResponse:
        headers = {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            SERVED_BY_HEADER: self.cfg.name,
        }
        if self.cfg.orca_on_streams:
            headers.update(self._orca(request))
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        chunks = _Chunks(req)
        sent = 0
        try:
            while True:
                await updated.wait()
                updated.clear()
                if seq.generated > sent:
                    data = chunks.tokens(sent, seq.generated, final=seq.done)
                    await resp.write(chunks.role() + data if sent == 0 else data)
                    sent = seq.generated
                if seq.done:
                    break
            self._finished(seq, req)
            await resp.write(chunks.end(seq.generated))
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away mid-stream: the request is aborted below
        return resp

    def _finished(self, seq: Seq, req: CompletionRequest) -> None:
        model = self.cfg.model
        self._counts["served"] += 1
        self._requests.labels(model, "200").inc()
        self._success.labels(model, req.finish_reason).inc()
        if seq.finished_at is not None:
            self._e2e.labels(model).observe(seq.finished_at - seq.arrival)

    def _orca(self, request: web.Request) -> dict[str, str]:
        fmt = request.headers.get(ORCA_FORMAT_HEADER, "").strip().lower()
        metrics = {
            "kv_cache_usage_perc": float(self.sched.kv_cache_usage),
            "num_requests_waiting": float(self.sched.waiting.live),
        }
        if fmt == "json":
            return {ORCA_HEADER: "JSON " + json.dumps({"named_metrics": metrics})}
        if fmt == "text":
            text = ", ".join(f"named_metrics.{k}={v}" for k, v in metrics.items())
            return {ORCA_HEADER: "TEXT " + text}
        return {}

    def _error(self, status: int, message: str, kind: str) -> web.Response:
        self._requests.labels(self.cfg.model, str(status)).inc()
        body = {"object": "error", "message": message, "type": kind, "code": status}
        return web.json_response(body, status=status, headers={SERVED_BY_HEADER: self.cfg.name})

    # -- metrics, stats, health

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def health(self, _request: web.Request) -> web.Response:
        if self.healthy:
            return web.Response(text="ok")
        return web.Response(text="unhealthy", status=503)

    async def models(self, _request: web.Request) -> web.Response:
        card = {"id": self.cfg.model, "object": "model", "owned_by": "vllm"}
        return web.json_response({"object": "list", "data": [card]})

    async def stats_page(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats().to_json())

    async def reset_page(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response(self.stats().to_json())

    def reset(self) -> None:
        """Zero the counters and peaks (what is in flight stays, as the new peaks)."""
        self._reset_at = time.time()
        self._timeline = []
        self._counts.clear()
        self._by_priority.clear()
        self._peak_running = len(self.sched.running)
        self._peak_waiting = self.sched.waiting.live
        self._late_s = self._busy_s = 0.0
        self.sched.preemptions = 0
        self.sched.generated_tokens = 0
        self.occupancy.reset()

    def stats(self) -> SimStats:
        sched = self.sched
        return SimStats(
            name=self.cfg.name,
            since=self._reset_at,
            served=self._counts["served"],
            aborted=self._counts["aborted"],
            bad_requests=self._counts["bad_requests"],
            running=len(sched.running),
            waiting=sched.waiting.live,
            peak_running=self._peak_running,
            peak_waiting=self._peak_waiting,
            kv_cache_usage=sched.kv_cache_usage,
            generated_tokens=sched.generated_tokens,
            preemptions=sched.preemptions,
            busy_s=self._busy_s,
            late_s=self._late_s,
            by_priority=dict(self._by_priority),
            in_flight={c: n for c, n in self.occupancy.now.items() if n},
            peak_in_flight=dict(self.occupancy.peak),
            peak_running_by_class=dict(self.occupancy.peak_running),
            tokens_per_bucket=tuple(self._timeline),
        )


class _Chunks:
    """Server-sent events for one request, each a prebuilt prefix and suffix around the
    token's text, so a token costs one string join."""

    def __init__(self, req: CompletionRequest) -> None:
        self._req = req
        created = int(time.time())
        head = {"created": created, "model": req.model}
        if req.api is Api.CHAT:
            self._id = f"chatcmpl-{uuid.uuid4().hex}"
            base = json.dumps({"id": self._id, "object": "chat.completion.chunk", **head})
            self._prefix = base[:-1] + ', "choices": [{"index": 0, "delta": {"content": '
            self._suffix = '}, "logprobs": null, "finish_reason": %s}]}'
        else:
            self._id = f"cmpl-{uuid.uuid4().hex}"
            base = json.dumps({"id": self._id, "object": "text_completion", **head})
            self._prefix = base[:-1] + ', "choices": [{"index": 0, "text": '
            self._suffix = ', "logprobs": null, "finish_reason": %s, "stop_reason": null}]}'
        self._base = base

    def role(self) -> bytes:
        """Chat's first chunk, which names the role (sent with the first token, as vLLM
        does); nothing for completions."""
        if self._req.api is not Api.CHAT:
            return b""
        chunk = self._base[:-1] + (
            ', "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},'
            ' "logprobs": null, "finish_reason": null}]}'
        )
        return f"data: {chunk}\n\n".encode()

    def tokens(self, start: int, end: int, *, final: bool) -> bytes:
        parts = []
        for i in range(start, end):
            reason = f'"{self._req.finish_reason}"' if final and i == end - 1 else "null"
            text = json.dumps(_TOKEN_TEXT[i % len(_TOKEN_TEXT)])
            parts.append(f"data: {self._prefix}{text}{self._suffix % reason}\n\n")
        return "".join(parts).encode()

    def end(self, generated: int) -> bytes:
        out = ""
        if self._req.include_usage:
            usage = _usage(self._req.prompt_tokens, generated)
            chunk = self._base[:-1] + f', "choices": [], "usage": {json.dumps(usage)}}}'
            out += f"data: {chunk}\n\n"
        return (out + "data: [DONE]\n\n").encode()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _response_body(req: CompletionRequest, generated: int) -> dict[str, object]:
    text = "".join(_TOKEN_TEXT[i % len(_TOKEN_TEXT)] for i in range(generated))
    common = {"created": int(time.time()), "model": req.model}
    usage = _usage(req.prompt_tokens, generated)
    if req.api is Api.CHAT:
        message = {"role": "assistant", "content": text}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": req.finish_reason,
        }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            **common,
            "choices": [choice],
            "usage": usage,
        }
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": req.finish_reason}
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        **common,
        "choices": [choice],
        "usage": usage,
    }


@dataclass(frozen=True)
class SimStats:
    """One pod's counters since its last reset (``/sim/stats`` in JSON)."""

    name: str
    #: Unix time of the last reset; the timeline's first bucket starts there.
    since: float
    served: int
    aborted: int
    bad_requests: int
    running: int
    waiting: int
    peak_running: int
    peak_waiting: int
    kv_cache_usage: float
    generated_tokens: int
    preemptions: int
    #: Seconds the engine spent in steps, and how late steps started (loop contention).
    busy_s: float
    late_s: float
    #: Requests received per ``x-inference-priority`` value (lower-cased; "none" if absent).
    by_priority: Mapping[str, int]
    #: Requests the pod holds now (queued or running), per class, and the most it held.
    in_flight: Mapping[str, int]
    peak_in_flight: Mapping[str, int]
    #: The most sequences of each class in the running batch at once.
    peak_running_by_class: Mapping[str, int]
    #: Tokens generated per TIMELINE_BUCKET_S since ``since``.
    tokens_per_bucket: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tokens_per_bucket"] = list(self.tokens_per_bucket)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SimStats:
        fields = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in data.items() if k in fields}
        kept["tokens_per_bucket"] = tuple(kept.get("tokens_per_bucket", ()))
        return cls(**kept)

    def tokens_between(self, start: float, end: float) -> int:
        """Tokens generated between two Unix times (to the bucket)."""
        first = max(0, int((start - self.since) / TIMELINE_BUCKET_S))
        last = max(first, int((end - self.since) / TIMELINE_BUCKET_S))
        return sum(self.tokens_per_bucket[first:last])


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

    @property
    def scheduler(self) -> Scheduler:
        return self._sim.sched

    def stats(self) -> SimStats:
        return self._sim.stats()

    def reset(self) -> None:
        self._sim.reset()

    def set_healthy(self, healthy: bool) -> None:
        """Make ``/health`` answer 200 or 503 (to drive health-check failover)."""
        self._sim.healthy = healthy

    async def stop(self) -> None:
        await self._runner.cleanup()
        await self._sim.stop()

    async def __aenter__(self) -> RunningSim:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()


def build_app(cfg: SimConfig) -> tuple[web.Application, _Sim]:
    sim = _Sim(cfg)
    app = web.Application()
    app.router.add_post("/v1/completions", sim.completions)
    app.router.add_post("/v1/chat/completions", sim.chat)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_get("/metrics", sim.metrics)
    app.router.add_get("/health", sim.health)
    app.router.add_get("/sim/stats", sim.stats_page)
    app.router.add_post("/sim/reset", sim.reset_page)
    return app, sim


async def start_sim(cfg: SimConfig) -> RunningSim:
    """Start one simulated pod on ``cfg.host:cfg.port`` and return once it accepts."""
    app, sim = build_app(cfg)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        handler_cancellation=True,  # a client that goes away aborts its request
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port)
        await site.start()
        port = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    sim.start()
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


# --- the command line ----------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> list[SimConfig]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_sim", description="A simulated vLLM model server."
    )
    parser.add_argument("--pods", type=Path, help="a JSON list of pod configs: serve them all")
    parser.add_argument("--profile", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--name", default="sim-0")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument("--kv-cache-tokens", type=int)
    parser.add_argument("--scheduling-policy", choices=[p.value for p in Policy])
    parser.add_argument("--slowdown", type=float)
    args = parser.parse_args(argv)
    if args.pods is not None:
        try:
            return [SimConfig.from_json(d) for d in json.loads(args.pods.read_text())]
        except (OSError, ValueError, TypeError) as exc:
            parser.error(f"--pods {args.pods}: {exc}")
    overrides = {
        key: value
        for key, value in (
            ("max_num_seqs", args.max_num_seqs),
            ("max_num_batched_tokens", args.max_num_batched_tokens),
            ("kv_cache_tokens", args.kv_cache_tokens),
            ("scheduling_policy", args.scheduling_policy),
            ("slowdown", args.slowdown),
        )
        if value is not None
    }
    profile = SimConfig.gpu_pod if args.profile == "gpu" else SimConfig.cpu_pod
    try:
        return [profile(args.name, args.host, args.port, model=args.model, **overrides)]
    except ValueError as exc:
        parser.error(str(exc))


async def _serve(cfgs: Sequence[SimConfig]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sims = await start_sims(cfgs)
    try:
        # One line on stdout that a parent process can wait for (ports may be 0).
        pods = [{"name": s.name, "url": s.url, "port": s.port} for s in sims]
        print(json.dumps({"pods": pods}), flush=True)
        await stop.wait()
    finally:
        for sim in sims:
            await sim.stop()


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfgs = _parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(cfgs))


if __name__ == "__main__":
    main()
