"""The worker's heartbeat: its leases renewed and its row in `worker_heartbeats` (the fleet's
figures, the dashboard, `doctor`) written, every HEARTBEAT_SECONDS; the row removed at exit."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from listener import items as items_db
from listener.db import database_call
from listener.errors import DatabaseError
from listener.sqlfiles import queries
from listener.workerstats import WorkerStats

logger = logging.getLogger("listener.worker")

# A worker whose row is this many beats old is taken for gone (killed without a goodbye).
STALE_BEATS = 3


async def run_heartbeat(
    pool: AsyncConnectionPool,
    worker_id: str,
    *,
    interval: Callable[[], float],
    lease_seconds: float,
    held: Callable[[], list[int]],
    stats: Callable[[], WorkerStats],
    listener_connected: Callable[[], bool],
    on_others: Callable[[int], None] = lambda _others: None,
) -> None:
    """Renew the leases of the items `held`, then beat, and tell `on_others` how many other
    workers are alive; a failure is a warning, the next beat comes anyway (a lease outlives a
    few missed renewals)."""
    while True:
        try:
            await items_db.extend_leases(pool, worker_id, held(), lease_seconds)
            stale = STALE_BEATS * interval()
            on_others(await beat(pool, worker_id, listener_connected(), stats(), stale))
        except DatabaseError as error:
            logger.warning("[Worker] heartbeat failed: %s", error)
        await anyio.sleep(interval())


@database_call("heartbeat failed")
async def beat(
    pool: AsyncConnectionPool,
    worker_id: str,
    listener_connected: bool,
    stats: WorkerStats,
    stale_seconds: float,
) -> int:
    """Write this worker's row; return how many others beat within `stale_seconds`."""
    params = {
        "worker_id": worker_id,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "listener_connected": listener_connected,
        "stats": json.dumps(stats),
        "stale_seconds": stale_seconds,
    }
    async with pool.connection() as conn:
        cursor = await conn.execute(queries("heartbeat")["upsert_heartbeat"], params)
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def forget(pool: AsyncConnectionPool, worker_id: str) -> None:
    """The worker's row goes at a clean exit (a killed worker's is aged out by the reaper)."""
    try:
        async with pool.connection() as conn:
            await conn.execute(queries("heartbeat")["delete_heartbeat"], {"worker_id": worker_id})
    except psycopg.Error as error:
        logger.warning("[Worker] could not remove the heartbeat row: %s", error)
