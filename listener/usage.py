"""What each store's completions used: the token counts behind its cost (`sql/usage.sql`).

Every item completed with a served tier adds its tokens to a per-store ledger in the statement
that completes it (the trigger `job_items_record_usage`); the compactor here folds the ledger
into one row per store, day (UTC), model and tier, every minute, one process of the fleet at a
time. Reports read those two small tables, never `job_items`: their cost grows with stores x
days, not with the items, and the month's figures outlive retention deleting the jobs. Money is
not stored: a report prices the tokens when it reads them (`listener.costs`), so a corrected
price table reprices the past too.

This module is part of the engine: token counts only, nothing of any API's prices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
from psycopg.rows import class_row

from listener.db import database_call, wrap
from listener.errors import DatabaseError
from listener.retention import Connect
from listener.sqlfiles import queries

logger = logging.getLogger(__name__)

# Any fixed 64-bit number, distinct from the migrations', retention's, statistics' and the
# stranded-jobs sweep's locks.
COMPACT_LOCK_KEY = 7_310_420_115_006
COMPACT_ROWS = 10_000
COMPACT_INTERVAL = 60.0
# Daily rows kept: this month's and the previous year's, for a report that may want them later.
KEEP_DAYS = 400


@dataclass(frozen=True)
class UsageRow:
    """A store's tokens on one model and tier, this month (UTC): today's or the days before."""

    store: str
    model: str
    served_tier: str
    today: bool
    items: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Compacted:
    locked: bool  # False: another process was compacting
    moved: int  # ledger rows folded
    folded: int  # daily rows written


@database_call("folding the usage ledger failed")
async def compact(conn: psycopg.AsyncConnection[Any], rows: int = COMPACT_ROWS) -> Compacted:
    """Fold up to `rows` ledger rows into the daily rows, and drop daily rows past KEEP_DAYS."""
    sql = queries("usage")
    async with conn.transaction():
        cursor = await conn.execute(sql["compact_usage"], {"key": COMPACT_LOCK_KEY, "rows": rows})
        row = await cursor.fetchone()
        assert row is not None  # an aggregate-only SELECT always returns its row
        done = Compacted(bool(row[0]), int(row[1]), int(row[2]))
        if done.locked:
            await conn.execute(sql["prune_usage"], {"keep_days": KEEP_DAYS})
            await conn.execute(sql["prune_monthly_usage"], {"keep_days": KEEP_DAYS})
    return done


async def compact_all(connect: Connect, rows: int = COMPACT_ROWS) -> int:
    """Passes until the ledger is folded (or another process holds the lock); rows moved."""
    moved = 0
    while True:
        async with connect() as conn:
            done = await compact(conn, rows)
        moved += done.moved
        if not done.locked or done.moved < rows:
            return moved


async def run_compactor(connect: Connect, interval: float, first_delay: float) -> None:
    """The worker's service: fold the usage ledger every `interval` seconds."""
    await anyio.sleep(first_delay)
    while True:
        try:
            moved = await compact_all(connect)
        except DatabaseError as error:
            logger.warning("[Usage] folding the ledger failed, trying again later: %s", error)
        else:
            logger.debug("usage ledger: %d row(s) folded", moved)
        await anyio.sleep(interval)


@database_call("reading a store's usage failed")
async def store_usage(conn: psycopg.AsyncConnection[Any], store: str) -> list[UsageRow]:
    async with conn.cursor(row_factory=class_row(UsageRow)) as cursor:
        await cursor.execute(queries("usage")["store_usage"], {"store": store})
        return await cursor.fetchall()


@database_call("reading the stores' usage failed")
async def fleet_usage(conn: psycopg.AsyncConnection[Any]) -> list[UsageRow]:
    async with conn.cursor(row_factory=class_row(UsageRow)) as cursor:
        await cursor.execute(queries("usage")["fleet_usage"])
        return await cursor.fetchall()


def read_usage(conninfo: str, store: str | None) -> list[UsageRow]:
    """For the command line: one store's usage this month, or every store's (None)."""
    sql = queries("usage")
    try:
        with psycopg.connect(conninfo) as conn, conn.cursor(row_factory=class_row(UsageRow)) as cur:
            if store is None:
                cur.execute(sql["fleet_usage"])
            else:
                cur.execute(sql["store_usage"], {"store": store})
            return cur.fetchall()
    except psycopg.Error as error:
        raise wrap(error, "reading the stores' usage failed") from error
