"""The stub's Files and Batches API and its flex tier, through the real openai client over
real HTTP.

Batch time is the stub's batch clock: tests that need a status at a chosen moment configure
long durations and move the clock with POST /stub/batches/advance, so a loaded machine cannot
make a batch skip a status; one test runs a batch on the wall clock with short durations.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import openai
import pytest
from openai.types import Batch

from listener.stub.server import RunningStub, StubConfig, run_stub

MODEL = "gpt-4o-mini"
ENDPOINT = "/v1/chat/completions"
HOUR = 3600.0
# Each status lasts an hour, so only /stub/batches/advance moves a batch on.
SLOW = {
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
