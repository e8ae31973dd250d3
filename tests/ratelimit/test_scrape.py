"""The scraper against a tiny aiohttp app serving vLLM-style metrics, and bad pages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from ratelimit.adaptive import SaturationSample
from ratelimit.scrape import Backoff, MetricNames, ScrapeError, Scraper, parse_metrics

VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B"} 7.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B"} 3.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B"} 1.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B"} 0.42
vllm:gpu_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B"} 0.87
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{finished_reason="stop",model_name="meta-llama/Llama-3.1-8B"} 1234.0
"""


def test_parse_sums_counts_and_takes_the_fullest_cache() -> None:
    sample = parse_metrics(VLLM_TEXT)
    assert sample == SaturationSample(waiting=4.0, running=12.0, kv_cache_usage=0.87)


def test_parse_reads_the_v1_cache_name_and_custom_names() -> None:
    v1 = "vllm:num_requests_waiting 2\nvllm:kv_cache_usage_perc 0.5\n"
    assert parse_metrics(v1) == SaturationSample(waiting=2.0, running=0.0, kv_cache_usage=0.5)
    names = MetricNames(waiting=("queue_len",), running=("busy",), kv_cache_usage=())
    custom = parse_metrics("queue_len 9\nbusy 3\n", names)
    assert custom == SaturationSample(waiting=9.0, running=3.0, kv_cache_usage=None)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("vllm:num_requests_running 3\n", "no vllm:num_requests_waiting"),
        ("vllm:num_requests_waiting{ 3\n", "unparsable"),
        ("", "no vllm:num_requests_waiting"),
    ],
)
def test_parse_errors_are_values(text: str, why: str) -> None:
    result = parse_metrics(text)
    assert isinstance(result, ScrapeError)
    assert why in result.message


@given(st.text(max_size=300))
def test_parse_never_raises(text: str) -> None:
    assert isinstance(parse_metrics(text), SaturationSample | ScrapeError)


@pytest.fixture
async def metrics_server() -> AsyncIterator[str]:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=VLLM_TEXT, content_type="text/plain")

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()  # answers only at teardown: longer than any scrape timeout
        return web.Response(text=VLLM_TEXT)

    async def binary(request: web.Request) -> web.Response:
        return web.Response(body=b"\xff\xfe\x00garbage")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/missing", missing)
    app.router.add_get("/slow", slow)
    app.router.add_get("/binary", binary)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        release.set()
        await runner.cleanup()


async def test_scraper_fetches_and_parses(metrics_server: str) -> None:
    async with Scraper(timeout_s=2.0) as scraper:
        sample = await scraper.scrape(f"{metrics_server}/metrics")
    assert sample == SaturationSample(waiting=4.0, running=12.0, kv_cache_usage=0.87)


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/missing", "HTTP 404"),
        ("/slow", "timed out"),
        ("/binary", "not UTF-8"),
    ],
)
async def test_scraper_errors_are_values(metrics_server: str, path: str, why: str) -> None:
    async with Scraper(timeout_s=0.3) as scraper:
        result = await scraper.scrape(f"{metrics_server}{path}")
    assert isinstance(result, ScrapeError)
    assert why in result.message
    assert result.url.endswith(path)


async def test_scraper_refused_connection_is_a_value() -> None:
    async with Scraper(timeout_s=1.0) as scraper:
        result = await scraper.scrape("http://127.0.0.1:1/metrics")
    assert isinstance(result, ScrapeError)


def test_an_endpoint_that_keeps_failing_is_scraped_less_often_until_it_answers() -> None:
    backoff = Backoff(max_skip=7)
    scraped = []
    for round_no in range(40):
        if backoff.due("pod", round_no):
            scraped.append(round_no)
            backoff.record("pod", round_no, ok=round_no >= 30)
    # Failures double the gap (1, 2, 4, 8 rounds) up to max_skip + 1, then every round.
    assert scraped[:5] == [0, 1, 3, 7, 15]
    assert scraped[5:7] == [23, 31]
    assert scraped[7:] == list(range(32, 40))
    assert backoff.backing_off(40) == 0


@given(st.lists(st.booleans(), max_size=60), st.integers(0, 20))
def test_a_failing_endpoint_is_never_skipped_more_than_max_skip_rounds(
    answers: list[bool], max_skip: int
) -> None:
    backoff = Backoff(max_skip=max_skip)
    last, ok_before = -1, False
    for round_no, ok in enumerate(answers):
        if backoff.due("pod", round_no):
            assert round_no - last - 1 <= max_skip
            if ok_before:
                assert round_no == last + 1  # after a success, every round
            last, ok_before = round_no, ok
            backoff.record("pod", round_no, ok=ok)


def test_backoff_forgets_endpoints_no_longer_scraped() -> None:
    backoff = Backoff(max_skip=3)
    backoff.record("a", 0, ok=False)
    backoff.record("a", 1, ok=False)
    backoff.record("b", 1, ok=False)
    assert backoff.backing_off(2) == 1  # a skips round 2; b is due again
    backoff.keep(["b"])
    assert backoff.due("a", 2)
    assert backoff.backing_off(2) == 0
