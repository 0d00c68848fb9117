"""The OpenAI stub, exercised through the real openai client over real HTTP."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import openai
import pytest

from listener.errors import ListenerError
from listener.stub.server import (
    RunningStub,
    SlidingWindow,
    StubConfig,
    StubState,
    add_arguments,
    config_from_args,
    extract_product_name,
    format_duration,
    run_stub,
)

PROMPT = "Write a short product description for: Acme Rocket Skates"
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a copywriter."},
    {"role": "user", "content": PROMPT},
]


@pytest.fixture
def anyio_backend() -> str:
    # uvicorn runs on asyncio only.
    return "asyncio"


@asynccontextmanager
async def client_for(
    config: StubConfig, client_timeout: float = 5.0
) -> AsyncIterator[tuple[RunningStub, openai.AsyncOpenAI]]:
    async with (
        run_stub(config) as stub,
        openai.AsyncOpenAI(
            base_url=stub.base_url, api_key="test", max_retries=0, timeout=client_timeout
        ) as client,
    ):
        yield stub, client


async def complete(client: openai.AsyncOpenAI) -> str | None:
    response = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=50
    )
    return response.choices[0].message.content


# --- pure helpers -------------------------------------------------------------------


def test_format_duration() -> None:
    assert format_duration(0) == "0s"
    assert format_duration(0.12) == "120ms"
    assert format_duration(1) == "1s"
    assert format_duration(1.5) == "1.5s"
    assert format_duration(360) == "6m0s"
    assert format_duration(3723) == "1h2m3s"


def test_sliding_window_peak_and_waits() -> None:
    window = SlidingWindow(10.0)
    for t in (0.0, 1.0, 2.0):
        window.add(t)
    assert window.total(2.0) == 3
    assert window.wait_until_fits(2.0, 1, 3) == pytest.approx(8.0)  # oldest leaves at 10
    assert window.wait_until_fits(2.0, 1, 4) == 0.0
    assert window.time_until_empty(2.0) == pytest.approx(10.0)
    # The event at 0 has left by t=10 (half-open window), so the busiest window is 1..10.5.
    for t in (10.0, 10.5):
        window.add(t)
    assert window.total(10.5) == 4
    assert window.peak == 4
    window.add(30.0)
    assert window.total(30.0) == 1
    assert window.peak == 4


def test_sliding_window_weighted_wait() -> None:
    window = SlidingWindow(60.0)
    window.add(0.0, 100)
    window.add(5.0, 100)
    # Once the t=0 entry expires (at 60) there is room: 100 + 150 <= 300.
    assert window.wait_until_fits(10.0, 150, 300) == pytest.approx(50.0)
    assert window.wait_until_fits(10.0, 500, 300) == 60.0  # can never fit


def test_state_admit_with_fake_clock() -> None:
    now = [100.0]
    state = StubState(StubConfig(rpm=2, window_seconds=60), clock=lambda: now[0])
    assert state.admit("m", 10).allowed
    now[0] += 1
    first = state.admit("m", 10)
    assert first.allowed
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    now[0] += 1
    refused = state.admit("m", 10)
    assert not refused.allowed
    assert refused.limit_type == "requests"
    assert refused.headers["retry-after"] == "58"
    assert refused.headers["retry-after-ms"] == "58000"
    now[0] = 160.0  # the first request has left the window
    assert state.admit("m", 10).allowed
    assert state.stats()["max_requests_in_any_window"] == 2


def test_extract_product_name() -> None:
    assert extract_product_name(PROMPT) == "Acme Rocket Skates"
    assert extract_product_name('Describe "Zen Kettle" briefly.') == "Zen Kettle"
    assert extract_product_name("Context\nProduct name: Foo Bar\nBe brief.") == "Foo Bar"
    assert extract_product_name("") == "this product"


def test_config_from_args() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--port",
            "8001",
            "--rpm",
            "450",
            "--tpm",
            "0",
            "--latency",
            "0.2",
            "--window-seconds",
            "60",
        ]
    )
    config = config_from_args(args)
    assert (args.host, args.port) == ("127.0.0.1", 8001)
    assert (config.rpm, config.tpm, config.latency, config.window_seconds) == (450, 0, 0.2, 60)


# --- over HTTP --------------------------------------------------------------------


@pytest.mark.anyio
async def test_completion_mentions_product_and_reports_usage() -> None:
    async with client_for(StubConfig()) as (stub, client):
        response = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        models = await client.models.list()
    assert response.id.startswith("chatcmpl-")
    assert response.model == "gpt-4o-mini"
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content is not None
    assert "Acme Rocket Skates" in choice.message.content
    usage = response.usage
    assert usage is not None
    prompt_chars = len("You are a copywriter.") + len(PROMPT)
    assert usage.prompt_tokens == prompt_chars // 4
    assert usage.completion_tokens == len(choice.message.content) // 4
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert [m.id for m in models.data] == ["gpt-4o-mini"]
    assert stub.state.completed_total == 1


@pytest.mark.anyio
async def test_rpm_limit_gives_rate_limit_error_with_retry_after() -> None:
    async with client_for(StubConfig(rpm=3, window_seconds=60)) as (stub, client):
        for _ in range(3):
            await complete(client)
        with pytest.raises(openai.RateLimitError) as excinfo:
            await complete(client)
    error = excinfo.value
    assert error.code == "rate_limit_exceeded"
    assert error.type == "requests"
    assert "Rate limit reached for gpt-4o-mini" in error.message
    headers = error.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert 0 < int(headers["retry-after-ms"]) <= 60_000
    assert headers["x-ratelimit-remaining-requests"] == "0"
    stats = stub.state.stats()
    assert stats["rate_limited_total"] == 1
    assert stats["completed_total"] == 3
    assert stats["max_requests_in_any_window"] == 3


@pytest.mark.anyio
async def test_tpm_limit_counts_prompt_plus_max_tokens() -> None:
    # Each request costs prompt (~18) + max_tokens (50) tokens, so only one fits in 100.
    async with client_for(StubConfig(tpm=100)) as (_, client):
        await complete(client)
        with pytest.raises(openai.RateLimitError) as excinfo:
            await complete(client)
    assert excinfo.value.type == "tokens"
    assert excinfo.value.response.headers["x-ratelimit-limit-tokens"] == "100"


@pytest.mark.anyio
async def test_rate_limit_headers_on_success() -> None:
    async with client_for(StubConfig(rpm=10, tpm=10_000)) as (_, client):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=50
        )
    headers = raw.headers
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "9"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    assert headers["x-ratelimit-limit-tokens"] == "10000"
    prompt_tokens = (len("You are a copywriter.") + len(PROMPT)) // 4
    assert headers["x-ratelimit-remaining-tokens"] == str(10_000 - prompt_tokens - 50)
    assert headers["x-ratelimit-reset-tokens"]
    assert raw.parse().choices[0].message.content


@pytest.mark.anyio
async def test_injected_statuses_map_to_openai_errors() -> None:
    config = StubConfig(fail_next_status=[500, 503, 401, 429])
    async with client_for(config) as (stub, client):
        with pytest.raises(openai.InternalServerError):
            await complete(client)
        with pytest.raises(openai.InternalServerError) as unavailable:
            await complete(client)
        with pytest.raises(openai.AuthenticationError) as auth:
            await complete(client)
        with pytest.raises(openai.RateLimitError):
            await complete(client)
        assert await complete(client)  # the queue is used up
    assert unavailable.value.status_code == 503
    assert auth.value.code == "invalid_api_key"
    assert stub.state.errors_injected_total == 4
    assert stub.state.rate_limited_total == 1


@pytest.mark.anyio
async def test_fail_rate_and_required_api_key() -> None:
    async with client_for(StubConfig(fail_rate=1.0)) as (_, client):
        with pytest.raises(openai.InternalServerError):
            await complete(client)
    async with client_for(StubConfig(required_api_key="sk-right")) as (stub, client):
        with pytest.raises(openai.AuthenticationError):
            await complete(client)
        async with openai.AsyncOpenAI(
            base_url=stub.base_url, api_key="sk-right", max_retries=0
        ) as good:
            assert await complete(good)


@pytest.mark.anyio
async def test_malformed_body() -> None:
    async with client_for(StubConfig(malformed_next=1)) as (_, client):
        with pytest.raises((openai.APIError, json.JSONDecodeError)):
            await complete(client)
        assert await complete(client)


@pytest.mark.anyio
async def test_timeout_next_makes_client_time_out() -> None:
    async with client_for(StubConfig(timeout_next=1), client_timeout=0.5) as (stub, client):
        with pytest.raises(openai.APITimeoutError):
            await complete(client)
        # The next answers at once; a loaded machine may take longer than the 0.5 s, though.
        assert await complete(client.with_options(timeout=30))
        assert stub.state.errors_injected_total == 1


@pytest.mark.anyio
async def test_control_endpoints() -> None:
    async with run_stub(StubConfig(rpm=5)) as stub, httpx.AsyncClient(base_url=stub.url) as http:
        response = await http.post("/stub/faults", json={"fail_next_status": [502]})
        assert response.json()["fail_next_status"] == [502]
        assert stub.state.config.fail_next_status == [502]
        bad = await http.post("/stub/faults", json={"window_seconds": 1})
        assert bad.status_code == 400
        wrong_type = await http.post("/stub/faults", json={"rpm": "many"})
        assert wrong_type.status_code == 400
        assert stub.state.config.rpm == 5
        completion = await http.post(
            "/v1/chat/completions", json={"model": "m", "messages": MESSAGES}
        )
        assert completion.status_code == 502
        assert completion.headers["x-ratelimit-limit-requests"] == "5"
        ok = await http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
        assert ok.status_code == 200
        stats = (await http.get("/stub/stats")).json()
        assert stats["requests_total"] == 2
        assert stats["errors_injected_total"] == 1
        assert stats["max_requests_in_any_window"] == 1
        reset = (await http.post("/stub/reset")).json()
        assert reset["requests_total"] == reset["max_requests_in_any_window"] == 0
        invalid = await http.post("/v1/chat/completions", content=b"not json")
        assert invalid.status_code == 400


@pytest.mark.anyio
async def test_concurrent_burst_admits_exactly_rpm() -> None:
    async with client_for(StubConfig(rpm=5, latency=0.05)) as (stub, client):
        outcomes: list[str] = []

        async def one() -> None:
            try:
                await complete(client)
                outcomes.append("ok")
            except openai.RateLimitError:
                outcomes.append("429")

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
    assert outcomes.count("ok") == 5
    assert outcomes.count("429") == 15
    assert stub.state.stats()["max_requests_in_any_window"] == 5


@pytest.mark.anyio
async def test_port_in_use_raises() -> None:
    async with run_stub() as stub:
        with pytest.raises(ListenerError, match="cannot serve HTTP"):
            async with run_stub(port=stub.port):
                pass
