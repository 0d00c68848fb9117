"""The worker's heartbeat: its leases renewed and its row in `worker_heartbeats` (the fleet's
figures, the dashboard, `doctor`) written, every HEARTBEAT_SECONDS; the row removed at exit."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from listener import items as items_db
from listener.db import wrap
from listener.errors import DatabaseError
from listener.sqlfiles import queries

logger = logging.getLogger("listener.worker")


async def run_heartbeat(
    pool: AsyncConnectionPool,
    worker_id: str,
    *,
    interval: Callable[[], float],
    lease_seconds: float,
    held: Callable[[], list[int]],
    stats: Callable[[], dict[str, Any]],
    listener_connected: Callable[[], bool],
) -> None:
    """Renew the leases of the items `held`, then beat; a failure is a warning, the next
    beat comes anyway (a lease outlives a few missed renewals)."""
    while True:
        try:
            await items_db.extend_leases(pool, worker_id, held(), lease_seconds)
            await beat(pool, worker_id, listener_connected(), stats())
        except DatabaseError as error:
            logger.warning("[Worker] heartbeat failed: %s", error)
        await anyio.sleep(interval())


async def beat(
    pool: AsyncConnectionPool, worker_id: str, listener_connected: bool, stats: dict[str, Any]
) -> None:
    params = {
        "worker_id": worker_id,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "listener_connected": listener_connected,
        "stats": json.dumps(stats),
    }
    try:
        async with pool.connection() as conn:
            await conn.execute(queries("heartbeat")["upsert_heartbeat"], params)
    except psycopg.Error as error:
        raise wrap(error, "heartbeat failed") from error


async def forget(pool: AsyncConnectionPool, worker_id: str) -> None:
    """The worker's row goes at a clean exit (a killed worker's is aged out by the reaper)."""
    try:
        async with pool.connection() as conn:
            await conn.execute(queries("heartbeat")["delete_heartbeat"], {"worker_id": worker_id})
    except psycopg.Error as error:
        logger.warning("[Worker] could not remove the heartbeat row: %s", error)
