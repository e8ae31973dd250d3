"""Scrape an inference server's saturation gauges from its Prometheus ``/metrics``.

vLLM exports, per engine (label ``model_name`` and friends):

- ``vllm:num_requests_waiting``: queued requests (required here);
- ``vllm:num_requests_running``: requests in the running batch (0 if absent);
- ``vllm:gpu_cache_usage_perc``: KV-cache use as a fraction 0 to 1, despite its name
  (vLLM's V1 engine calls it ``vllm:kv_cache_usage_perc``; either is read).

Several series of one gauge (several engines or models behind one port) are summed for
the request counts; the KV-cache use is their maximum (the fullest engine saturates
first). Names are overridable for other servers (:class:`MetricNames`).

Nothing here raises: a timeout, a refused connection, an HTTP error, an oversized or
unparsable body all come back as a :class:`ScrapeError` value.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ratelimit.adaptive import SaturationSample

log = logging.getLogger(__name__)

#: A metrics page larger than this is refused (vLLM's is tens of kilobytes).
MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class MetricNames:
    """Which series hold the three signals. Each is a tuple: the first present is used."""

    waiting: tuple[str, ...] = ("vllm:num_requests_waiting",)
    running: tuple[str, ...] = ("vllm:num_requests_running",)
    kv_cache_usage: tuple[str, ...] = ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc")


VLLM = MetricNames()


@dataclass(frozen=True)
class ScrapeError:
    """Why a scrape gave no sample."""

    url: str
    message: str

    def __str__(self) -> str:
        return f"{self.url}: {self.message}"


def _pick(values: dict[str, list[float]], names: Iterable[str]) -> list[float] | None:
    for name in names:
        if name in values:
            return values[name]
    return None


def parse_metrics(
    text: str, names: MetricNames = VLLM, *, source: str = "metrics"
) -> SaturationSample | ScrapeError:
    """Read the saturation gauges out of a Prometheus text exposition."""
    wanted = {*names.waiting, *names.running, *names.kv_cache_usage}
    values: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted and not math.isnan(sample.value):
                    values.setdefault(sample.name, []).append(float(sample.value))
    except Exception as exc:  # the parser raises several types on bad input
        return ScrapeError(source, f"unparsable metrics text: {type(exc).__name__}: {exc}")
    waiting = _pick(values, names.waiting)
    if waiting is None:
        return ScrapeError(source, f"no {' or '.join(names.waiting)} series in the metrics")
    running = _pick(values, names.running) or [0.0]
    kv = _pick(values, names.kv_cache_usage)
    return SaturationSample(
        waiting=sum(waiting),
        running=sum(running),
        kv_cache_usage=max(kv) if kv else None,
    )


class Scraper:
    """Fetch and parse ``/metrics`` pages over one shared aiohttp session.

    ``timeout_s`` bounds a whole scrape (connect, headers and body). Use it as an async
    context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        *,
        names: MetricNames = VLLM,
        timeout_s: float = 2.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.names = names
        self.timeout_s = timeout_s
        self._session = session
        self._owns_session = session is None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        return self._session

    async def scrape(self, url: str) -> SaturationSample | ScrapeError:
        """One scrape of ``url`` (the full ``http://host:port/metrics``). Never raises."""
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._client().get(url) as response:
                    if response.status != 200:
                        return ScrapeError(url, f"HTTP {response.status}")
                    body = await response.content.read(MAX_BODY_BYTES + 1)
        except TimeoutError:
            return ScrapeError(url, f"timed out after {self.timeout_s:g}s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return ScrapeError(url, f"{type(exc).__name__}: {exc}")
        if len(body) > MAX_BODY_BYTES:
            return ScrapeError(url, f"metrics page is larger than {MAX_BODY_BYTES} bytes")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return ScrapeError(url, f"metrics page is not UTF-8: {exc}")
        return parse_metrics(text, self.names, source=url)

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> Scraper:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Backoff:
    """When each endpoint is next due for a scrape: every round while it answers, and
    less and less often while it does not.

    A pod that serves no metrics (the wrong port, no metrics server, gone) would otherwise
    cost a failed connection every round, forever: at thousands of pods that is most of
    the control plane's CPU. After ``n`` failures in a row an endpoint is skipped for
    ``2 ** (n - 1) - 1`` rounds, at most ``max_skip`` (so it is scraped at least every
    ``max_skip + 1`` rounds), and the first success puts it back on every round. While an
    endpoint is skipped the controller keeps its limits, as after any failed scrape.
    """

    def __init__(self, max_skip: int) -> None:
        self.max_skip = max_skip
        #: endpoint -> (failures in a row, the round it is next due).
        self._failing: dict[str, tuple[int, int]] = {}

    def due(self, endpoint: str, round_no: int) -> bool:
        failing = self._failing.get(endpoint)
        return failing is None or round_no >= failing[1]

    def record(self, endpoint: str, round_no: int, *, ok: bool) -> None:
        if ok:
            self._failing.pop(endpoint, None)
            return
        failures = self._failing.get(endpoint, (0, 0))[0] + 1
        skip = min(2 ** min(failures - 1, 30) - 1, self.max_skip)
        self._failing[endpoint] = (failures, round_no + 1 + skip)

    def keep(self, endpoints: Iterable[str]) -> None:
        """Forget endpoints no longer scraped."""
        kept = set(endpoints)
        self._failing = {k: v for k, v in self._failing.items() if k in kept}

    def backing_off(self, round_no: int) -> int:
        """Endpoints that will not be scraped this round."""
        return sum(1 for _, due in self._failing.values() if round_no < due)
