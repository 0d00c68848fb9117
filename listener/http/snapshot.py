"""The dashboard's shared snapshot: one set of queries per refresh period, however many pages.

Every open page polls; each poll reads the snapshot held in memory, and only when it is older
than the refresh period does one caller (behind a lock) read the database again while the others
wait for that reading. The census (every store's backlog) walks the whole backlog, so it runs on
a slower, adaptive period: at least the refresh period, and at least `CENSUS_DUTY` times its own
duration (0.5 to 3 s at 1 M pending rows on two cores, quiet to busy: every 15 to 60 s there;
at every refresh on a small queue).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from listener.errors import one_line
from listener.http.figures import Census, Features, Snapshot, assemble
from listener.http.fleet import DB_ERRORS, DB_TIMEOUT_SECONDS, LIVE_SECONDS
from listener.http.waiting import Policy
from listener.redact import redact
from listener.settings import Settings
from listener.sqlfiles import queries

logger = logging.getLogger(__name__)

REFRESH_SECONDS = 1.0
# The census may take at most 1/CENSUS_DUTY of the database's time for one core.
CENSUS_DUTY = 20.0
RECENT_JOBS = 20
IN_FLIGHT_LIMIT = 5000
# A census slower than this is cut short: the page shows the previous one.
CENSUS_TIMEOUT_SECONDS = 10.0


class SharedSnapshot:
    """The latest reading of everything the dashboard shows, refreshed at most once a period."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        settings: Settings,
        *,
        period: float = REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.period = period
        self.clock = clock
        self.lock = anyio.Lock()
        self.census_lock = anyio.Lock()
        self.current: Snapshot | None = None
        self.taken = float("-inf")
        self.census = Census()
        self.features = Features()
        # What the page's 50-tabs test and the benchmark count: readings of the database.
        self.refreshes = 0
        self.census_runs = 0
        # Bumped with each successful reading: what the pages' rendered fragments are keyed by.
        self.generation = 0

    async def get(self) -> Snapshot | None:
        """The snapshot, read again first when it is older than the period; None only before
        the first reading succeeded (the database unreachable since start)."""
        if self.clock() - self.taken < self.period:
            return self.current
        async with self.lock:
            # Another page may have refreshed it while this one waited for the lock.
            if self.clock() - self.taken < self.period:
                return self.current
            started = self.clock()
            try:
                self.current = await self._read(started)
                self.generation += 1
            except DB_ERRORS as error:
                reason = redact(f"database unreachable: {one_line(error)}")
                logger.warning("[Dashboard] %s", reason)
                if self.current is not None:
                    self.current.error = reason
            # A failed reading waits a period too: a down database is not hammered by pages.
            self.taken = self.clock()
            self.refreshes += 1
        if self.census_due(self.clock()) and not self.census_lock.locked():
            # Off the live lock: the other pages keep their 1 s figures while one request
            # counts the backlog; the next refresh shows its result.
            async with self.census_lock:
                try:
                    await self._census_alone()
                except DB_ERRORS as error:
                    logger.warning("[Dashboard] census failed: %s", redact(one_line(error)))
                    self.census.taken = self.clock()
        return self.current

    async def _census_alone(self) -> None:
        with anyio.fail_after(DB_TIMEOUT_SECONDS + CENSUS_TIMEOUT_SECONDS):
            async with self.pool.connection(timeout=DB_TIMEOUT_SECONDS) as conn:
                await self._read_census(conn)

    def census_due(self, now: float) -> bool:
        period = max(self.period, CENSUS_DUTY * self.census.duration)
        return now - self.census.taken >= period

    async def _read(self, started: float) -> Snapshot:
        sql = queries("dashboard")
        with anyio.fail_after(DB_TIMEOUT_SECONDS + CENSUS_TIMEOUT_SECONDS):
            async with self.pool.connection(timeout=DB_TIMEOUT_SECONDS) as conn:
                limiter = await (
                    await conn.execute(sql["limiter"], {"name": self.settings.rate_limiter_name})
                ).fetchone()
                cursor = await conn.execute(sql["live_workers"], {"stale_seconds": LIVE_SECONDS})
                worker_rows = await cursor.fetchall()
                cursor = await conn.execute(sql["in_flight"], {"limit": IN_FLIGHT_LIMIT})
                in_flight_rows = await cursor.fetchall()
                cursor = await conn.execute(sql["recent_jobs"], {"limit": RECENT_JOBS})
                job_rows = await cursor.fetchall()
                cursor = await conn.execute(sql["open_batches"])
                batch_rows = await cursor.fetchall()
                live_done = self.clock()
                # The first reading counts the backlog at once (and learns the database's
                # features, which the policies need); later ones leave it to `get`.
                if self.census.taken == float("-inf"):
                    await self._read_census(conn)
                policy_started = self.clock()
                policies = await self._policies(conn)
                live_seconds = live_done - started + self.clock() - policy_started
        return assemble(
            limiter,
            worker_rows,
            in_flight_rows,
            job_rows,
            policies,
            self.census,
            self.features,
            (self.settings.rate_limit_rpm, self.settings.rate_limit_tpm),
            live_seconds,
            max(0.0, self.clock() - self.census.taken),
            batch_rows,
        )

    async def _read_census(self, conn: psycopg.AsyncConnection[Any]) -> None:
        sql = queries("dashboard")
        started = self.clock()
        row = await (await conn.execute(sql["features"])).fetchone()
        self.features = Features(*(bool(v) for v in row)) if row else Features()
        latest: dict[str, tuple[int, float | None]] = {}
        async with conn.transaction():
            await conn.execute(sql["census_serial"])
            cursor = await conn.execute(sql["store_backlog"])
            rows = await cursor.fetchall()
            if self.features.cancel:  # the job lifecycle's started_at is there
                cursor = await conn.execute(
                    sql["latest_jobs"], {"stores": [str(r[0]) for r in rows]}
                )
                latest = {
                    str(r[0]): (int(r[1]), float(r[2]) if r[2] is not None else None)
                    for r in await cursor.fetchall()
                }
        done = self.clock()
        self.census = Census(rows, latest, done, done - started)
        self.census_runs += 1

    async def _policies(self, conn: psycopg.AsyncConnection[Any]) -> dict[str, Policy]:
        """The store policy's rows; none until the `stores` table exists."""
        if not self.features.stores:
            return {}
        cursor = await conn.execute(queries("dashboard")["store_policies"])
        return {
            str(r[0]): Policy(
                weight=int(r[1]) if r[1] is not None else 1,
                rpm_limit=r[2],
                max_in_flight=r[3],
                paused=bool(r[4]),
                rpm_next=r[5],
            )
            for r in await cursor.fetchall()
        }
