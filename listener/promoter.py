"""The promote step: items whose backoff has ended go back into the claim's range.

An item waiting out a backoff is out of idx_job_items_pending (`job_items.in_backoff`, set by
the retry outcome), so a claim never reads past it, whatever its priority. Something must put
it back when it is due: `promote_due` (sql/backoff.sql), one bounded statement that clears the
flag of the earliest due items; its UPDATE announces their stores on job_items_ready like an
insert, so every process of the fleet hears of them and claims them at once.

`Promoter` runs that statement on a timer aligned to the earliest due time: each pass says when
the next item in backoff is due, and a retry this process writes (`due_in`) brings the timer
forward. A retry written by another process is that process's to time, and the pass after it
sees it anyway; with nothing known, a pass every `idle_seconds` (the safety sweep's interval)
finds items put in backoff by other means (an insert dated later, an operator's UPDATE). One
process of the fleet promotes at a time (an advisory lock, tried, never waited for); the
others' passes are then one probe of an index.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus
from psycopg_pool import AsyncConnectionPool

from listener.backoff import Backoff
from listener.db import database_call
from listener.errors import DatabaseError
from listener.sqlfiles import queries

logger = logging.getLogger("listener.worker")

# Any fixed 64-bit number, distinct from the migrations', retention's, statistics' and the
# stranded-jobs sweep's locks.
PROMOTE_LOCK_KEY = 7_310_420_115_005
# Items promoted per statement: a few milliseconds; a larger crowd due at once (a rate limit
# that sent hundreds back with one delay) takes passes back to back.
PROMOTE_BATCH = 1_000
# Another process held the lock: it is promoting the items due now, and its next pass is timed
# by the same table. One more look a moment later covers an item it could not see yet (a retry
# committed during its pass), at the price of one index probe.
LOCK_MISSED_RETRY_SECONDS = 0.25


@dataclass(frozen=True)
class Promotion:
    """One pass of promote_due."""

    locked: bool  # False: another process was promoting, nothing was done here
    promoted: int
    next_due_in: float | None  # seconds until the next item in backoff is due; None: no item


@database_call("promoting items out of backoff failed")
async def promote_due(pool: AsyncConnectionPool, batch: int = PROMOTE_BATCH) -> Promotion:
    """Put the `batch` earliest items whose backoff has ended back in the claim's range."""
    params = {"key": PROMOTE_LOCK_KEY, "batch": batch}
    async with pool.connection() as conn:
        cursor = await conn.execute(queries("backoff")["promote_due"], params)
        row = await cursor.fetchone()
    assert row is not None  # an aggregate-only SELECT always returns its row
    next_due_in = None if row[2] is None else max(0.0, float(row[2]))
    return Promotion(bool(row[0]), int(row[1]), next_due_in)


def seconds_to_next_pass(promotion: Promotion, batch: int, idle_seconds: float) -> float:
    """When the pass after `promotion` should run, from its result alone."""
    if not promotion.locked:
        return min(LOCK_MISSED_RETRY_SECONDS, idle_seconds)
    if promotion.promoted >= batch:
        return 0.0  # more were due than one batch: the rest at once
    if promotion.next_due_in is None:
        return idle_seconds
    return min(promotion.next_due_in, idle_seconds)


class Promoter:
    """This process's promote step, on a timer aligned to the earliest item in backoff."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        idle_seconds: float,
        batch: int = PROMOTE_BATCH,
        clock: Callable[[], float] = anyio.current_time,
        rng: random.Random | None = None,
    ) -> None:
        self.pool = pool
        self.idle_seconds = idle_seconds
        self.batch = batch
        self.clock = clock
        self.backoff = Backoff(base=0.2, cap=10.0, rng=rng or random.Random())
        self.passes = 0
        self.promoted = 0  # items this process put back in the claims' range
        self._next_at = -math.inf  # the first pass at once: items may be due already
        self._changed = anyio.Event()
        # Set after each pass and then replaced: a caller (a test) can wait for the pass in
        # course to be counted, not only for its commit's notification.
        self.passed = anyio.Event()

    def due_in(self, delay: float) -> None:
        """An item this process put in backoff is due in `delay` seconds: a pass then."""
        at = self.clock() + delay
        if at < self._next_at:
            self._next_at = at
            self._changed.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Promote for ever; started once the first pass (the items due at start) is done."""
        started = False
        while True:
            wait = self._next_at - self.clock()
            if wait > 0:
                if not started:
                    started = True
                    task_status.started()
                self._changed = anyio.Event()
                with anyio.move_on_after(wait):
                    await self._changed.wait()
                continue
            # Until the pass says when the next is due: a retry written meanwhile (`due_in`)
            # sets an earlier time, which the pass's answer then cannot push back.
            self._next_at = math.inf
            try:
                promotion = await promote_due(self.pool, self.batch)
            except DatabaseError as error:
                delay = self.backoff.next()
                logger.warning("[Promoter] %s; trying again in %.1fs", error, delay)
                self._next_at = self.clock() + delay
                continue
            self.backoff.reset()
            self.passes += 1
            self.promoted += promotion.promoted
            self.passed.set()
            self.passed = anyio.Event()
            if promotion.promoted:
                logger.debug("[Promoter] %d item(s) due after their backoff", promotion.promoted)
            after = self.clock() + seconds_to_next_pass(promotion, self.batch, self.idle_seconds)
            self._next_at = min(after, self._next_at)
