"""Retention: delete finished jobs (and their items) older than a cutoff, in small batches.

The worker fleet runs it every few minutes when `RETENTION_DAYS` is above 0; `listener prune`
runs it by hand. A batch is one short transaction holding a transaction-level advisory lock, so
one process of the fleet prunes at a time, and between batches the connection goes back to the
pool. Deleting finished rows takes no lock a claim waits for (claims lock PENDING rows only).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
import psycopg

from listener.db import database_call
from listener.errors import DatabaseError
from listener.sqlfiles import queries

logger = logging.getLogger(__name__)

# Any fixed 64-bit number, distinct from the migrations' lock.
ADVISORY_LOCK_KEY = 7_310_420_115_002
ITEMS_PER_BATCH = 1000
JOBS_PER_BATCH = 100
# Between batches: other statements get the disk and the WAL writer in between.
PAUSE_BETWEEN_BATCHES = 0.02

Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]

_AGE = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """`7d`, `12h`, `30m`, `90s`, `2w`; ValueError otherwise."""
    match = _AGE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not an age such as 7d, 12h, 30m, 90s or 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


@dataclass
class Pruned:
    jobs: int = 0
    items: int = 0
    batches: int = 0
    busy: bool = False  # another process held the lock: it is pruning


def _params(older_than: timedelta, items: int, jobs: int) -> dict[str, Any]:
    return {
        "older_than": older_than.total_seconds(),
        "items": items,
        "jobs": jobs,
        "key": ADVISORY_LOCK_KEY,
    }


@database_call("pruning finished jobs failed")
async def prune_batch(
    conn: psycopg.AsyncConnection[Any],
    older_than: timedelta,
    items: int = ITEMS_PER_BATCH,
    jobs: int = JOBS_PER_BATCH,
) -> tuple[int, int] | None:
    """Delete one batch; (jobs, items) deleted, or None when another process holds the lock."""
    sql = queries("retention")
    params = _params(older_than, items, jobs)
    async with conn.transaction():
        cursor = await conn.execute(sql["prune_lock"], params)
        row = await cursor.fetchone()
        if not (row and row[0]):
            return None
        items_deleted = (await conn.execute(sql["prune_items"], params)).rowcount
        jobs_deleted = (await conn.execute(sql["prune_jobs"], params)).rowcount
    return jobs_deleted, items_deleted


async def prune(
    connect: Connect,
    older_than: timedelta,
    *,
    items: int = ITEMS_PER_BATCH,
    pause: float = PAUSE_BETWEEN_BATCHES,
) -> Pruned:
    """Batches until nothing is left to delete (or another process is pruning)."""
    total = Pruned()
    while True:
        async with connect() as conn:
            done = await prune_batch(conn, older_than, items)
        if done is None:
            total.busy = True
            return total
        jobs, deleted = done
        total.jobs += jobs
        total.items += deleted
        total.batches += 1
        if not jobs and not deleted:
            return total
        await anyio.sleep(pause)


@database_call("counting finished jobs failed")
async def preview(conn: psycopg.AsyncConnection[Any], older_than: timedelta) -> tuple[int, int]:
    """(jobs, items) a prune would delete now."""
    cursor = await conn.execute(queries("retention")["prune_preview"], _params(older_than, 0, 0))
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def run_retention(connect: Connect, days: int, interval: float, first_delay: float) -> None:
    """The worker's service: prune jobs finished over `days` days ago, every `interval` s."""
    older_than = timedelta(days=days)
    await anyio.sleep(first_delay)
    while True:
        try:
            pruned = await prune(connect, older_than)
        except DatabaseError as error:
            logger.warning("[Retention] failed, trying again later: %s", error)
        else:
            if pruned.items or pruned.jobs:
                logger.info(
                    "[Retention] deleted %d job(s) and %d item(s) finished over %d day(s) ago",
                    pruned.jobs,
                    pruned.items,
                    days,
                )
        await anyio.sleep(interval)
