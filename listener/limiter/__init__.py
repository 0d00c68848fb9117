"""The OpenAI budget (requests and tokens per minute) shared by every worker task of every process.

A worker calls `acquire` before it claims an item; it returns at the worker's slot. Slots come
from the GCRA core in `gcra.py`: kept in this process (`LocalLimiter`, in `local.py`) or in one
`rate_limiters` row on PostgreSQL's clock (`PostgresLimiter`, in `postgres.py`), so every process
draws from one evenly spaced schedule with no burst (see gcra.py for the bounds). How a process's
own waiters queue for those slots is `queue.py`; `make_limiter` picks one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

# An `X as X` import is a re-export: the worker, tests and benchmarks import those names here.
from listener.limiter.local import LocalLimiter as LocalLimiter
from listener.limiter.postgres import PostgresLimiter as PostgresLimiter
from listener.limiter.queue import Grant as Grant
from listener.limiter.queue import Limiter as Limiter
from listener.limiter.queue import LimiterSnapshot as LimiterSnapshot

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from listener.settings import Settings


def make_limiter(pool: AsyncConnectionPool | None, settings: Settings) -> Limiter:
    """The limiter the settings ask for: shared through PostgreSQL when there is a budget."""
    return budget_limiter(
        pool,
        settings.rate_limiter_name,
        settings.rate_limit_rpm,
        settings.rate_limit_tpm,
        settings.rate_limit_headroom_percent,
    )


def budget_limiter(
    pool: AsyncConnectionPool | None, name: str, rpm: int, tpm: int, headroom_percent: float
) -> Limiter:
    """The limiter of the budget `name` (its row), spacing requests for `headroom_percent` less
    than `rpm` and `tpm`: shared through PostgreSQL when there is a budget and a pool."""
    keep = 1 - headroom_percent / 100
    rpm = max(1, math.floor(rpm * keep)) if rpm else 0
    tpm = max(1, math.floor(tpm * keep)) if tpm else 0
    if pool is None or (rpm == 0 and tpm == 0):
        return LocalLimiter(rpm, tpm)
    return PostgresLimiter(pool, name, rpm, tpm)
