"""/health without a query of its own: it is open to anyone, so a flood of it must cost nothing
the worker needs.

In a worker process the answer comes from the heartbeat, which renews the leases and writes the
worker's row every few seconds on the worker's pool anyway: the database is up while the beats
succeed, and the last beat counted the live workers. /health never takes a connection from that
pool (a few connections, which the lease renewals and claims wait for), so no number of requests
can hold up a renewal. `listener api` has no heartbeat: there one reading, at most HEALTH_SECONDS
old, is shared by every request (one query a second under any flood, on the API's own pool).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from psycopg_pool import AsyncConnectionPool

from listener.errors import one_line
from listener.heartbeat import STALE_BEATS
from listener.http.fleet import DB_ERRORS, count_live_workers

if TYPE_CHECKING:
    from listener.settings import Settings

HEALTH_SECONDS = 1.0


class Beating(Protocol):
    """What /health reads of a worker (`listener.worker.Worker`)."""

    settings: Settings
    listener: Any
    last_beat: float | None
    live_workers: int


@dataclass(frozen=True)
class Answer:
    status_code: int
    body: dict[str, Any]
    reason: str = ""


class Health:
    """The health answer of one process."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        worker: Beating | None,
        *,
        max_age: float = HEALTH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.worker = worker
        self.max_age = max_age
        self.clock = clock
        self.started = clock()
        self.readings = 0
        self._reading: Answer | None = None
        self._read_at = -math.inf
        self._lock = anyio.Lock()

    async def answer(self) -> Answer:
        if self.worker is None:
            return await self._cached_reading()
        return self._from_heartbeat(self.worker)

    def _from_heartbeat(self, worker: Beating) -> Answer:
        listener = "connected" if worker.listener.connected else "disconnected"
        body: dict[str, Any] = {"status": "ok", "database": "ok", "listener": listener}
        stale = STALE_BEATS * worker.settings.heartbeat_seconds
        now = self.clock()
        if worker.last_beat is None and now - self.started < stale:
            # Just started: the first beat is on its way (a worker that cannot reach the
            # database says so once it had the time for three).
            body |= {"database": "starting", "workers": None}
        elif worker.last_beat is None or now - worker.last_beat > stale:
            since = now - (worker.last_beat or self.started)
            body |= {"database": "error", "workers": None}
            return Answer(503, body, f"no heartbeat reached the database for {since:.0f} s")
        else:
            body["workers"] = worker.live_workers
        if listener == "disconnected":
            # The worker cannot hear new work (it still sweeps): not healthy until reconnected.
            return Answer(503, body, "the worker's LISTEN connection is down")
        return Answer(200, body)

    async def _cached_reading(self) -> Answer:
        if self.clock() - self._read_at < self.max_age and self._reading is not None:
            return self._reading
        async with self._lock:
            # Every request that waited here takes the reading the first one made.
            if self.clock() - self._read_at >= self.max_age or self._reading is None:
                self._reading = await self._read()
                self._read_at = self.clock()
                self.readings += 1
            return self._reading

    async def _read(self) -> Answer:
        body: dict[str, Any] = {"status": "ok", "database": "ok", "listener": "not running"}
        try:
            body["workers"] = await count_live_workers(self.pool)
        except DB_ERRORS as error:
            body |= {"database": "error", "workers": None}
            return Answer(503, body, f"database unreachable: {one_line(error)}")
        return Answer(200, body)
