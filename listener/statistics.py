"""A watch on the planner's statistics of `job_items` and `jobs`: ANALYZE a table at once when
they say it is far smaller than it is.

Every repeated statement of a worker runs prepared, with a generic plan made once per session
from the statistics of that moment (`db.with_session_options`). When the table drains and is
analyzed empty (a quiet night, retention, a new deployment), a plan made then reads the table
by sequential scan, and goes on doing so when a burst of items lands: a claim for 100 stores
over 100,000 items took 1.2 s instead of 2 ms. Custom plans would not save it: an analyzed
table's row estimate scales its density at ANALYZE time, zero. Autovacuum's next ANALYZE cures
it, up to `autovacuum_naptime` (a minute) after the burst and longer on a busy cluster; this
watch runs with the reaper, every few seconds, and its ANALYZE invalidates every session's
cached plans, the API's and the dashboard's included.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from listener.db import wrap
from listener.sqlfiles import queries

logger = logging.getLogger("listener.worker")

# Stale: the table holds more than STALE_RATIO times the rows its statistics counted, and at
# least STALE_MIN_ROWS (below that a sequential scan costs about what an index probe does).
STALE_RATIO = 10
STALE_MIN_ROWS = 1_000
# Any fixed 64-bit number, distinct from the migrations' and retention's locks.
ADVISORY_LOCK_KEY = 7_310_420_115_003


def statistics_stale(estimated_rows: float, live_rows: int) -> bool:
    """Whether the planner's estimate (-1: never analyzed) is far below the live rows."""
    return live_rows >= STALE_MIN_ROWS and live_rows > STALE_RATIO * max(estimated_rows, 0.0)


@dataclass(frozen=True)
class Analyzed:
    table: str
    estimated_rows: int
    live_rows: int
    seconds: float


class StatisticsWatch:
    """Checks both tables; warns once per table when this role may not ANALYZE it."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool
        self._warned: set[str] = set()

    async def check(self) -> list[Analyzed]:
        """ANALYZE each stale table this process may and can lock; what it analyzed."""
        blocks = queries("statistics")
        analyzed: list[Analyzed] = []
        try:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(blocks["table_statistics"])
                for table, estimated, live, may_analyze in await cursor.fetchall():
                    if not statistics_stale(estimated, live):
                        continue
                    if not may_analyze:
                        self._warn_once(table, estimated, live)
                        continue
                    started = time.monotonic()
                    async with conn.transaction():
                        cursor = await conn.execute(
                            blocks["analyze_lock"], {"key": ADVISORY_LOCK_KEY, "table": table}
                        )
                        locked, estimate_now = await cursor.fetchone() or (False, 0.0)
                        if not (locked and statistics_stale(estimate_now, live)):
                            continue
                        # Never waits: waiting would cancel an autovacuum (it yields to any lock
                        # request) or end in a lock timeout; the next pass tries again.
                        await conn.execute(
                            sql.SQL("ANALYZE (SKIP_LOCKED) {}").format(sql.Identifier(table))
                        )
                        cursor = await conn.execute(blocks["estimated_rows"], {"table": table})
                        row = await cursor.fetchone()
                        if row is None or statistics_stale(row[0], live):
                            logger.debug("skipped analyzing %s: another session holds it", table)
                            continue
                    analyzed.append(
                        Analyzed(table, round(estimated), live, time.monotonic() - started)
                    )
        except psycopg.Error as error:
            raise wrap(error, "the statistics watch failed") from error
        for done in analyzed:
            logger.info(
                "[DB] %s statistics were stale (estimated %d rows, %d live): analyzed in %.0f ms",
                done.table,
                done.estimated_rows,
                done.live_rows,
                done.seconds * 1000,
            )
        return analyzed

    def _warn_once(self, table: str, estimated: float, live: int) -> None:
        if table in self._warned:
            return
        self._warned.add(table)
        logger.warning(
            "[DB] %s statistics are stale (estimated %d rows, %d live) and this role may not "
            "ANALYZE it: claims may scan the table until autovacuum analyzes it; run "
            "`ANALYZE %s` as its owner",
            table,
            round(estimated),
            live,
            table,
        )
