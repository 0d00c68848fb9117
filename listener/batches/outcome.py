"""A finished batch's output and error files turned into its items' outcomes, and written.

Lines are matched by `custom_id` (the item's id), never by their order. A line is checked
exactly as a real-time answer is (`ChatHandler.answer`), and a failed one is retried by the same
rule as a real-time attempt (`attempt.retry_outcome`: backoff, then FAILED at max attempts), in
a later batch: the item keeps its tier, so a batch job never draws on the real-time budget and
keeps its price. A request the batch never ran (expired, cancelled) gives its attempt back.

Outcomes are written in chunks, each one transaction of set-based statements through the
engine's own rules (`finish_items` fenced by `claimed_by = 'batch:<id>'`, then
`listener_end_finished_jobs`): a line for an item no longer held (cancelled, written by an
earlier pass cut off by a crash) changes nothing, so writing the same file again is harmless.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import pydantic
from openai.types.chat import ChatCompletion

from listener.attempt import handler_item, retry_outcome
from listener.batches.pace import rest
from listener.batches.store import Connection, claimed_by
from listener.db import database_call
from listener.errors import FailItem, RetryItem, one_line
from listener.handler import Kind
from listener.items import REFUSALS, ClaimedItem, Outcome, outcome_params, refused
from listener.openai.chat import ChatHandler
from listener.settings import Settings
from listener.sqlfiles import queries

logger = logging.getLogger("listener.batches")

# Outcomes a transaction writes: 50,000 lines are 50 transactions, not 50,000 round trips, each
# short, with a rest after it (pace.py).
CHUNK = 1_000
# Lines that never ran: the request is not at fault and its attempt is given back.
NOT_RUN = frozenset({"batch_expired", "batch_cancelled"})


@dataclass
class ReadLines:
    """An output or error file's lines, by custom_id, and what could not be read."""

    lines: dict[str, dict[str, Any]] = field(default_factory=dict)
    bad: int = 0  # not JSON, not an object, or without a custom_id
    duplicates: int = 0


def parse_lines(texts: Sequence[str]) -> list[dict[str, Any] | None]:
    """Each line's JSON object with a string custom_id; None for one that is not (truncated,
    corrupt, not an object)."""
    parsed: list[dict[str, Any] | None] = []
    for raw in texts:
        try:
            line = json.loads(raw)
        except ValueError:
            parsed.append(None)
            continue
        ok = isinstance(line, dict) and isinstance(line.get("custom_id"), str)
        parsed.append(line if ok else None)
    return parsed


def gather_lines(parsed: Iterable[dict[str, Any] | None], into: ReadLines) -> ReadLines:
    for line in parsed:
        if line is None:
            into.bad += 1
        elif line["custom_id"] in into.lines:
            into.duplicates += 1
        else:
            into.lines[line["custom_id"]] = line
    return into


def split_lines(text: str) -> list[str]:
    return [raw for raw in text.splitlines() if raw.strip()]


def read_lines(text: str, into: ReadLines | None = None) -> ReadLines:
    """Each line of a JSONL file; a truncated or corrupt line is counted and skipped (its item,
    left without an answer, is retried)."""
    return gather_lines(parse_lines(split_lines(text)), into or ReadLines())


@dataclass(frozen=True)
class LineOutcome:
    outcome: Outcome
    usage: dict[str, int] | None = None  # for a COMPLETED item: what its call cost
    model: str | None = None


def _message(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return one_line(str(error["message"]))
        if body.get("message"):
            return one_line(str(body["message"]))
    return "no message"


def _usage(completion: ChatCompletion) -> dict[str, int]:
    usage = completion.usage
    if usage is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    details = usage.prompt_tokens_details
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": (details.cached_tokens or 0) if details else 0,
        "total_tokens": usage.total_tokens,
    }


def line_outcome(
    item: ClaimedItem,
    line: Mapping[str, Any] | None,
    *,
    batch: str,
    kind: Kind,
    handler: ChatHandler,
    settings: Settings,
    rng: random.Random,
) -> LineOutcome:
    """What one line (None: the files hold none for the item) makes of its item."""
    max_attempts = kind.max_attempts or settings.max_attempts

    def retry(reason: str) -> LineOutcome:
        return LineOutcome(retry_outcome(item, RetryItem(reason), max_attempts, settings, rng))

    if line is None:
        return retry(f"OpenAI batch {batch} returned no line for it")
    response = line.get("response")
    if not isinstance(response, dict):
        error = line.get("error")
        code = str(error.get("code")) if isinstance(error, dict) else "unknown"
        if code in NOT_RUN:
            return LineOutcome(Outcome.release(item, error=f"{code} in OpenAI batch {batch}"))
        return retry(f"OpenAI batch {batch}: {code}: {_message({'error': error})}")
    status = response.get("status_code")
    body = response.get("body")
    if status != 200:
        if status in (400, 422):
            reason = f"request rejected in OpenAI batch {batch}: {_message(body)}"
            return LineOutcome(Outcome.failed(item, reason))
        return retry(f"OpenAI error {status} in batch {batch}: {_message(body)}")
    try:
        completion = ChatCompletion.model_validate(body)
    except pydantic.ValidationError as error:
        return retry(f"malformed response in OpenAI batch {batch}: {one_line(error)}")
    try:
        result = handler.answer(handler_item(item, kind, settings), completion)
    except FailItem as error:
        return LineOutcome(Outcome.failed(item, str(error)))
    except RetryItem as error:
        return LineOutcome(retry_outcome(item, error, max_attempts, settings, rng))
    return LineOutcome(Outcome.completed(item, result.value), _usage(completion), completion.model)


def log_unmatched(items: Sequence[ClaimedItem], read: ReadLines, batch: str) -> None:
    """Lines for ids the batch does not hold, and lines that could not be read: logged."""
    held = {str(item.id) for item in items}
    foreign = [custom_id for custom_id in read.lines if custom_id not in held]
    if foreign:
        logger.warning(
            "[Batch] %s: %d output line(s) name no item it still holds (cancelled, already "
            "written, or not ours), ignored; first: %r",
            batch,
            len(foreign),
            foreign[0][:80],
        )
    if read.bad or read.duplicates:
        logger.warning(
            "[Batch] %s: %d line(s) of its files could not be read (truncated or not JSON) and "
            "%d repeated a custom_id: their items are retried",
            batch,
            read.bad,
            read.duplicates,
        )


def _chunks(values: Sequence[LineOutcome], size: int) -> Iterable[Sequence[LineOutcome]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


@database_call("writing a batch's outcomes failed")
async def write_outcomes(
    conn: Connection,
    batch_id: int,
    decided: Sequence[LineOutcome],
    on_commit: Callable[[], None] = lambda: None,
) -> int:
    """Write the outcomes, CHUNK a transaction; the number of items written."""
    written = 0
    for chunk in _chunks(decided, CHUNK):
        began = time.monotonic()
        try:
            written += await _write_chunk(conn, batch_id, chunk)
        except REFUSALS as error:
            # One outcome PostgreSQL cannot store: each alone, the one at fault FAILED.
            logger.warning("[Batch] %d: an outcome was refused (%s)", batch_id, refused(error))
            for one in chunk:
                written += await _write_alone(conn, batch_id, one)
        on_commit()
        await rest(began)  # the claims on the same database go on between chunks
    return written


async def _write_alone(conn: Connection, batch_id: int, one: LineOutcome) -> int:
    try:
        return await _write_chunk(conn, batch_id, [one])
    except REFUSALS as error:
        outcome = one.outcome
        failed = Outcome(
            outcome.item_id,
            "FAILED",
            error=f"its result cannot be stored: {refused(error)}",
            instance_id=outcome.instance_id,
            attempt=outcome.attempt,
            job_id=outcome.job_id,
            kind=outcome.kind,
        )
        return await _write_chunk(conn, batch_id, [LineOutcome(failed)])


def _chunk_params(batch_id: int, chunk: Sequence[LineOutcome]) -> tuple[dict[str, Any], ...]:
    """The chunk's statements' parameters: every result encoded (thousands of them)."""
    outcomes = [one.outcome for one in chunk]
    used = [one for one in chunk if one.usage is not None]
    jobs = {"job_ids": sorted({o.job_id for o in outcomes})}
    usage = {
        "ids": [one.outcome.item_id for one in used],
        "usages": [json.dumps(one.usage) for one in used],
        "models": [one.model for one in used],
        "batch_id": batch_id,
    }
    return jobs, usage, outcome_params(claimed_by(batch_id), outcomes)


async def _write_chunk(conn: Connection, batch_id: int, chunk: Sequence[LineOutcome]) -> int:
    """One transaction, in the engine's lock order: the jobs (lock_jobs_of_outcomes), then the
    items' usage, their outcomes, and the jobs they end."""
    sql = queries("items")
    # Encoding thousands of results is CPU work: off the event loop, whose claims must not wait.
    jobs, usage, outcomes = await anyio.to_thread.run_sync(_chunk_params, batch_id, chunk)
    async with conn.transaction():
        await conn.execute(sql["lock_jobs_of_outcomes"], jobs)
        if usage["ids"]:
            await conn.execute(queries("batches")["record_usage"], usage)
        cursor = await conn.execute(sql["finish_items"], outcomes)
        rows = await cursor.fetchall()
        await conn.execute(sql["finish_jobs"], jobs)
    return sum(1 for _id, _job, status in rows if status is not None)
