"""A worker with everything it needs: its pool, the shared limiter, the OpenAI handler.

One place builds and closes them, in order, for the `worker` command, the demo, the tests and
the benchmarks alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from listener.attempt import ItemHandler
from listener.db import open_pool
from listener.generate import Generator
from listener.limiter import make_limiter
from listener.settings import Settings
from listener.worker import Worker


@asynccontextmanager
async def open_worker(
    settings: Settings,
    conninfo: str,
    handler: ItemHandler | None = None,
    *,
    name: str = "listener-worker",
) -> AsyncIterator[Worker]:
    """A ready-to-run worker; its pool and handler are closed when the block ends."""
    pool = await open_pool(conninfo, settings, name=name)
    handler = handler or Generator(settings)
    try:
        yield Worker(settings, conninfo, pool, make_limiter(pool, settings), handler)
    finally:
        # In this event loop: the HTTP client's connections must not outlive it.
        await handler.aclose()
        await pool.close()


@asynccontextmanager
async def running_worker(
    settings: Settings,
    conninfo: str,
    handler: ItemHandler | None = None,
    *,
    name: str = "listener-worker",
    grace: float = 0.0,
) -> AsyncIterator[Worker]:
    """A worker running in this process: ready (LISTEN done, ring built) when the block starts,
    stopped when it ends (in-flight items get `grace` seconds, then go back to PENDING)."""
    async with (
        open_worker(settings, conninfo, handler, name=name) as worker,
        anyio.create_task_group() as tg,
    ):
        await tg.start(worker.run)
        try:
            yield worker
        finally:
            worker.stop(grace=grace)
