"""The whole fleet's figures, read from PostgreSQL: the heartbeat rows every worker writes every
few seconds, the open items and the shared limiter's row. Any process can read them (a worker
serving HTTP, `listener api`), so they never depend on which process answers.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, LiteralString

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from listener.settings import Settings
from listener.sqlfiles import queries

# Workers beat every <= 5 s: three missed beats and a worker no longer counts as live.
LIVE_SECONDS = 15.0
# A health check must answer quickly even when the database hangs or the pool is exhausted.
DB_TIMEOUT_SECONDS = 2.0
# PoolTimeout and PoolClosed are psycopg.OperationalError; TimeoutError is anyio.fail_after's.
DB_ERRORS = (psycopg.Error, TimeoutError)
# Open items are counted exactly up to this many per figure (a few milliseconds of index reads);
# beyond it the figure is the planner's estimate, so a reading costs the same at any backlog.
EXACT_COUNT_CAP = 10_000
# Every HTTP request of a process reads one snapshot of the fleet, refreshed at most this often:
# any number of scrapers cost the database one reading per process per period.
SNAPSHOT_SECONDS = 1.0


@dataclass
class LiveWorker:
    worker_id: str
    listener_connected: bool
    stats: dict[str, Any]

    def number(self, key: str) -> int:
        # A worker of another version may lack a key: count it as zero rather than fail.
        value = self.stats.get(key)
        return int(value) if isinstance(value, int | float) else 0


@dataclass
class Fleet:
    """One consistent-enough reading of the fleet (each figure is at most a heartbeat old)."""

    pending: int
    ready: int
    processing: int
    workers: list[LiveWorker]
    rate_limited_total: int
    paused_until: datetime | None
    rpm: int
    tpm: int
    # True when pending/ready/processing reached EXACT_COUNT_CAP and are the planner's estimate.
    estimated: bool = False

    def total(self, key: str) -> int:
        return sum(worker.number(key) for worker in self.workers)

    def in_flight_by_store(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for worker in self.workers:
            by_store = worker.stats.get("inFlightByStore")
            if isinstance(by_store, dict):
                counts.update({str(k): int(v) for k, v in by_store.items()})
        return counts


def usage(used: int, limit: int) -> float:
    """The share of a budget used; 0 when there is no budget (limit 0)."""
    return used / limit if limit else 0.0


def _limit(workers: list[LiveWorker], key: str, configured: int) -> int:
    # The workers' own budget, when they report one, beats this process's setting: `listener
    # api` may run without RATE_LIMIT_RPM/TPM set and would otherwise show the default's usage.
    reported = [w.stats[key] for w in workers if isinstance(w.stats.get(key), int)]
    return max(reported) if reported else configured


async def fetch_fleet(
    pool: AsyncConnectionPool, settings: Settings, cap: int = EXACT_COUNT_CAP
) -> Fleet:
    """Read the fleet's figures; raises one of DB_ERRORS when the database does not answer."""
    sql = queries("fleet")
    with anyio.fail_after(DB_TIMEOUT_SECONDS):
        async with pool.connection(timeout=DB_TIMEOUT_SECONDS) as conn:
            counts = await (await conn.execute(sql["item_counts"], {"cap": cap})).fetchone()
            pending, ready, processing = counts if counts else (0, 0, 0)
            estimated = False
            if pending >= cap:
                pending = await _estimate(conn, sql["pending_estimate"], cap)
                ready = min(pending, await _estimate(conn, sql["ready_estimate"], 0))
                estimated = True
            if processing >= cap:
                processing, estimated = await _estimate(conn, sql["processing_estimate"], cap), True
            cursor = await conn.execute(sql["live_workers"], {"stale_seconds": LIVE_SECONDS})
            rows = await cursor.fetchall()
            cursor = await conn.execute(sql["limiter_totals"], {"name": settings.rate_limiter_name})
            limiter = await cursor.fetchone()
    workers = [
        LiveWorker(str(row[0]), bool(row[5]), row[6] if isinstance(row[6], dict) else {})
        for row in rows
    ]
    return Fleet(
        pending=int(pending),
        ready=int(ready),
        processing=int(processing),
        workers=workers,
        rate_limited_total=int(limiter[0]) if limiter else 0,
        paused_until=limiter[1] if limiter else None,
        rpm=_limit(workers, "rpm", settings.rate_limit_rpm),
        tpm=_limit(workers, "tpm", settings.rate_limit_tpm),
        estimated=estimated,
    )


async def _estimate(conn: psycopg.AsyncConnection[Any], explain: LiteralString, cap: int) -> int:
    """The planner's row count for an EXPLAIN; never below the cap the exact count reached."""
    row = await (await conn.execute(explain)).fetchone()
    plan = row[0] if row else [{}]
    rows = float(plan[0].get("Plan", {}).get("Plan Rows", 0))
    return max(cap, math.ceil(rows))


class FleetSnapshot:
    """One reading of the fleet shared by every request of a process, at most SNAPSHOT_SECONDS
    old. Concurrent requests for a stale snapshot wait for one refresh instead of each reading
    the database; a failed refresh is not kept, so the next request tries again."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        settings: Settings,
        max_age: float = SNAPSHOT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.max_age = max_age
        self.clock = clock
        self.readings = 0
        self._fleet: Fleet | None = None
        self._read_at = -math.inf
        self._lock = anyio.Lock()

    async def get(self) -> Fleet:
        async with self._lock:
            if self._fleet is None or self.clock() - self._read_at >= self.max_age:
                self._fleet = None
                self._fleet = await fetch_fleet(self.pool, self.settings)
                self._read_at = self.clock()
                self.readings += 1
            return self._fleet


async def count_live_workers(pool: AsyncConnectionPool) -> int:
    """The cheap reading for /health; raises one of DB_ERRORS like `fetch_fleet`."""
    with anyio.fail_after(DB_TIMEOUT_SECONDS):
        async with pool.connection(timeout=DB_TIMEOUT_SECONDS) as conn:
            cursor = await conn.execute(
                queries("fleet")["count_live_workers"], {"stale_seconds": LIVE_SECONDS}
            )
            row = await cursor.fetchone()
    return int(row[0]) if row else 0
