"""Poll the submitted batches; write a finished one's output and error files to its items.

- Still running: its status and counts are recorded (the dashboard's "why waiting"); when none of
  its items is still wanted (their jobs cancelled), the batch itself is cancelled at OpenAI.
- completed, expired, cancelled: both files are read and each line's outcome written
  (`outcome.py`); a request that never ran goes back to the queue with its attempt given back.
- failed: a refusal for the enqueued-token limit returns the items to wait BATCH_RETRY_SECONDS
  for a new batch (attempt given back); any other validation failure retries them by the
  real-time rule (counted: a file that always fails ends its items FAILED).
- unknown to OpenAI (our row says submitted, OpenAI has no such batch): lost, its items return.

The batch row is marked finished only after every item was written: a crash in between writes
the same files again, which changes nothing already written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import openai

from listener.batches.context import Context
from listener.batches.outcome import (
    LineOutcome,
    ReadLines,
    gather_lines,
    line_outcome,
    log_unmatched,
    parse_lines,
    split_lines,
    write_outcomes,
)
from listener.batches.pace import SLICE, paced
from listener.batches.store import BatchRow, batch_items, execute, still_wanted
from listener.batches.submit import finish, give_back
from listener.errors import one_line
from listener.items import ClaimedItem
from listener.openai.chat import ChatHandler

logger = logging.getLogger("listener.batches")

RUNNING = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
ENDED_WITH_FILES = frozenset({"completed", "expired", "cancelled"})
TOKEN_LIMIT = "token_limit_exceeded"


def _errors(batch: Any) -> list[tuple[str, str]]:
    errors = getattr(batch, "errors", None)
    data = getattr(errors, "data", None) or []
    return [(str(e.code or "unknown"), one_line(str(e.message or ""))) for e in data]


async def poll(ctx: Context, row: BatchRow, handler: ChatHandler) -> None:
    assert row.openai_batch_id is not None
    try:
        batch = await ctx.client.batches.retrieve(row.openai_batch_id)
    except openai.NotFoundError:
        ctx.checkpoint("api:batches.retrieve")
        reason = f"OpenAI has no batch {row.openai_batch_id} (lost): its items return"
        await give_back(ctx, row, reason, "lost", refund=True)
        return
    ctx.checkpoint("api:batches.retrieve")
    counts = batch.request_counts
    errors = _errors(batch)
    await execute(
        ctx.conn,
        "record_poll",
        {
            "batch_id": row.id,
            "status": batch.status,
            "completed": counts.completed if counts else 0,
            "failed": counts.failed if counts else 0,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "last_error": "; ".join(f"{code}: {message}" for code, message in errors[:3]) or None,
        },
    )
    ctx.checkpoint("commit:polled")
    if batch.status in RUNNING:
        if batch.status != "cancelling" and await still_wanted(ctx.conn, row.id) == 0:
            await ctx.client.batches.cancel(row.openai_batch_id)
            ctx.checkpoint("api:batches.cancel")
            logger.info(
                "[Batch] %d: none of its items is still wanted: cancelled %s",
                row.id,
                row.openai_batch_id,
            )
        return
    if batch.status == "failed":
        await _failed(ctx, row, errors)
        return
    if batch.status in ENDED_WITH_FILES:
        await _write_files(ctx, row, handler, batch)
        return
    logger.warning("[Batch] %d: unknown status %r, polled again later", row.id, batch.status)


async def _failed(ctx: Context, row: BatchRow, errors: list[tuple[str, str]]) -> None:
    described = "; ".join(f"{code}: {message}" for code, message in errors[:3]) or "no reason"
    if any(code == TOKEN_LIMIT for code, _message in errors):
        delay = ctx.settings.batch_retry_seconds
        reason = (
            f"OpenAI refused batch {row.openai_batch_id} for its enqueued-token limit: "
            f"back in the queue for a new batch in {delay:g} s"
        )
        await give_back(ctx, row, reason, "refused", refund=True, delay=delay)
        return
    reason = f"OpenAI batch {row.openai_batch_id} failed validation: {described}"
    await give_back(ctx, row, reason, "failed")


async def _download(ctx: Context, file_id: str | None, into: ReadLines, what: str) -> None:
    if not file_id:
        return
    try:
        content = await ctx.client.files.content(file_id)
    except openai.NotFoundError:
        ctx.checkpoint("api:files.content")
        logger.warning("[Batch] its %s file %s is gone: its items are retried", what, file_id)
        return
    ctx.checkpoint("api:files.content")
    await read_file(content.content.decode("utf-8", "replace"), into)


async def read_file(text: str, into: ReadLines) -> None:
    """A file's lines parsed, paced (pace.py), into `into`."""
    gather_lines(await paced(parse_lines, split_lines(text), SLICE * 4), into)


async def decide_all(
    items: Sequence[ClaimedItem],
    read: ReadLines,
    decide: Callable[[ClaimedItem, Mapping[str, Any] | None], LineOutcome],
    batch: str,
) -> list[LineOutcome]:
    """Each held item's outcome from its line: tens of thousands of answers checked, paced."""
    log_unmatched(items, read, batch)
    return await paced(
        lambda part: [decide(item, read.lines.get(str(item.id))) for item in part], items
    )


async def _write_files(ctx: Context, row: BatchRow, handler: ChatHandler, batch: Any) -> None:
    read = ReadLines()
    await _download(ctx, batch.output_file_id, read, "output")
    await _download(ctx, batch.error_file_id, read, "error")
    items = await batch_items(ctx.conn, row.id, ctx.settings.max_payload_bytes)
    kind = ctx.app[row.kind]
    name = str(batch.id)

    def decide(item: Any, line: Any) -> Any:
        return line_outcome(
            item, line, batch=name, kind=kind, handler=handler, settings=ctx.settings,
            rng=ctx.rng,
        )  # fmt: skip

    decided = await decide_all(items, read, decide, f"{row.id} ({name})")
    written = await write_outcomes(ctx.conn, row.id, decided, ctx.committed)
    done = sum(1 for one in decided if one.outcome.status == "COMPLETED")
    await finish(ctx, row, str(batch.status), None)
    logger.info(
        "[Batch] %d (%s) %s: %d item(s) written (%d completed) from %d line(s)",
        row.id,
        name,
        batch.status,
        written,
        done,
        len(read.lines),
    )
