"""The OpenAI budget (requests and tokens per minute) shared by every worker task of every process.

A worker calls `acquire` before it claims an item; it returns at the worker's slot. Slots come
from the GCRA core in `listener/gcra.py`: kept in this process (`LocalLimiter`, here) or in one
`rate_limiters` row on PostgreSQL's clock (`PostgresLimiter`, in `limiter_postgres.py`), so every
process draws from one evenly spaced schedule with no burst (see gcra.py for the bounds). How a
process's own waiters queue for those slots is `limiter_queue.py`; `make_limiter` picks one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from listener import gcra

# An `X as X` import is a re-export: the worker, tests and benchmarks import those names here.
from listener.limiter_postgres import PostgresLimiter as PostgresLimiter
from listener.limiter_queue import Grant as Grant
from listener.limiter_queue import Limiter as Limiter
from listener.limiter_queue import LimiterSnapshot as LimiterSnapshot
from listener.limiter_queue import QueueLimiter, Reservation, micros_to_seconds

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from listener.settings import Settings


class LocalLimiter(QueueLimiter):
    """The budget of this process alone: the GCRA state in memory, on `clock` (monotonic)."""

    def __init__(self, rpm: int, tpm: int, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(rpm, tpm, clock)
        self._state = gcra.GcraState()

    def _now_us(self) -> int:
        return math.floor(self._clock() * gcra.MICROS_PER_SECOND)

    async def _reserve(self, tokens: list[int]) -> Reservation:
        slots, self._state = gcra.reserve(self._state, self._now_us(), tokens, self.rpm, self.tpm)
        paused_until = self._state.paused_until
        return Reservation(
            slots,
            [micros_to_seconds(s) for s in slots],
            paused_until,
            micros_to_seconds(paused_until),
        )

    async def _pause(self, seconds: float, rate_limited: bool) -> tuple[int, float]:
        duration = gcra.to_micros(seconds)
        self._state = gcra.pause(self._state, self._now_us(), duration, rate_limited=rate_limited)
        return self._state.paused_until, micros_to_seconds(self._state.paused_until)

    def _settle(self, delta_tokens: int) -> None:
        self._state = gcra.settle(self._state, self._now_us(), delta_tokens, self.tpm)


def make_limiter(pool: AsyncConnectionPool | None, settings: Settings) -> Limiter:
    """The limiter the settings ask for: shared through PostgreSQL when there is a budget."""
    keep = 1 - settings.rate_limit_headroom_percent / 100
    rpm = max(1, math.floor(settings.rate_limit_rpm * keep)) if settings.rate_limit_rpm else 0
    tpm = max(1, math.floor(settings.rate_limit_tpm * keep)) if settings.rate_limit_tpm else 0
    if pool is None or (rpm == 0 and tpm == 0):
        return LocalLimiter(rpm, tpm)
    return PostgresLimiter(pool, settings.rate_limiter_name, rpm, tpm)
