"""The dashboard's shared snapshot: one set of queries per refresh period, however many pages.

Every open page polls; each poll reads the snapshot held in memory, and only when it is older
than the refresh period does one caller (behind a lock) read the database again while the others
wait for that reading. The census (every store's backlog) walks the whole backlog, so it runs on
a slower, adaptive period: at least the refresh period, and at least `CENSUS_DUTY` times its own
duration (about 0.3 s at 1 M pending rows: every ~10 s there; at every refresh on a small queue).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from listener.errors import one_line
from listener.http.fleet import DB_ERRORS, DB_TIMEOUT_SECONDS, LIVE_SECONDS
from listener.http.waiting import (
    DEFAULT_POLICY,
    Hold,
    Policy,
    Situation,
    holds_in_words,
    waiting_reasons,
)
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
CHART_MINUTES = 15


@dataclass
class WorkerRow:
    worker_id: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_age: float
    listener_connected: bool
    in_flight: int
    pool: dict[str, int]
    completed: int
    failed: int

    @property
    def name(self) -> str:
        return f"{self.hostname} pid {self.pid}"


@dataclass
class StoreRow:
    instance_id: str
    backlog: int
    ready: int
    backoff_until: datetime | None
    oldest_age: float | None
    in_flight: int
    last_minute: int
    policy: Policy
    budget_share: float
    weight_share: float
    holds: list[Hold]
    latest_job: int | None
    start_latency: float | None

    def reasons(self, situation: Situation) -> list[str]:
        """Why its items wait; computed for the rows a page shows, not for every store."""
        return waiting_reasons(
            situation,
            pending=self.backlog,
            ready=self.ready,
            backoff_until=self.backoff_until,
            in_flight=self.in_flight,
            policy=self.policy,
            instance_id=self.instance_id,
        ) + holds_in_words(self.holds, situation)


@dataclass
class JobRow:
    id: int
    instance_id: str
    status: str
    created_at: datetime
    completed_at: datetime | None
    counts: dict[str, int]
    total: int
    # Until it finished, or until now for a job still open.
    duration: float
    reasons: list[str]


@dataclass
class FleetRow:
    items_last_minute: int
    per_minute: list[int]
    requests_last_minute: int
    rpm_limit: int
    tokens_last_minute: int
    tpm_limit: int
    paused_until: datetime | None
    rate_limited_total: int
    pending: int
    ready: int
    in_flight: int
    stores_with_work: int
    oldest_pending_age: float | None


@dataclass
class Timings:
    """Database time of the last reading, in milliseconds, for the page's footer and the bench."""

    live_ms: float = 0.0
    census_ms: float = 0.0
    census_age: float = 0.0


@dataclass(frozen=True)
class Features:
    """What the database offers the actions (the store policy, the job lifecycle)."""

    stores: bool = False
    cancel: bool = False
    retry: bool = False


@dataclass
class Snapshot:
    now: datetime
    fleet: FleetRow
    stores: list[StoreRow]
    jobs: list[JobRow]
    workers: list[WorkerRow]
    timings: Timings
    features: Features
    situation: Situation
    error: str | None = None


@dataclass
class Census:
    """The slow tier: every store with PENDING items."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    # store -> (its newest job, seconds its first item waited to start or None)
    latest_jobs: dict[str, tuple[int, float | None]] = field(default_factory=dict)
    taken: float = float("-inf")
    duration: float = 0.0


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _minutes(workers: list[dict[str, Any]], now: datetime) -> list[int]:
    """The fleet's finished items per epoch minute, the last CHART_MINUTES (oldest first)."""
    totals: Counter[int] = Counter()
    for stats in workers:
        per_minute = stats.get("finishedPerMinute")
        if isinstance(per_minute, dict):
            for minute, count in per_minute.items():
                if str(minute).isdigit():
                    totals[int(minute)] += _int(count)
    current = int(now.timestamp() // 60)
    return [totals.get(m, 0) for m in range(current - CHART_MINUTES + 1, current + 1)]


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
                live_done = self.clock()
                # The first reading counts the backlog at once (and learns the database's
                # features, which the policies need); later ones leave it to `get`.
                if self.census.taken == float("-inf"):
                    await self._read_census(conn)
                policy_started = self.clock()
                policies = await self._policies(conn)
                live_seconds = live_done - started + self.clock() - policy_started
        return self._assemble(
            limiter, worker_rows, in_flight_rows, job_rows, policies, live_seconds
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

    def _assemble(
        self,
        limiter: tuple[Any, ...] | None,
        worker_rows: list[tuple[Any, ...]],
        in_flight_rows: list[tuple[Any, ...]],
        job_rows: list[tuple[Any, ...]],
        policies: dict[str, Policy],
        live_seconds: float,
    ) -> Snapshot:
        assert limiter is not None  # the query returns one row whatever the table holds
        now: datetime = limiter[0]
        paused_until: datetime | None = limiter[2]
        stats = [row[6] if isinstance(row[6], dict) else {} for row in worker_rows]
        workers = [
            WorkerRow(
                worker_id=str(row[0]),
                hostname=str(row[1]),
                pid=int(row[2]),
                started_at=row[3],
                heartbeat_age=float(row[4]),
                listener_connected=bool(row[5]),
                in_flight=_int(s.get("inFlight")),
                pool={k: _int(v) for k, v in (s.get("pool") or {}).items()},
                completed=_int(s.get("completed")),
                failed=_int(s.get("failed")),
            )
            for row, s in zip(worker_rows, stats, strict=True)
        ]
        holds = [
            Hold(int(r[0]), int(r[1]), str(r[2]), str(r[3] or "?"), r[5]) for r in in_flight_rows
        ]
        in_flight_by_store = Counter(h.instance_id for h in holds)
        last_minute: Counter[str] = Counter()
        for s in stats:
            by_store = s.get("finishedLastMinuteByStore")
            if isinstance(by_store, dict):
                last_minute.update({str(k): _int(v) for k, v in by_store.items()})
        census = {str(r[0]): r for r in self.census.rows}
        ready_stores = sum(1 for r in self.census.rows if _int(r[2]) > 0)
        situation = Situation(
            now=now,
            live_workers=len(workers),
            budget_paused_until=paused_until,
            ready_stores=ready_stores,
            worker_names={w.worker_id: w.name for w in workers},
        )
        names = set(census) | set(in_flight_by_store) | {
            store for store, policy in policies.items() if policy != DEFAULT_POLICY
        }
        active_weight = sum(
            policies.get(s, DEFAULT_POLICY).weight
            for s in names
            if s in census or s in in_flight_by_store
        )
        finished_last_minute = sum(last_minute.values())
        holds_by_store: dict[str, list[Hold]] = {}
        for hold in holds:
            holds_by_store.setdefault(hold.instance_id, []).append(hold)
        stores = []
        for store in names:
            row = census.get(store)
            policy = policies.get(store, DEFAULT_POLICY)
            latest = self.census.latest_jobs.get(store)
            backlog, ready = (_int(row[1]), _int(row[2])) if row else (0, 0)
            working = row is not None or store in in_flight_by_store
            stores.append(
                StoreRow(
                    instance_id=store,
                    backlog=backlog,
                    ready=ready,
                    backoff_until=row[3] if row else None,
                    oldest_age=float(row[4]) if row and row[4] is not None else None,
                    in_flight=in_flight_by_store[store],
                    last_minute=last_minute[store],
                    policy=policy,
                    budget_share=last_minute[store] / finished_last_minute
                    if finished_last_minute
                    else 0.0,
                    weight_share=policy.weight / active_weight if working and active_weight else 0,
                    holds=holds_by_store.get(store, []),
                    latest_job=latest[0] if latest else None,
                    start_latency=latest[1] if latest else None,
                )
            )
        stores.sort(key=lambda s: (-s.backlog, -s.in_flight, s.instance_id))
        jobs = [self._job(row, situation, holds, policies) for row in job_rows]
        per_minute = _minutes(stats, now)
        oldest = [s.oldest_age for s in stores if s.oldest_age is not None]
        fleet = FleetRow(
            items_last_minute=finished_last_minute,
            per_minute=per_minute,
            requests_last_minute=sum(_int(s.get("requestsInLastMinute")) for s in stats),
            rpm_limit=max(
                [_int(s.get("rpm")) for s in stats if "rpm" in s],
                default=self.settings.rate_limit_rpm,
            ),
            tokens_last_minute=sum(_int(s.get("tokensInLastMinute")) for s in stats),
            tpm_limit=max(
                [_int(s.get("tpm")) for s in stats if "tpm" in s],
                default=self.settings.rate_limit_tpm,
            ),
            paused_until=paused_until,
            rate_limited_total=_int(limiter[1]),
            pending=sum(s.backlog for s in stores),
            ready=sum(s.ready for s in stores),
            in_flight=len(holds),
            stores_with_work=sum(1 for s in stores if s.backlog or s.in_flight),
            oldest_pending_age=max(oldest, default=None),
        )
        timings = Timings(
            live_ms=live_seconds * 1000,
            census_ms=self.census.duration * 1000,
            census_age=max(0.0, self.clock() - self.census.taken),
        )
        return Snapshot(now, fleet, stores, jobs, workers, timings, self.features, situation)

    def _job(
        self,
        row: tuple[Any, ...],
        situation: Situation,
        holds: list[Hold],
        policies: dict[str, Policy],
    ) -> JobRow:
        job_id, store, status = int(row[0]), str(row[1]), str(row[2])
        counts = {
            "PENDING": _int(row[5]),
            "PROCESSING": _int(row[6]),
            "COMPLETED": _int(row[7]),
            "FAILED": _int(row[8]),
            "CANCELLED": _int(row[9]),
        }
        held = [h for h in holds if h.job_id == job_id]
        in_flight = sum(1 for h in holds if h.instance_id == store)
        reasons = waiting_reasons(
            situation,
            pending=counts["PENDING"],
            ready=_int(row[11]),
            backoff_until=row[10],
            in_flight=in_flight,
            policy=policies.get(store, DEFAULT_POLICY),
            instance_id=store,
        ) + holds_in_words(held, situation)
        return JobRow(
            id=job_id,
            instance_id=store,
            status=status,
            created_at=row[3],
            completed_at=row[4],
            counts=counts,
            total=sum(counts.values()),
            duration=((row[4] or situation.now) - row[3]).total_seconds(),
            reasons=reasons,
        )
