"""The limiter shared by every process: one `rate_limiters` row on PostgreSQL's clock, reserved
from with one upsert per batch of waiters (`sql/limiter.sql`), and read back for reporting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from psycopg.rows import tuple_row

from listener.db import wrap
from listener.errors import DatabaseError
from listener.limiter import gcra
from listener.limiter.queue import QueueLimiter, Reservation, micros_to_seconds
from listener.sqlfiles import queries

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

# One logger name for the whole limiter, whichever of its modules writes the line.
logger = logging.getLogger("listener.limiter")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class PostgresLimiter(QueueLimiter):
    """The budget shared by every process through the `rate_limiters` row called `name`.

    Each reservation is one upsert (`sql/limiter.sql`) on the database's clock. Token
    corrections (`settle`) ride along with this process's next reservation, so a request costs
    at most one statement; until then other processes do not see them. With both budgets off
    it never touches the database.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        name: str,
        rpm: int,
        tpm: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        statement_timeout: float = 10.0,
    ) -> None:
        super().__init__(rpm, tpm, clock)
        self.name = name
        self._pool = pool
        self._statement_timeout = statement_timeout
        self._pending_tokens = 0  # settled corrections not yet sent

    async def _reserve(self, tokens: list[int]) -> Reservation:
        plan = gcra.plan_batch(tokens, self.rpm, self.tpm)
        pending, self._pending_tokens = self._pending_tokens, 0
        params = {
            "name": self.name,
            "request_advance": _interval(plan.request_advance),
            "token_advance": _interval(plan.token_advance),
            "settle": _interval(gcra.token_interval(pending, self.tpm)),
        }
        try:
            start, db_now, paused_until = await self._execute("reserve", params)
        except BaseException:
            self._pending_tokens += pending
            raise
        received = self._clock()
        start_us, now_us, paused_us = _micros(start), _micros(db_now), _micros(paused_until)
        slots = [start_us + offset for offset in plan.offsets]
        logger.debug(
            "rate limiter %s reserved %d slot(s), the first in %.3f s",
            self.name,
            len(slots),
            micros_to_seconds(start_us - now_us),
        )
        # The wait is measured on the database's clock and slept on ours: no clock skew.
        return Reservation(
            slots, now_us, received, paused_us, received + micros_to_seconds(paused_us - now_us)
        )

    async def _pause(self, seconds: float, rate_limited: bool) -> tuple[int, float]:
        params = {
            "name": self.name,
            "duration": _interval(gcra.to_micros(seconds)),
            "rate_limited": int(rate_limited),
        }
        paused_until, db_now, _total = await self._execute("pause", params)
        paused_us = _micros(paused_until)
        return paused_us, self._clock() + micros_to_seconds(paused_us - _micros(db_now))

    def _settle(self, delta_tokens: int) -> None:
        self._pending_tokens += delta_tokens

    async def _execute(self, block: str, params: dict[str, Any]) -> tuple[Any, ...]:
        # Shielded: a cancelled waiter must not lose the slots it fetches for the others, nor
        # leave a slot taken in the row that nobody is told about. The timeout bounds the shield.
        with anyio.CancelScope(shield=True):
            row = await _fetch_one(self._pool, self.name, block, params, self._statement_timeout)
        if row is None:  # an upsert with RETURNING always returns its row
            raise DatabaseError(f"rate limiter {self.name!r}: {block} returned no row")
        return row


async def _fetch_one(
    pool: AsyncConnectionPool, name: str, block: str, params: dict[str, Any], limit: float
) -> tuple[Any, ...] | None:
    # tuple_row whatever the pool's row factory, so the unpacking here holds.
    try:
        with anyio.fail_after(limit):
            async with pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cursor:
                await cursor.execute(queries("limiter")[block], params)
                return await cursor.fetchone()
    except psycopg.Error as error:
        raise wrap(error, f"rate limiter {name!r}: {block}") from error
    except TimeoutError as error:
        raise DatabaseError(f"rate limiter {name!r}: {block} took over {limit} s") from error


def _interval(micros: int) -> timedelta:
    return timedelta(microseconds=micros)


def _micros(at: datetime) -> int:
    return (at - _EPOCH) // _MICROSECOND
