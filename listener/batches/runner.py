"""The batch path's loop, run by each worker beside its claims (an App service): every
BATCH_POLL_SECONDS, poll the submitted batches, collect due batch-tier items into new ones,
upload and submit them. Each step runs under its own advisory lock, in one process of the fleet
at a time (a process that misses a lock skips that step); each is safe to cut off anywhere and
run again (see the modules of each step).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import anyio
import openai
from psycopg_pool import AsyncConnectionPool

from listener.batches.collect import collect_kind
from listener.batches.context import Checkpoint, Context, no_checkpoint
from listener.batches.poll import poll
from listener.batches.store import (
    COLLECT_LOCK,
    POLL_LOCK,
    SUBMIT_LOCK,
    Connection,
    open_batches,
    step_lock,
)
from listener.batches.submit import submit, upload
from listener.errors import DatabaseError, one_line
from listener.handler import App
from listener.openai.chat import ChatHandler
from listener.settings import Settings

logger = logging.getLogger("listener.batches")

# New batches one kind may start in one pass: a 500,000-item backlog becomes 10 files a pass.
MAX_NEW_BATCHES_PER_PASS = 10


@dataclass
class BatchRunner:
    settings: Settings
    client: openai.AsyncOpenAI
    handlers: Mapping[str, ChatHandler]  # the batchable kinds' handlers, by kind
    checkpoint: Checkpoint = no_checkpoint
    rng: random.Random = field(default_factory=random.Random)

    async def __call__(self, pool: AsyncConnectionPool, app: App) -> None:
        """The worker's service: a pass every BATCH_POLL_SECONDS until cancelled."""
        if not self._served(app):
            return
        while True:
            await self.run_pass(pool, app)
            await anyio.sleep(self.settings.batch_poll_seconds)

    def _served(self, app: App) -> dict[str, ChatHandler]:
        return {
            name: handler
            for name, handler in self.handlers.items()
            if name in app and app[name].batch
        }

    async def run_pass(self, pool: AsyncConnectionPool, app: App) -> None:
        """One pass of every step; a step that fails (the database, OpenAI) is logged and tried
        again at the next pass."""
        for key, step in (
            (POLL_LOCK, self._poll),
            (COLLECT_LOCK, self._collect),
            (SUBMIT_LOCK, self._submit),
        ):
            try:
                async with step_lock(pool, key) as conn:
                    if conn is not None:
                        await step(self._context(conn, app), self._served(app))
            except (DatabaseError, openai.APIError) as error:
                logger.warning("[Batch] %s failed, tried again later: %s", step.__name__[1:],
                               one_line(error))  # fmt: skip

    def _context(self, conn: Connection, app: App) -> Context:
        return Context(conn, self.client, self.settings, app, self.checkpoint, self.rng)

    async def _poll(self, ctx: Context, handlers: Mapping[str, ChatHandler]) -> None:
        for row in await open_batches(ctx.conn, ["submitted"]):
            if row.kind in handlers:
                await poll(ctx, row, handlers[row.kind])

    async def _collect(self, ctx: Context, handlers: Mapping[str, ChatHandler]) -> None:
        for kind, handler in handlers.items():
            for _ in range(MAX_NEW_BATCHES_PER_PASS):
                taken = await collect_kind(
                    ctx.conn,
                    kind,
                    handler.model,
                    self.settings.batch_max_requests,
                    self.settings.batch_max_per_store,
                )
                if taken is None:
                    break
                ctx.checkpoint("commit:collected")

    async def _submit(self, ctx: Context, handlers: Mapping[str, ChatHandler]) -> None:
        rows = await open_batches(ctx.conn, ["collected", "uploaded", "submitting"])
        for row in rows:
            if row.kind not in handlers:
                continue
            if row.state == "collected":
                await upload(ctx, row, handlers[row.kind])
        for row in await open_batches(ctx.conn, ["uploaded", "submitting"]):
            if row.kind in handlers and not await submit(ctx, row):
                break  # the enqueued-token limit: the next ones wait as well
