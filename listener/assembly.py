"""A worker with everything it needs: its pool, the budgets' limiters, the kinds it serves.

One place builds and closes them, in order, for the `worker` command, the demo, the tests and
the benchmarks alike. Without an app of its own a worker serves the OpenAI kinds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from listener.db import open_pool
from listener.handler import App
from listener.lanes import make_limiters
from listener.settings import Settings
from listener.worker import Worker


def served_app(settings: Settings, app: App | None = None, *, openai: bool = True) -> App:
    """The kinds a worker serves: the OpenAI ones (unless `openai` is False), then `app`'s,
    limited to WORKER_KINDS when it is set."""
    served = App()
    if openai:
        from listener.openai import openai_app

        served = openai_app(settings)
    if app is not None:
        served = served.merged(app) if len(served) else app
    if settings.worker_kinds:
        served = served.only(
            name.strip() for name in settings.worker_kinds.split(",") if name.strip()
        )
    served.check_budgets()
    return served


@asynccontextmanager
async def open_worker(
    settings: Settings,
    conninfo: str,
    app: App | None = None,
    *,
    name: str = "listener-worker",
) -> AsyncIterator[Worker]:
    """A ready-to-run worker; its pool and its kinds' clients are closed when the block ends."""
    app = app if app is not None else served_app(settings)
    pool = await open_pool(conninfo, settings, name=name)
    try:
        yield Worker(settings, conninfo, pool, make_limiters(pool, settings, app), app)
    finally:
        # In this event loop: the HTTP clients' connections must not outlive it.
        await app.aclose()
        await pool.close()


@asynccontextmanager
async def running_worker(
    settings: Settings,
    conninfo: str,
    app: App | None = None,
    *,
    name: str = "listener-worker",
    grace: float = 0.0,
) -> AsyncIterator[Worker]:
    """A worker running in this process: ready (LISTEN done, ring built) when the block starts,
    stopped when it ends (in-flight items get `grace` seconds, then go back to PENDING)."""
    async with (
        open_worker(settings, conninfo, app, name=name) as worker,
        anyio.create_task_group() as tg,
    ):
        await tg.start(worker.run)
        try:
            yield worker
        finally:
            worker.stop(grace=grace)
