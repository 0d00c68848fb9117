"""Upload a collected batch's input file, then create the OpenAI batch, recording each step in
our row before and after its call.

- collected: the file is built from the items the batch holds (ChatHandler.request, the body
  the real-time path sends), uploaded, and the file id recorded (state uploaded). A crash between
  the upload and the record uploads it again (an unused file costs no tokens).
- uploaded -> submitting is committed before `batches.create`, whose metadata names our row. A
  row found in `submitting` after a crash may have its batch at OpenAI already: it is looked for
  (`batches.list`, by our id and input file) and adopted, never created twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import openai

from listener.attempt import handler_item
from listener.batches.context import Context
from listener.batches.outcome import LineOutcome, write_outcomes
from listener.batches.pace import paced
from listener.batches.store import BatchRow, batch_items, enqueued_tokens, execute
from listener.errors import FailItem, one_line
from listener.handler import Kind
from listener.items import ClaimedItem, Outcome
from listener.openai.chat import ChatHandler

logger = logging.getLogger("listener.batches")

ENDPOINT: Final = "/v1/chat/completions"
METADATA_KEY = "listener_batch_id"
# How far before our row's creation `batches.list` is read back when adopting (clock skew).
ADOPT_WINDOW = timedelta(hours=1)


@dataclass(frozen=True)
class InputFile:
    content: bytes
    requests: int
    tokens: int  # our estimate of its prompt tokens (4 characters a token)


def estimate_tokens(body: Mapping[str, Any]) -> int:
    text = "".join(str(m.get("content", "")) for m in body.get("messages", ()))
    return len(text) // 4 + 8


def _line(
    ctx: Context, handler: ChatHandler, kind: Kind, item: ClaimedItem
) -> tuple[bytes, int] | LineOutcome:
    """The item's input line and its prompt tokens, or its outcome when no request can be
    built for it (a template field it lacks: the item's fault)."""
    try:
        body = handler.request(handler_item(item, kind, ctx.settings))
    except FailItem as error:
        return LineOutcome(Outcome.failed(item, str(error)))
    line = json.dumps(
        {"custom_id": str(item.id), "method": "POST", "url": ENDPOINT, "body": body},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()
    return line, estimate_tokens(body)


async def build_input(ctx: Context, row: BatchRow, handler: ChatHandler) -> InputFile | None:
    """The JSONL input file of the items the batch holds. An item whose request cannot be built
    (a template field it lacks) fails now; those past the file's byte limit go back to PENDING
    with their attempt given back. None: no line is left."""
    kind = ctx.app[row.kind]
    items = await batch_items(ctx.conn, row.id, ctx.settings.max_payload_bytes)
    # Seconds of templating for 50,000 items: paced, off the event loop (pace.py).
    built = await paced(lambda part: [_line(ctx, handler, kind, item) for item in part], items)
    lines: list[bytes] = []
    left: list[LineOutcome] = []
    tokens = size = 0
    for item, made in zip(items, built, strict=True):
        if isinstance(made, LineOutcome):
            left.append(made)
        elif size + len(made[0]) + 1 > ctx.settings.batch_max_bytes:
            left.append(LineOutcome(Outcome.release(item, error="over the batch file's size")))
        else:
            lines.append(made[0])
            size += len(made[0]) + 1
            tokens += made[1]
    if left:
        await write_outcomes(ctx.conn, row.id, left, ctx.committed)
    if not lines:
        return None
    return InputFile(b"\n".join(lines) + b"\n", len(lines), tokens)


async def upload(ctx: Context, row: BatchRow, handler: ChatHandler) -> None:
    built = await build_input(ctx, row, handler)
    if built is None:
        await finish(ctx, row, "empty", "no item left to send")
        return
    uploaded = await ctx.client.files.create(
        file=(f"listener-batch-{row.id}.jsonl", built.content), purpose="batch"
    )
    ctx.checkpoint("api:files.create")
    params = {"batch_id": row.id, "file_id": uploaded.id, "requests": built.requests,
              "tokens": built.tokens}  # fmt: skip
    await execute(ctx.conn, "mark_uploaded", params)
    ctx.checkpoint("commit:uploaded")
    logger.info(
        "[Batch] %d: uploaded %d request(s) (%d bytes, ~%d prompt tokens) as %s",
        row.id,
        built.requests,
        len(built.content),
        built.tokens,
        uploaded.id,
    )


async def find_created(client: openai.AsyncOpenAI, row: BatchRow) -> Any | None:
    """Our batch at OpenAI, created just before a crash: its metadata names our row and its
    input file is ours. Newest first, read back to shortly before our row was created."""
    since = (row.created_at - ADOPT_WINDOW).timestamp()
    async for batch in client.batches.list(limit=100):
        metadata = batch.metadata or {}
        if metadata.get(METADATA_KEY) == str(row.id) and batch.input_file_id == row.input_file_id:
            return batch
        if batch.created_at < since:
            return None
    return None


async def submit(ctx: Context, row: BatchRow) -> bool:
    """Create (or adopt) the OpenAI batch of an uploaded row; False: it waits for room under
    BATCH_ENQUEUED_TOKEN_LIMIT."""
    created = None
    if row.state == "uploaded":
        limit = ctx.settings.batch_enqueued_token_limit
        enqueued = await enqueued_tokens(ctx.conn, row.model, row.id)
        # A batch larger than the limit alone is sent when nothing else is enqueued: OpenAI
        # may still take it (our estimate is rough), and refuses it otherwise (it then waits).
        if limit and enqueued and enqueued + row.estimated_tokens > limit:
            logger.info(
                "[Batch] %d waits: %d prompt token(s) enqueued + its ~%d > "
                "BATCH_ENQUEUED_TOKEN_LIMIT (%d)",
                row.id,
                enqueued,
                row.estimated_tokens,
                limit,
            )
            return False
        await execute(ctx.conn, "mark_submitting", {"batch_id": row.id})
        ctx.checkpoint("commit:submitting")
    else:  # submitting: perhaps created before a crash
        created = await find_created(ctx.client, row)
        ctx.checkpoint("api:batches.list")
        if created is not None:
            logger.warning("[Batch] %d: adopted %s, created before a restart", row.id, created.id)
    if created is None:
        try:
            created = await ctx.client.batches.create(
                input_file_id=row.input_file_id or "",
                endpoint=ENDPOINT,
                completion_window="24h",
                metadata={METADATA_KEY: str(row.id), "listener_kind": row.kind},
            )
        except openai.BadRequestError as error:
            # The file itself is refused: its items are retried like a failed validation (a
            # retry counts, so a file refused each time ends its items FAILED, never looping).
            await give_back(ctx, row, f"batches.create refused: {one_line(error)}", "refused")
            return True
        ctx.checkpoint("api:batches.create")
    params = {"batch_id": row.id, "openai_batch_id": created.id, "status": created.status}
    await execute(ctx.conn, "mark_submitted", params)
    ctx.checkpoint("commit:submitted")
    logger.info("[Batch] %d: submitted as %s (%s)", row.id, created.id, created.status)
    return True


async def give_back(
    ctx: Context, row: BatchRow, reason: str, outcome: str, *, refund: bool = False,
    delay: float = 0.0,
) -> None:  # fmt: skip
    """End a batch whose items did not run: each goes back to the queue (a later batch), its
    attempt given back (`refund`: not the item's fault) or counted by the real-time rule."""
    logger.warning("[Batch] %d: %s", row.id, reason)
    items = await batch_items(ctx.conn, row.id, 0)
    decided = [
        LineOutcome(
            Outcome.release(item, error=reason, delay=delay) if refund else ctx.retry(item, reason)
        )
        for item in items
    ]
    await write_outcomes(ctx.conn, row.id, decided, ctx.committed)
    await finish(ctx, row, outcome, reason)


async def finish(ctx: Context, row: BatchRow, outcome: str, last_error: str | None) -> None:
    params = {"batch_id": row.id, "outcome": outcome, "last_error": last_error}
    await execute(ctx.conn, "mark_finished", params)
    ctx.checkpoint("commit:finished")
