"""What a worker process says of itself in its heartbeat row (`worker_heartbeats.stats`): one
typed shape for the worker that writes it and for the dashboard and `doctor` that read it back.

Every key is optional to a reader: a worker of an older version wrote fewer of them.
"""

from __future__ import annotations

from typing import Any, TypedDict, cast


class PoolStats(TypedDict):
    total: int
    idle: int
    waiting: int
    max: int


class WorkerStats(TypedDict, total=False):
    requestsInLastMinute: int
    tokensInLastMinute: int
    waiters: int
    rateLimitedTotal: int
    completed: int
    failed: int
    retried: int
    released: int
    reaped: int
    superseded: int
    claims: int
    claimedItems: int
    inFlight: int
    inFlightByStore: dict[str, int]
    readyStores: int
    listenerConnected: bool
    pool: PoolStats
    rpm: int
    tpm: int
    # Items finished in each epoch minute of the last few ("minute": count), and in the last
    # 60 s per store (the busiest).
    finishedPerMinute: dict[str, int]
    finishedLastMinuteByStore: dict[str, int]
    # The kinds this process serves (none said: today's product description only).
    kinds: list[str]


def as_worker_stats(value: Any) -> WorkerStats:
    """A heartbeat row's `stats` as read back (JSON of any shape: a row written by hand, an
    older worker): the object, or an empty one."""
    return cast(WorkerStats, value) if isinstance(value, dict) else {}
