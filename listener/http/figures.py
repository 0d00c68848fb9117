"""What the dashboard shows, assembled from one reading of the database: the fleet, the stores,
the jobs and the workers, each with its reasons for waiting.

Pure: rows in (the reading's and the census's), plain values out; `snapshot.py` does the I/O.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from listener.handler import DEFAULT_KIND
from listener.http.waiting import (
    DEFAULT_POLICY,
    BatchState,
    Hold,
    Policy,
    Situation,
    batch_in_words,
    batch_pending_in_words,
    holds_in_words,
    waiting_reasons,
)
from listener.workerstats import WorkerStats, as_worker_stats

CHART_MINUTES = 15
_MINUTE = re.compile(r"[0-9]{1,12}")


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
    kind: str = DEFAULT_KIND


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
    stores: Stores
    jobs: list[JobRow]
    workers: list[WorkerRow]
    timings: Timings
    features: Features
    situation: Situation
    error: str | None = None


@dataclass
class Census:
    """The slow tier: every store with PENDING items, and what follows from them alone (worked
    out once per census, not at every refresh: 10,000 stores are a lot of Python a second)."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    # store -> (its newest job, seconds its first item waited to start or None)
    latest_jobs: dict[str, tuple[int, float | None]] = field(default_factory=dict)
    taken: float = float("-inf")
    duration: float = 0.0

    def __post_init__(self) -> None:
        # (instance_id, backlog, ready, backoff_until, oldest_age) by store
        self.of: dict[str, tuple[Any, ...]] = {str(r[0]): r for r in self.rows}
        self.order = sorted(self.of, key=lambda store: (-_int(self.of[store][1]), store))
        self.pending = sum(_int(r[1]) for r in self.rows)
        self.ready = sum(_int(r[2]) for r in self.rows)
        self.ready_stores = sum(1 for r in self.rows if _int(r[2]) > 0)
        ages = [float(r[4]) for r in self.rows if r[4] is not None]
        self.oldest_age = max(ages, default=None)


@dataclass
class Stores:
    """Every store the page can list (with work, or with a policy of its own), as lookups; a
    `StoreRow` is built only for the rows a page shows."""

    census: Census
    order: list[str]
    in_flight: Counter[str]
    last_minute: Counter[str]
    policies: dict[str, Policy]
    holds: dict[str, list[Hold]]
    active_weight: int

    def __len__(self) -> int:
        return len(self.order)

    def backlog(self, store: str) -> int:
        row = self.census.of.get(store)
        return _int(row[1]) if row else 0

    def sort_key(self, sort: str) -> Callable[[str], tuple[Any, ...]]:
        if sort == "in_flight":
            return lambda s: (-self.in_flight[s], -self.backlog(s), s)
        if sort == "last_minute":
            return lambda s: (-self.last_minute[s], -self.backlog(s), s)
        if sort == "oldest":
            return lambda s: (-float((self.census.of.get(s) or (0,) * 5)[4] or 0.0), s)
        return lambda s: (s,)

    def row(self, store: str) -> StoreRow:
        row = self.census.of.get(store)
        policy = self.policies.get(store, DEFAULT_POLICY)
        latest = self.census.latest_jobs.get(store)
        finished = sum(self.last_minute.values())
        working = row is not None or store in self.in_flight
        return StoreRow(
            instance_id=store,
            backlog=_int(row[1]) if row else 0,
            ready=_int(row[2]) if row else 0,
            backoff_until=row[3] if row else None,
            oldest_age=float(row[4]) if row and row[4] is not None else None,
            in_flight=self.in_flight[store],
            last_minute=self.last_minute[store],
            policy=policy,
            budget_share=self.last_minute[store] / finished if finished else 0.0,
            weight_share=(
                policy.weight / self.active_weight if working and self.active_weight else 0.0
            ),
            holds=self.holds.get(store, []),
            latest_job=latest[0] if latest else None,
            start_latency=latest[1] if latest else None,
        )


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _minutes(workers: list[WorkerStats], now: datetime) -> list[int]:
    """The fleet's finished items per epoch minute, the last CHART_MINUTES (oldest first)."""
    totals: Counter[int] = Counter()
    for stats in workers:
        per_minute = stats.get("finishedPerMinute")
        if isinstance(per_minute, dict):
            for minute, count in per_minute.items():
                # ASCII digits only: "²".isdigit() is true and int("²") raises.
                if _MINUTE.fullmatch(str(minute)):
                    totals[int(minute)] += _int(count)
    current = int(now.timestamp() // 60)
    return [totals.get(m, 0) for m in range(current - CHART_MINUTES + 1, current + 1)]


def assemble(
    limiter: tuple[Any, ...] | None,
    worker_rows: list[tuple[Any, ...]],
    in_flight_rows: list[tuple[Any, ...]],
    job_rows: list[tuple[Any, ...]],
    policies: dict[str, Policy],
    census: Census,
    features: Features,
    budget: tuple[int, int],
    live_seconds: float,
    census_age: float,
    batch_rows: Sequence[tuple[Any, ...]] = (),
) -> Snapshot:
    """Everything the page shows, from one reading's rows (pure: no I/O, no clock).

    `budget` is this process's (RATE_LIMIT_RPM, RATE_LIMIT_TPM), for when no worker reports its
    own: `listener api` may run without them set.
    """
    assert limiter is not None  # the query returns one row whatever the table holds
    now: datetime = limiter[0]
    paused_until: datetime | None = limiter[2]
    stats = [as_worker_stats(row[6]) for row in worker_rows]
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
    holds = [Hold(int(r[0]), int(r[1]), str(r[2]), str(r[3] or "?"), r[5]) for r in in_flight_rows]
    in_flight_by_store = Counter(h.instance_id for h in holds)
    last_minute: Counter[str] = Counter()
    for s in stats:
        by_store = s.get("finishedLastMinuteByStore")
        if isinstance(by_store, dict):
            last_minute.update({str(k): _int(v) for k, v in by_store.items()})
    situation = Situation(
        now=now,
        live_workers=len(workers),
        budget_paused_until=paused_until,
        ready_stores=census.ready_stores,
        worker_names={w.worker_id: w.name for w in workers},
        batches={int(r[0]): BatchState(*r) for r in batch_rows},
    )
    # Stores with items in flight but none pending, and stores with only a policy, after those
    # with a backlog; a handful, unlike the census's thousands.
    idle_in_flight = [s for s in in_flight_by_store if s not in census.of]
    policy_only = [
        s
        for s, policy in policies.items()
        if policy != DEFAULT_POLICY and s not in census.of and s not in in_flight_by_store
    ]
    extra = sorted(idle_in_flight, key=lambda s: (-in_flight_by_store[s], s)) + sorted(policy_only)
    working = len(census.of) + len(idle_in_flight)
    # Every working store weighs 1 unless its policy says more: only policy rows need a look.
    active_weight = working + sum(
        policy.weight - 1
        for s, policy in policies.items()
        if s in census.of or s in in_flight_by_store
    )
    holds_by_store: dict[str, list[Hold]] = {}
    for hold in holds:
        holds_by_store.setdefault(hold.instance_id, []).append(hold)
    stores = Stores(
        census=census,
        order=census.order + extra,
        in_flight=in_flight_by_store,
        last_minute=last_minute,
        policies=policies,
        holds=holds_by_store,
        active_weight=active_weight,
    )
    finished_last_minute = sum(last_minute.values())
    # The kinds the live workers serve (one that says nothing of kinds serves today's).
    served = {str(k) for s in stats for k in (s.get("kinds") or [DEFAULT_KIND])}
    jobs = [job_row(row, situation, holds, policies, served if stats else None) for row in job_rows]
    per_minute = _minutes(stats, now)
    fleet = FleetRow(
        items_last_minute=finished_last_minute,
        per_minute=per_minute,
        requests_last_minute=sum(_int(s.get("requestsInLastMinute")) for s in stats),
        rpm_limit=max(
            [_int(s.get("rpm")) for s in stats if "rpm" in s],
            default=budget[0],
        ),
        tokens_last_minute=sum(_int(s.get("tokensInLastMinute")) for s in stats),
        tpm_limit=max(
            [_int(s.get("tpm")) for s in stats if "tpm" in s],
            default=budget[1],
        ),
        paused_until=paused_until,
        rate_limited_total=_int(limiter[1]),
        pending=census.pending,
        ready=census.ready,
        in_flight=len(holds),
        stores_with_work=working,
        oldest_pending_age=census.oldest_age,
    )
    timings = Timings(
        live_ms=live_seconds * 1000,
        census_ms=census.duration * 1000,
        census_age=census_age,
    )
    return Snapshot(now, fleet, stores, jobs, workers, timings, features, situation)


def _at(row: tuple[Any, ...], index: int) -> Any:
    """A column of a row that older readings (tests' rows) may not have."""
    return row[index] if len(row) > index else None


def job_row(
    row: tuple[Any, ...],
    situation: Situation,
    holds: list[Hold],
    policies: dict[str, Policy],
    served: set[str] | None = None,
) -> JobRow:
    job_id, store, status = int(row[0]), str(row[1]), str(row[2])
    kind = str(row[12]) if len(row) > 12 and row[12] is not None else DEFAULT_KIND
    counts = {
        "PENDING": _int(row[5]),
        "PROCESSING": _int(row[6]),
        "COMPLETED": _int(row[7]),
        "FAILED": _int(row[8]),
        "CANCELLED": _int(row[9]),
    }
    held = [h for h in holds if h.job_id == job_id]
    in_flight = sum(1 for h in holds if h.instance_id == store)
    pending_batch, in_batches = _int(_at(row, 13)), _int(_at(row, 14))
    reasons = waiting_reasons(
        situation,
        # Batch-tier items wait for the collector, not for the real-time budget.
        pending=counts["PENDING"] - pending_batch,
        ready=_int(row[11]),
        backoff_until=row[10],
        in_flight=in_flight,
        policy=policies.get(store, DEFAULT_POLICY),
        instance_id=store,
    ) + holds_in_words(held, situation)
    if pending_batch:
        reasons.append(batch_pending_in_words(pending_batch))
    if in_batches:
        batch_id = _at(row, 15)
        others = _int(_at(row, 16)) - 1
        reasons.append(
            batch_in_words(in_batches, None if batch_id is None else int(batch_id), others,
                           situation)
        )  # fmt: skip
    if served is not None and kind not in served and counts["PENDING"]:
        reasons.insert(0, f"no live worker serves kind {kind}: its items wait for one that does")
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
        kind=kind,
    )
