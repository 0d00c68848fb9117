"""The stub's Files and Batches API and its flex tier, through the real openai client over
real HTTP.

Batch time is the stub's batch clock: tests that need a status at a chosen moment configure
long durations and move the clock with POST /stub/batches/advance, so a loaded machine cannot
make a batch skip a status; one test runs a batch on the wall clock with short durations.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
import httpx
import openai
import pytest
from openai.types import Batch

from listener.stub.server import (
    RunningStub,
    StubConfig,
    add_arguments,
    config_from_args,
    run_stub,
)
from listener.stub.text import BATCH_400_MARKER, BATCH_ERROR_MARKER, FLEX_UNAVAILABLE_MARKER

MODEL = "gpt-4o-mini"
ENDPOINT: Literal["/v1/chat/completions"] = "/v1/chat/completions"
HOUR = 3600.0
# Each status lasts an hour, so only /stub/batches/advance moves a batch on.
SLOW: dict[str, Any] = {
    "batch_validating_seconds": HOUR,
    "batch_processing_seconds": 4 * HOUR,
    "batch_finalizing_seconds": HOUR,
    "batch_cancelling_seconds": HOUR,
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn runs on asyncio only


@asynccontextmanager
async def stub_client(
    config: StubConfig,
) -> AsyncIterator[tuple[RunningStub, openai.AsyncOpenAI, httpx.AsyncClient]]:
    async with (
        run_stub(config) as stub,
        openai.AsyncOpenAI(base_url=stub.base_url, api_key="test", max_retries=0) as client,
        httpx.AsyncClient(base_url=stub.url) as control,
    ):
        yield stub, client, control


def chat_body(prompt: str, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    messages = [
        {"role": "system", "content": "You are a copywriter."},
        {"role": "user", "content": prompt},
    ]
    return {"model": model, "messages": messages, "max_tokens": 60, **extra}


def request_line(custom_id: str, body: dict[str, Any], **override: Any) -> str:
    line = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body, **override}
    return json.dumps(line)


def jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def product_lines(count: int, model: str = MODEL) -> list[str]:
    return [
        request_line(f"item-{i}", chat_body(f"Product: Gadget {i}", model)) for i in range(count)
    ]


async def start_batch(
    client: openai.AsyncOpenAI, content: bytes, metadata: dict[str, str] | None = None
) -> Batch:
    uploaded = await client.files.create(file=("input.jsonl", content), purpose="batch")
    return await client.batches.create(
        input_file_id=uploaded.id,
        endpoint=ENDPOINT,
        completion_window="24h",
        metadata=metadata or {"job": "test"},
    )


async def advance(control: httpx.AsyncClient, seconds: float) -> None:
    response = await control.post("/stub/batches/advance", json={"seconds": seconds})
    assert response.status_code == 200, response.text


async def lines_of(client: openai.AsyncOpenAI, file_id: str | None) -> dict[str, Any]:
    """A result file's lines by custom_id (never by order: the stub shuffles them)."""
    assert file_id is not None
    text = (await client.files.content(file_id)).text
    lines = [json.loads(line) for line in text.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines)
    return by_id


def without_ids(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


# --- files ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_upload_retrieve_and_read_a_file() -> None:
    content = jsonl(product_lines(3))
    async with stub_client(StubConfig()) as (_, client, _control):
        uploaded = await client.files.create(file=("input.jsonl", content), purpose="batch")
        again = await client.files.retrieve(uploaded.id)
        read = await client.files.content(uploaded.id)
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve("file-missing")
    assert uploaded.id.startswith("file-")
    assert (uploaded.purpose, uploaded.filename, uploaded.bytes) == (
        "batch",
        "input.jsonl",
        len(content),
    )
    assert again == uploaded
    assert read.read() == content


# --- a batch's life ----------------------------------------------------------------


@pytest.mark.anyio
async def test_a_batch_on_the_wall_clock_completes_with_every_answer() -> None:
    config = StubConfig(
        batch_validating_seconds=0.05, batch_processing_seconds=0.2, batch_finalizing_seconds=0.05
    )
    async with stub_client(config) as (_, client, _control):
        batch = await start_batch(client, jsonl(product_lines(20)), {"job": "42"})
        seen = [batch.status]
        with anyio.fail_after(30):
            while batch.status != "completed":
                await anyio.sleep(0.02)
                batch = await client.batches.retrieve(batch.id)
                if batch.status != seen[-1]:
                    seen.append(batch.status)
        outputs = await lines_of(client, batch.output_file_id)
    # A poll may miss a short status on a loaded machine; never one out of order.
    order = ["validating", "in_progress", "finalizing", "completed"]
    assert seen == sorted(seen, key=order.index)
    assert seen[0] == "validating" and seen[-1] == "completed"
    assert batch.metadata == {"job": "42"}
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (20, 20)
    assert batch.request_counts.failed == 0
    assert batch.error_file_id is None
    assert set(outputs) == {f"item-{i}" for i in range(20)}
    assert list(outputs) != [f"item-{i}" for i in range(20)]  # shuffled: match by custom_id
    assert batch.created_at <= (batch.in_progress_at or 0) <= (batch.completed_at or 0)


@pytest.mark.anyio
async def test_statuses_follow_the_batch_clock_and_bodies_equal_the_sync_answers() -> None:
    bodies = {
        "plain": chat_body("Product: Acme Rocket Skates"),
        "schema": chat_body(
            "Product: Zen Kettle",
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "copy",
                    "strict": True,
                    "schema": {
                        "type": "object",
                        "properties": {"title": {"type": "string"}},
                        "required": ["title"],
                        "additionalProperties": False,
                    },
                },
            },
        ),
    }
    content = jsonl([request_line(cid, body) for cid, body in bodies.items()])
    async with stub_client(StubConfig(**SLOW)) as (_, client, control):
        batch = await start_batch(client, content)
        statuses = [batch.status]
        for seconds in (HOUR, 4 * HOUR, HOUR):
            await advance(control, seconds)
            statuses.append((await client.batches.retrieve(batch.id)).status)
        batch = await client.batches.retrieve(batch.id)
        outputs = await lines_of(client, batch.output_file_id)
        sync = {}
        for cid, body in bodies.items():
            raw = await control.post("/v1/chat/completions", json=body)
            sync[cid] = raw.json()
    assert statuses == ["validating", "in_progress", "finalizing", "completed"]
    assert batch.model == MODEL
    for cid, line in outputs.items():
        assert line["error"] is None
        assert line["id"].startswith("batch_req_")
        response = line["response"]
        assert response["status_code"] == 200
        assert response["request_id"].startswith("req_")
        assert without_ids(response["body"]) == without_ids(sync[cid])
        assert response["body"]["usage"]["total_tokens"] > 0
    assert json.loads(outputs["schema"]["response"]["body"]["choices"][0]["message"]["content"])
    assert batch.usage is not None
    assert batch.usage.input_tokens == sum(s["usage"]["prompt_tokens"] for s in sync.values())


@pytest.mark.anyio
async def test_request_counts_grow_while_in_progress() -> None:
    async with stub_client(StubConfig(**SLOW)) as (_, client, control):
        batch = await start_batch(client, jsonl(product_lines(8)))
        assert batch.request_counts is not None and batch.request_counts.total == 0
        await advance(control, HOUR + HOUR)  # validated, then a quarter of the processing
        batch = await client.batches.retrieve(batch.id)
    assert batch.status == "in_progress"
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (8, 2)


# --- listing ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_list_pages_newest_first_with_after() -> None:
    async with stub_client(StubConfig(**SLOW)) as (_, client, _control):
        created = [(await start_batch(client, jsonl(product_lines(1)))).id for _ in range(5)]
        first = await client.batches.list(limit=2)
        second = await client.batches.list(limit=2, after=first.data[-1].id)
        third = await client.batches.list(limit=2, after=second.data[-1].id)
        every = [b.id async for b in client.batches.list(limit=2)]
        with pytest.raises(openai.BadRequestError):
            await client.batches.list(limit=101)
    newest_first = list(reversed(created))
    assert [b.id for b in first.data] == newest_first[:2] and first.has_more
    assert [b.id for b in second.data] == newest_first[2:4] and second.has_more
    assert [b.id for b in third.data] == newest_first[4:] and not third.has_more
    assert every == newest_first


# --- what goes wrong in a batch -------------------------------------------------------


@pytest.mark.anyio
async def test_failed_lines_go_to_the_error_file() -> None:
    content = jsonl(
        [
            request_line("fine", chat_body("Product: Lamp")),
            request_line("server-error", chat_body(f"Product: Desk {BATCH_ERROR_MARKER}")),
            request_line("refused-400", chat_body(f"Product: Chair {BATCH_400_MARKER}")),
            # Passes validation (it has a model) but is no chat request: a 400 body, as OpenAI.
            request_line("no-messages", {"model": MODEL, "prompt": "hello"}),
        ]
    )
    async with stub_client(StubConfig(**SLOW)) as (_, client, control):
        batch = await start_batch(client, content)
        await advance(control, 6 * HOUR)
        batch = await client.batches.retrieve(batch.id)
        outputs = await lines_of(client, batch.output_file_id)
        errors = await lines_of(client, batch.error_file_id)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (4, 1, 3)
    assert set(outputs) == {"fine"}
    assert set(errors) == {"server-error", "refused-400", "no-messages"}
    statuses = {cid: line["response"]["status_code"] for cid, line in errors.items()}
    assert statuses == {"server-error": 500, "refused-400": 400, "no-messages": 400}
    assert errors["server-error"]["response"]["body"]["error"]["type"] == "server_error"
    assert errors["no-messages"]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert all(line["error"] is None for line in errors.values())


@pytest.mark.anyio
async def test_the_error_rate_is_seeded() -> None:
    config = StubConfig(**SLOW, batch_error_rate=0.5, seed=7)
    failed_sets = []
    for _ in range(2):
        async with stub_client(config) as (_, client, control):
            batch = await start_batch(client, jsonl(product_lines(40)))
            await advance(control, 6 * HOUR)
            batch = await client.batches.retrieve(batch.id)
            failed_sets.append(set(await lines_of(client, batch.error_file_id)))
            assert set(await lines_of(client, batch.output_file_id)).isdisjoint(failed_sets[-1])
    assert failed_sets[0] == failed_sets[1]
    assert 5 < len(failed_sets[0]) < 35


@pytest.mark.parametrize(
    ("lines", "code", "line", "param"),
    [
        (
            [
                request_line("a", chat_body("Product: One")),
                request_line("b", chat_body("Product: Two", model="gpt-4o")),
            ],
            "mismatched_model",
            2,
            "body.model",
        ),
        (
            [
                request_line("same", chat_body("Product: One")),
                request_line("same", chat_body("Product: Two")),
            ],
            "duplicate_custom_id",
            2,
            "custom_id",
        ),
        (
            [request_line("a", chat_body("Product: One")), "{not json"],
            "invalid_json_line",
            2,
            None,
        ),
        (
            [request_line("a", chat_body("Product: One"), url="/v1/embeddings")],
            "invalid_url",
            1,
            "url",
        ),
        (
            [request_line("a", chat_body("Product: One"), method="GET")],
            "invalid_method",
            1,
            "method",
        ),
        ([request_line("a", {"messages": []})], "missing_required_parameter", 1, "body.model"),
        (
            [json.dumps({"method": "POST", "url": ENDPOINT, "body": chat_body("x")})],
            "missing_required_parameter",
            1,
            "custom_id",
        ),
    ],
)
@pytest.mark.anyio
async def test_an_invalid_input_file_fails_the_batch_at_validation(
    lines: list[str], code: str, line: int, param: str | None
) -> None:
    async with stub_client(StubConfig(**SLOW)) as (_, client, control):
        batch = await start_batch(client, jsonl(lines))
        assert batch.status == "validating"
        await advance(control, HOUR)
        batch = await client.batches.retrieve(batch.id)
    assert batch.status == "failed"
    assert batch.failed_at is not None and batch.in_progress_at is None
    assert batch.errors is not None and batch.errors.data
    error = batch.errors.data[0]
    assert (error.code, error.line, error.param) == (code, line, param)
    assert error.message
    assert batch.output_file_id is None and batch.error_file_id is None


@pytest.mark.anyio
async def test_the_file_limits_fail_the_batch() -> None:
    async with stub_client(StubConfig(**SLOW, batch_max_requests=3, batch_max_bytes=2000)) as (
        _,
        client,
        control,
    ):
        too_many = await start_batch(client, jsonl(product_lines(4)))
        too_big = await start_batch(client, jsonl(product_lines(3)) + b" " * 2000)
        fits = await start_batch(client, jsonl(product_lines(3)))
        await advance(control, HOUR)
        codes = {}
        for batch in (too_many, too_big, fits):
            batch = await client.batches.retrieve(batch.id)
            codes[batch.id] = (
                batch.errors.data[0].code if batch.errors and batch.errors.data else batch.status
            )
    assert codes == {
        too_many.id: "too_many_requests",
        too_big.id: "file_too_large",
        fits.id: "in_progress",
    }


@pytest.mark.anyio
async def test_a_bad_create_is_refused_at_once() -> None:
    async with stub_client(StubConfig()) as (_, client, _control):
        uploaded = await client.files.create(
            file=("in.jsonl", jsonl(product_lines(1))), purpose="batch"
        )
        other = await client.files.create(file=("notes.txt", b"hello"), purpose="user_data")
        too_much = {f"k{i}": "v" for i in range(17)}
        with pytest.raises(openai.BadRequestError, match="metadata"):
            await client.batches.create(
                input_file_id=uploaded.id,
                endpoint=ENDPOINT,
                completion_window="24h",
                metadata=too_much,
            )
        with pytest.raises(openai.BadRequestError, match="purpose 'batch'"):
            await client.batches.create(
                input_file_id=other.id, endpoint=ENDPOINT, completion_window="24h"
            )
        with pytest.raises(openai.BadRequestError, match="No such File"):
            await client.batches.create(
                input_file_id="file-nope", endpoint=ENDPOINT, completion_window="24h"
            )
        with pytest.raises(openai.BadRequestError):
            await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
            )
        with pytest.raises(openai.NotFoundError):
            await client.batches.retrieve("batch_nope")
        assert (await client.batches.list()).data == []


# --- expiry, cancel, the enqueued-token limit ----------------------------------------


@pytest.mark.anyio
async def test_an_unfinished_batch_expires_with_partial_output() -> None:
    # Expires halfway through processing: the first half of its requests ran.
    config = StubConfig(**SLOW, batch_completion_window_seconds=HOUR + 2 * HOUR)
    async with stub_client(config) as (_, client, control):
        batch = await start_batch(client, jsonl(product_lines(10)))
        await advance(control, 2 * HOUR)
        assert (await client.batches.retrieve(batch.id)).status == "in_progress"
        await advance(control, 2 * HOUR)
        batch = await client.batches.retrieve(batch.id)
        outputs = await lines_of(client, batch.output_file_id)
        errors = await lines_of(client, batch.error_file_id)
    assert batch.status == "expired"
    assert batch.expired_at == batch.expires_at == batch.created_at + int(3 * HOUR)
    assert batch.completed_at is None and batch.finalizing_at is None
    assert set(outputs) == {f"item-{i}" for i in range(5)}
    assert set(errors) == {f"item-{i}" for i in range(5, 10)}
    assert {line["error"]["code"] for line in errors.values()} == {"batch_expired"}
    assert all(line["response"] is None for line in errors.values())
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (5, 5)


@pytest.mark.anyio
async def test_cancel_goes_through_cancelling_with_partial_output() -> None:
    config = StubConfig(**{**SLOW, "batch_cancelling_seconds": 10 * HOUR})
    async with stub_client(config) as (_, client, control):
        batch = await start_batch(client, jsonl(product_lines(4)))
        await advance(control, HOUR + 2 * HOUR)  # half of the processing
        cancelling = await client.batches.cancel(batch.id)
        assert (await client.batches.cancel(batch.id)).cancelling_at == cancelling.cancelling_at
        await advance(control, 4 * HOUR)  # far past processing: nothing more runs
        still = await client.batches.retrieve(batch.id)
        await advance(control, 6 * HOUR)
        cancelled = await client.batches.retrieve(batch.id)
        outputs = await lines_of(client, cancelled.output_file_id)
        errors = await lines_of(client, cancelled.error_file_id)
        with pytest.raises(openai.ConflictError):
            await client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    assert still.status == "cancelling" and still.output_file_id is None
    assert cancelled.status == "cancelled"
    assert cancelled.cancelled_at is not None and cancelled.completed_at is None
    assert set(outputs) == {"item-0", "item-1"}
    assert set(errors) == {"item-2", "item-3"}
    assert {line["error"]["code"] for line in errors.values()} == {"batch_cancelled"}


@pytest.mark.anyio
async def test_the_enqueued_token_limit_fails_a_batch_past_it() -> None:
    lines = product_lines(4)
    async with stub_client(StubConfig(**SLOW)) as (stub, client, control):
        probe = await start_batch(client, jsonl(lines))
        await advance(control, 6 * HOUR)
        probe = await client.batches.retrieve(probe.id)
        assert probe.usage is not None
        tokens = probe.usage.input_tokens  # the estimate the limit counts
        stub.state.config.batch_enqueued_token_limit = 2 * tokens
        first = await start_batch(client, jsonl(lines))
        second = await start_batch(client, jsonl(lines))
        third = await start_batch(client, jsonl(lines))  # past the limit
        other_model = await start_batch(client, jsonl(product_lines(4, model="gpt-4o")))
        await advance(control, HOUR)
        statuses = {
            b.id: (await client.batches.retrieve(b.id)) for b in (first, second, third, other_model)
        }
        await advance(control, 5 * HOUR)  # the first two end: room again
        fourth = await start_batch(client, jsonl(lines))
        await advance(control, HOUR)
        fourth = await client.batches.retrieve(fourth.id)
    assert [statuses[b.id].status for b in (first, second, third, other_model)] == [
        "in_progress",
        "in_progress",
        "failed",
        "in_progress",
    ]
    failed = statuses[third.id]
    assert failed.errors is not None and failed.errors.data
    assert failed.errors.data[0].code == "token_limit_exceeded"
    assert "Enqueued token limit" in (failed.errors.data[0].message or "")
    assert fourth.status == "in_progress"


# --- flex ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_flex_is_answered_as_flex_and_standard_as_default() -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Product: Lamp"}
    ]
    async with stub_client(StubConfig()) as (stub, client, _control):
        flex = await client.chat.completions.create(
            model=MODEL, messages=messages, service_tier="flex"
        )
        standard = await client.chat.completions.create(model=MODEL, messages=messages)
    assert flex.service_tier == "flex"
    assert standard.service_tier == "default"
    assert flex.choices[0].message.content == standard.choices[0].message.content
    assert stub.state.stats()["flex_total"] == 1


@pytest.mark.anyio
async def test_flex_resource_unavailable_by_marker_and_by_seeded_rate() -> None:
    unavailable: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": f"Product: Lamp {FLEX_UNAVAILABLE_MARKER}"}
    ]
    fine: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Product: Lamp"}
    ]
    async with stub_client(StubConfig(rpm=10)) as (stub, client, _control):
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(
                model=MODEL, messages=unavailable, service_tier="flex"
            )
        # The marker only matters to flex: the same prompt on the default tier is answered.
        assert await client.chat.completions.create(model=MODEL, messages=unavailable)
        assert stub.state.stats()["requests_in_window"] == 1  # the refused one used no budget
    assert refused.value.status_code == 429
    assert (refused.value.code, refused.value.type) == (
        "resource_unavailable",
        "resource_unavailable",
    )
    assert "retry-after" not in refused.value.response.headers

    async def outcomes(seed: int) -> list[bool]:
        config = StubConfig(flex_unavailable_rate=0.3, seed=seed)
        answered = []
        async with stub_client(config) as (_, client, _control):
            for _ in range(20):
                try:
                    await client.chat.completions.create(
                        model=MODEL, messages=fine, service_tier="flex"
                    )
                    answered.append(True)
                except openai.RateLimitError as exc:
                    assert exc.code == "resource_unavailable"
                    answered.append(False)
        return answered

    first, again = await outcomes(3), await outcomes(3)
    assert first == again
    assert 0 < first.count(False) < 20


@pytest.mark.anyio
async def test_flex_counts_against_the_same_per_minute_limits() -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Product: Lamp"}
    ]
    async with stub_client(StubConfig(rpm=2)) as (_, client, _control):
        await client.chat.completions.create(model=MODEL, messages=messages, service_tier="flex")
        await client.chat.completions.create(model=MODEL, messages=messages)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(
                model=MODEL, messages=messages, service_tier="flex"
            )
    assert limited.value.code == "rate_limit_exceeded"


# --- the control endpoint, the key, the flags ------------------------------------------


@pytest.mark.anyio
async def test_advance_refuses_bad_input_and_the_api_key_guards_files_and_batches() -> None:
    async with stub_client(StubConfig(required_api_key="sk-right")) as (stub, client, control):
        bad_bodies: list[Any] = [{"seconds": -1}, {"seconds": "soon"}, {}, []]
        for bad in bad_bodies:
            response = await control.post("/stub/batches/advance", json=bad)
            assert response.status_code == 400, bad
        with pytest.raises(openai.AuthenticationError):
            await client.files.create(file=("in.jsonl", b"{}"), purpose="batch")
        with pytest.raises(openai.AuthenticationError):
            await client.batches.list()
        async with openai.AsyncOpenAI(
            base_url=stub.base_url, api_key="sk-right", max_retries=0
        ) as good:
            assert (await good.batches.list()).data == []


@pytest.mark.anyio
async def test_concurrent_creates_each_get_their_batch() -> None:
    async with stub_client(StubConfig(**SLOW)) as (_, client, control):
        ids: list[str] = []

        async def one(i: int) -> None:
            batch = await start_batch(client, jsonl(product_lines(3)), {"n": str(i)})
            ids.append(batch.id)

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, i)
        await advance(control, 6 * HOUR)
        listed = [b async for b in client.batches.list(limit=100)]
    assert len(set(ids)) == 10
    assert {b.status for b in listed} == {"completed"}
    assert sorted(b.metadata["n"] for b in listed if b.metadata) == sorted(
        str(i) for i in range(10)
    )


def test_the_batch_and_flex_flags() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--batch-validating-seconds", "0.5",
            "--batch-processing-seconds", "2",
            "--batch-completion-window-seconds", "60",
            "--batch-error-rate", "0.1",
            "--batch-enqueued-token-limit", "90000",
            "--flex-unavailable-rate", "0.3",
        ]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.batch_validating_seconds, config.batch_processing_seconds) == (0.5, 2.0)
    assert (config.batch_completion_window_seconds, config.batch_error_rate) == (60.0, 0.1)
    assert (config.batch_enqueued_token_limit, config.flex_unavailable_rate) == (90_000, 0.3)
    for bad in (["--flex-unavailable-rate", "1.5"], ["--batch-processing-seconds", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


@pytest.mark.anyio
async def test_flex_and_batch_fields_change_at_run_time_through_the_faults_endpoint() -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Product: Lamp"}
    ]
    async with stub_client(StubConfig(**SLOW)) as (_, client, control):
        changed = await control.post(
            "/stub/faults", json={"flex_unavailable_rate": 1, "batch_validating_seconds": 0}
        )
        assert changed.status_code == 200, changed.text
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(
                model=MODEL, messages=messages, service_tier="flex"
            )
        batch = await start_batch(client, jsonl(product_lines(2)))
        assert batch.status == "in_progress"  # validated at once
        refused = await control.post("/stub/faults", json={"flex_unavailable_rate": "often"})
        assert refused.status_code == 400


@pytest.mark.anyio
async def test_a_batch_that_takes_no_time_answers_completed_with_its_files() -> None:
    # Its JSON is made at the moment its files were written: never "completed" without them.
    config = StubConfig(
        batch_validating_seconds=0, batch_processing_seconds=0, batch_finalizing_seconds=0
    )
    async with stub_client(config) as (_, client, _control):
        batch = await start_batch(client, jsonl(product_lines(2)))
        listed = (await client.batches.list()).data
    assert batch.status == "completed"
    assert batch.output_file_id is not None
    assert [b.output_file_id for b in listed] == [batch.output_file_id]
