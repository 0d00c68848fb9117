"""The reaper: items whose lease expired go back to PENDING (or end FAILED / CANCELLED), jobs
left open with every item finished are closed, dead workers' heartbeat rows age out, and stale
planner statistics are refreshed (`statistics.py`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from listener import items as items_db
from listener.errors import DatabaseError
from listener.sqlfiles import queries
from listener.statistics import StatisticsWatch

logger = logging.getLogger("listener.worker")


def reap_interval(lease_seconds: float) -> float:
    """Often enough that a dead worker's items are back within about one lease."""
    return max(1.0, min(10.0, lease_seconds / 2))


async def run_reaper(
    pool: AsyncConnectionPool,
    lease_seconds: float,
    max_attempts: int,
    on_reaped: Callable[[int], None],
) -> None:
    statistics = StatisticsWatch(pool)
    stranded_after = -1  # the stranded-jobs sweep's cursor: it starts at a random open job
    while True:
        # Statistics first, at start too: a worker started into a backlog that landed after
        # the table was analyzed empty would otherwise cache its plans before the first pass.
        try:
            await statistics.check()
        except DatabaseError as error:
            logger.warning("[Reaper] %s", error)
        await anyio.sleep(reap_interval(lease_seconds))
        try:
            reaped = await items_db.reap_expired(pool, max_attempts)
            sweep = await items_db.close_stranded_jobs(pool, stranded_after)
            stranded_after, stranded = sweep.after, sweep.closed
            async with pool.connection() as conn:
                await conn.execute(queries("heartbeat")["forget_dead_workers"])
        except (DatabaseError, psycopg.Error) as error:
            logger.warning("[Reaper] failed: %s", error)
            continue
        if stranded:
            logger.warning("[Reaper] closed %d job(s) whose items had all finished", stranded)
        if reaped:
            on_reaped(len(reaped))
            logger.warning(
                "[Reaper] returned %d item(s) whose lease expired (their worker died?)",
                len(reaped),
            )
