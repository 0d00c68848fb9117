"""Claim, finish, lease and reap items: thin calls of the named SQL in `sql/items.sql`."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Literal

import psycopg
from psycopg_pool import AsyncConnectionPool

from listener.db import database_call
from listener.errors import OutcomeRefused, one_line
from listener.handler import DEFAULT_KIND
from listener.sqlfiles import queries
from listener.storable import storable
from listener.tiers import REALTIME

logger = logging.getLogger(__name__)

Status = Literal["COMPLETED", "FAILED", "PENDING"]
_NO_OPTIONS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class ClaimedItem:
    id: int
    job_id: int
    instance_id: str
    product_id: str | None
    # The payload's JSON text; None when it is NULL or larger than the claim's size limit.
    payload_text: str | None
    payload_bytes: int | None  # None: the payload is NULL
    attempts: int  # this claim's attempt number: it fences the outcome's write
    kind: str = DEFAULT_KIND
    # The job's options over its store's (`stores.options`), as the claim read them.
    options: Mapping[str, Any] = field(default_factory=lambda: _NO_OPTIONS, compare=False)
    tier: str = REALTIME  # 'realtime' or 'flex': the claim never takes batch-tier items
    deferred_since: datetime | None = None  # when its handler first deferred it (DeferItem)


@dataclass(frozen=True)
class Outcome:
    """What became of a claimed item; written in batches by the completer."""

    item_id: int
    status: Status
    result: Any = None
    error: str | None = None
    delay: float = 0.0  # seconds before a PENDING item may be claimed again
    refund: bool = False  # give the attempt back: the item was released, not tried
    instance_id: str = field(default="", compare=False)
    attempt: int = 0  # the claim's attempt number; an outcome of an older claim is not written
    job_id: int = 0
    kind: str = field(default=DEFAULT_KIND, compare=False)
    # What the call cost, for a COMPLETED item (Result's metering, checked by storable.py).
    usage: Mapping[str, int] | None = None
    model: str | None = None
    served_tier: str | None = None
    # A deferral (DeferItem): the item's deferred_since is set, if it is not yet.
    deferred: bool = False

    @classmethod
    def of(cls, item: ClaimedItem, status: Status, **fields: Any) -> Outcome:
        return cls(
            item.id,
            status,
            instance_id=item.instance_id,
            attempt=item.attempts,
            job_id=item.job_id,
            kind=item.kind,
            **fields,
        )

    @classmethod
    def completed(
        cls,
        item: ClaimedItem,
        result: Any,
        usage: Mapping[str, int] | None = None,
        model: str | None = None,
        served_tier: str | None = None,
    ) -> Outcome:
        return cls.of(
            item, "COMPLETED", result=result, usage=usage, model=model, served_tier=served_tier
        )

    @classmethod
    def failed(cls, item: ClaimedItem, error: str) -> Outcome:
        return cls.of(item, "FAILED", error=error)

    @classmethod
    def retry(cls, item: ClaimedItem, error: str, delay: float) -> Outcome:
        return cls.of(item, "PENDING", error=error, delay=delay)

    @classmethod
    def release(cls, item: ClaimedItem, error: str | None = None, delay: float = 0.0) -> Outcome:
        """Back to PENDING with the attempt given back: the item itself was not at fault."""
        return cls.of(item, "PENDING", error=error, delay=delay, refund=True)

    @classmethod
    def deferral(cls, item: ClaimedItem, error: str, delay: float) -> Outcome:
        """A release its handler asked for (DeferItem): its deferred_since starts, if not yet."""
        return cls.of(item, "PENDING", error=error, delay=delay, refund=True, deferred=True)


@dataclass(frozen=True)
class ReadyStore:
    """A store with PENDING items, from a scan; `due_in`: seconds until its first is due."""

    instance_id: str
    due_in: float


@dataclass(frozen=True)
class HeldBack:
    """A store whose policy (pause, max_in_flight, rpm_limit) held back part of its quota.

    `retry_in`: seconds until its rpm_limit allows the next item; None when only a
    notification can free it (resume, or room under max_in_flight).
    """

    instance_id: str
    retry_in: float | None


@dataclass(frozen=True)
class ClaimResult:
    items: list[ClaimedItem]
    held_back: list[HeldBack]
    # Ids of the outcomes it wrote; None: PostgreSQL refused one of them, none was written and
    # the claim went out alone (the completer writes them, see `Completer.written`).
    written: set[int] | None = field(default_factory=set)
    # Ids of the outcomes it left alone: their job is held by another transaction (a cancel).
    deferred: set[int] = field(default_factory=set)


def split_quota(stores: Sequence[str], wanted: int, max_per_store: int) -> list[int]:
    """Share `wanted` items between `stores` as evenly as possible, each capped."""
    if not stores:
        return []
    base, extra = divmod(wanted, len(stores))
    return [min(max_per_store, base + (1 if i < extra else 0)) for i in range(len(stores))]


@database_call("claim failed")
async def claim(
    pool: AsyncConnectionPool,
    worker_id: str,
    stores: Sequence[str],
    quotas: Sequence[int],
    lease_seconds: float,
    max_payload_bytes: int,
    announce: bool = False,
    outcomes: Sequence[Outcome] = (),
    *,
    kinds: Sequence[str] = (DEFAULT_KIND,),
    lane: str = "",
) -> ClaimResult:
    """Claim items of `stores` (`quotas` of each), and write `outcomes` first in the same
    transaction, one round trip (under a budget each item would otherwise cost a round trip and
    a commit of its own for its outcome). The transaction then waits for the WAL flush, as every
    outcome's commit does. It never waits for a job row: outcomes whose job another transaction
    holds (a long cancel or retry) are left out (`deferred`) for the completer."""
    # In store order: the claim locks the `stores` rows of capped stores in this order, and
    # two claims that lock in one order never deadlock.
    ordered = sorted(zip(stores, quotas, strict=True))
    params = {
        "stores": [store for store, _quota in ordered],
        "limits": [quota for _store, quota in ordered],
        "worker_id": worker_id,
        "lease_seconds": lease_seconds,
        "max_payload_bytes": max_payload_bytes,
        # A claim that writes outcomes waits for the WAL flush: it announces after its commit.
        "announce": announce and not outcomes,
        "kinds": list(kinds),
        "lane": lane,
    }
    written: set[int] | None = set()
    deferred: set[int] = set()
    async with pool.connection() as conn:
        try:
            rows, written, deferred = await _claim_writing(conn, worker_id, params, outcomes)
        except OutcomeRefused:
            # One of the outcomes cannot be stored: the claim goes out alone (its workers
            # hold limiter slots), and the outcomes go back to the completer, which writes
            # them alone and finds the one at fault (complete.py). None says so.
            rows, _, _ = await _claim_writing(conn, worker_id, params, ())
            written, deferred = None, set()
        served = Counter(str(row[2]) for row in rows if row[0] is not None)
        if announce and outcomes and served:
            await _announce_served(conn, worker_id, lane, served)
    options: dict[str, Mapping[str, Any]] = {}
    items = [_claimed(row, options) for row in rows if row[0] is not None]
    items.sort(key=lambda item: item.id)
    held_back = [HeldBack(str(row[2]), row[7]) for row in rows if row[0] is None]
    return ClaimResult(items, held_back, written, deferred)


async def _announce_served(
    conn: psycopg.AsyncConnection[Any], worker_id: str, lane: str, served: Counter[str]
) -> None:
    """`stores_served` after the commit of a claim that wrote outcomes. The claim is done: a
    refused announcement must not make its items look unclaimed (they would wait for their
    lease), it only leaves the fleet's rings a turn out of step until the next one."""
    params = {
        "worker_id": worker_id,
        "lane": lane,
        "stores": list(served),
        "counts": list(served.values()),
    }
    try:
        await conn.execute(queries("items")["announce_served"], params)
    except psycopg.Error as error:
        logger.warning("[Worker] announcing the stores a claim served failed: %s", one_line(error))


def _claimed(row: tuple[Any, ...], parsed: dict[str, Mapping[str, Any]]) -> ClaimedItem:
    """A row of the claim: its columns in the claim's SELECT order. `parsed`: the options read
    so far, by their text (a claim's items share their job's, parsed once, read-only)."""
    (id_, job_id, store, product_id, payload_text, payload_bytes, attempts, _retry_in, kind,
     options_text, tier, deferred_since) = row  # fmt: skip
    text = options_text or "{}"
    options = parsed.get(text)
    if options is None:
        options = parsed[text] = MappingProxyType(json.loads(text))
    return ClaimedItem(
        id=id_,
        job_id=job_id,
        instance_id=store,
        product_id=product_id,
        payload_text=payload_text,
        payload_bytes=payload_bytes,
        attempts=attempts,
        kind=kind,
        options=options,
        tier=tier,
        deferred_since=deferred_since,
    )


async def _claim_writing(
    conn: psycopg.AsyncConnection[Any],
    worker_id: str,
    params: dict[str, Any],
    outcomes: Sequence[Outcome],
) -> tuple[list[tuple[Any, ...]], set[int], set[int]]:
    """The claim's rows, the ids of the outcomes written in its transaction, and those it left
    to the completer (their job is held by another transaction: a claim never waits for it)."""
    sql = queries("items")
    if not outcomes:
        cursor = await conn.execute(sql["claim"], params)
        return await cursor.fetchall(), set(), set()
    try:
        async with conn.pipeline(), conn.transaction():
            finished = await _write_outcomes(conn, worker_id, outcomes, wait=False)
            cursor = await conn.execute(sql["claim"], params)
            await conn.execute(sql["flush_at_commit"])
    except REFUSALS as error:
        raise refused(error) from error
    written: set[int] = set()
    deferred: set[int] = set()
    for id_, _job_id, status in await finished.fetchall():
        (written if status is not None else deferred).add(int(id_))
    return await cursor.fetchall(), written, deferred


# What says an outcome's data is at fault, not the database's state: SQLSTATE class 22 (data
# exception: invalid JSON such as a NaN, a value out of range) is psycopg's DataError, as is a
# NUL refused by the client; class 23 (a constraint) its IntegrityError; a string Python cannot
# encode as UTF-8 fails before it is sent. Anything else (a lost connection, a lock timeout, a
# failover) is the database's, and the same batch is written again later.
REFUSALS = (psycopg.DataError, psycopg.IntegrityError, UnicodeEncodeError)


def refused(error: Exception) -> OutcomeRefused:
    if isinstance(error, psycopg.Error):
        return OutcomeRefused(error.diag.message_primary or one_line(error))
    return OutcomeRefused(one_line(error))


def _result_json(outcome: Outcome) -> str | None:
    if outcome.result is None:
        return None
    try:
        # NaN and Infinity pass here as JSON cannot hold them; PostgreSQL refuses them (class 22).
        return json.dumps(outcome.result)
    except (TypeError, ValueError, RecursionError) as error:
        raise OutcomeRefused(f"the result is not JSON ({one_line(error)})") from None


# What json.dumps (ASCII output) writes for the characters `storable` cleans: NUL and the
# UTF-16 surrogates. A match is only a hint (an escaped backslash before "u0000" matches too):
# the outcome then goes through `storable`, which finds what is really there.
_UNSTORABLE_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


def _outcome_json(outcome: Outcome) -> str:
    """One outcome as an object of finish_items' JSON array. Cleaned (`storable.py`) only when
    its encoded text hints at something to clean: most results need no walk of their values."""
    result = _result_json(outcome)
    error = None if outcome.error is None else json.dumps(outcome.error)
    metered = (
        outcome.usage is not None or outcome.model is not None or outcome.served_tier is not None
    )
    if (
        metered
        or (result is not None and _UNSTORABLE_ESCAPE.search(result))
        or (error is not None and _UNSTORABLE_ESCAPE.search(error))
    ):
        outcome = storable(outcome)
        result = _result_json(outcome)
        error = None if outcome.error is None else json.dumps(outcome.error)
    usage = None if outcome.usage is None else json.dumps(dict(outcome.usage))
    model = None if outcome.model is None else json.dumps(outcome.model)
    tier = None if outcome.served_tier is None else json.dumps(outcome.served_tier)
    # Statuses are our own literals; the numbers are Python's (repr of a float is valid JSON
    # but for inf and nan, which PostgreSQL refuses, as it refuses them in an interval).
    return (
        f'{{"id":{int(outcome.item_id)},"job_id":{int(outcome.job_id)},'
        f'"status":"{outcome.status}",'
        f'"result":{result or "null"},"error":{error or "null"},'
        f'"delay":{float(outcome.delay)!r},"refund":{"true" if outcome.refund else "false"},'
        f'"attempt":{int(outcome.attempt)},"usage":{usage or "null"},'
        f'"model":{model or "null"},"served_tier":{tier or "null"},'
        f'"deferred":{"true" if outcome.deferred else "false"}}}'
    )


def outcome_params(worker_id: str, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """The parameters of `finish_items`: the outcomes as one JSON array (see its comment),
    each outcome made storable first where it needs it (`storable.py`)."""
    return {
        "outcomes": "[" + ",".join([_outcome_json(o) for o in outcomes]) + "]",
        "worker_id": worker_id,
    }


@database_call("writing item outcomes failed")
async def finish(
    pool: AsyncConnectionPool,
    worker_id: str,
    outcomes: Sequence[Outcome],
    open_jobs: Collection[int] = (),
) -> set[int]:
    """Write a batch of outcomes and end the jobs they finish; return the ids written.

    One transaction in one round trip (a pipeline): the batch's jobs locked in id order, the
    outcomes, then each job with no open item left is ended (`sql/items.sql` says why this
    order is safe against a concurrent finisher and a cancel). An item this worker no longer
    holds (its lease expired and the item was reaped, perhaps done elsewhere) is left as it is.
    An outcome PostgreSQL cannot store raises OutcomeRefused, and nothing of the batch is
    written: the caller splits it (complete.py). `open_jobs`: jobs of the batch known to keep
    an open item (this worker holds another of their items), not asked whether they are done.
    """
    if not outcomes:
        return set()
    async with pool.connection() as conn:
        try:
            async with conn.pipeline(), conn.transaction():
                written = await _write_outcomes(conn, worker_id, outcomes, open_jobs=open_jobs)
        except REFUSALS as error:
            raise refused(error) from error
        rows = await written.fetchall()
    return {int(id_) for id_, _job_id, status in rows if status is not None}


async def _write_outcomes(
    conn: psycopg.AsyncConnection[Any],
    worker_id: str,
    outcomes: Sequence[Outcome],
    wait: bool = True,
    open_jobs: Collection[int] = (),
) -> psycopg.AsyncCursor[Any]:
    """Inside a transaction: the batch's jobs locked, the outcomes written, the jobs they
    finish ended. The cursor returned yields (id, job id, status) of each outcome: status NULL
    when its job was held elsewhere and it was not written (only with `wait` False: the jobs
    held by others are skipped instead of waited for)."""
    sql = queries("items")
    jobs = {"job_ids": sorted({o.job_id for o in outcomes})}
    if wait:
        await conn.execute(sql["lock_jobs_of_outcomes"], jobs)
    written = await conn.execute(sql["finish_items"], outcome_params(worker_id, outcomes))
    # A job with another item still open cannot end now, and the caller says which it knows of
    # (`open_jobs`): at full speed most of a batch's jobs, each asked about for nothing before
    # (the statement cost up to 34 µs an item, bench.db_work).
    ending = {"job_ids": [job for job in jobs["job_ids"] if job not in open_jobs]}
    if ending["job_ids"]:
        await conn.execute(sql["finish_jobs" if wait else "finish_held_jobs"], ending)
    return written


# Any fixed 64-bit number, distinct from the migrations', retention's and statistics' locks.
STRANDED_LOCK_KEY = 7_310_420_115_004
# Open jobs judged per pass: a few milliseconds (bench.stranded_jobs); at one pass every 10 s a
# process walks 200,000 open jobs in about half an hour, a fleet of N processes N times faster.
STRANDED_CHUNK = 2_000


@dataclass(frozen=True)
class StrandedSweep:
    """One pass of the stranded-jobs sweep; `after`: where the next pass starts."""

    closed: int
    judged: int
    after: int
    locked: bool  # False: another process was sweeping, nothing was judged


@database_call("closing stranded jobs failed")
async def close_stranded_jobs(
    pool: AsyncConnectionPool, after: int = 0, chunk: int = STRANDED_CHUNK
) -> StrandedSweep:
    """Close the jobs left open with every item finished among the next `chunk` open jobs after
    job id `after` (< 0: a random place). The walk wraps round: a pass that judged fewer than
    `chunk` reached the end, and the next starts again at 0."""
    params = {"key": STRANDED_LOCK_KEY, "after": after, "chunk": chunk}
    async with pool.connection() as conn:
        cursor = await conn.execute(queries("items")["close_stranded_jobs"], params)
        row = await cursor.fetchone()
    assert row is not None  # an aggregate-only SELECT always returns its row
    locked, closed, judged, last_id = bool(row[0]), int(row[1]), int(row[2]), int(row[3])
    if not locked:
        return StrandedSweep(0, 0, after, False)
    return StrandedSweep(closed, judged, last_id if judged == chunk else 0, True)


@database_call("extending leases failed")
async def extend_leases(
    pool: AsyncConnectionPool, worker_id: str, item_ids: Sequence[int], lease_seconds: float
) -> None:
    if not item_ids:
        return
    params = {"ids": list(item_ids), "worker_id": worker_id, "lease_seconds": lease_seconds}
    async with pool.connection() as conn:
        await conn.execute(queries("items")["extend_leases"], params)


@database_call("reaping expired leases failed")
async def reap_expired(pool: AsyncConnectionPool, max_attempts: int) -> list[tuple[int, str, str]]:
    """Return (item id, store, new status) of every item whose lease had expired."""
    sql = queries("items")
    async with pool.connection() as conn:
        async with conn.transaction():
            cursor = await conn.execute(sql["lock_jobs_of_expired"])
            job_ids = [int(row[0]) for row in await cursor.fetchall()]
            if not job_ids:
                return []
            cursor = await conn.execute(
                sql["reap_expired"], {"max_attempts": max_attempts, "job_ids": job_ids}
            )
            rows = await cursor.fetchall()
        ended = sorted({int(r[1]) for r in rows if r[3] != "PENDING"})
        if ended:
            await conn.execute(sql["finish_jobs"], {"job_ids": ended})
    return [(int(r[0]), str(r[2]), str(r[3])) for r in rows]


@database_call("listing stores with pending items failed")
async def ready_stores(
    conn: psycopg.AsyncConnection[Any], kinds: Sequence[str] = (DEFAULT_KIND,)
) -> list[ReadyStore]:
    """Stores with PENDING items of `kinds` and when the first is due, by a loose index scan
    (milliseconds at a million rows)."""
    cursor = await conn.execute(queries("items")["ready_stores"], {"kinds": list(kinds)})
    return [ReadyStore(str(row[0]), float(row[1])) for row in await cursor.fetchall()]


@database_call("counting pending items failed")
async def count_pending(pool: AsyncConnectionPool) -> int:
    async with pool.connection() as conn:
        cursor = await conn.execute(queries("items")["count_pending"])
        row = await cursor.fetchone()
    return int(row[0]) if row else 0
