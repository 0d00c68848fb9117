"""What keeps the database work per item low: which commits skip the WAL flush (and which must
not: outcomes, and a 429's pause), and claims that serve every worker about to ask in one
statement."""

from __future__ import annotations

import json
from datetime import timedelta
from random import Random
from typing import Any

import anyio
import psycopg
import pytest

from listener import assembly, dispatch
from listener import items as items_db
from listener.complete import Completer
from listener.db import open_pool
from listener.handler import DEFAULT_KIND, App, Item, Kind, Result
from listener.items import ClaimedItem, Outcome
from listener.sqlfiles import queries
from listener.stub.server import StubConfig, run_stub
from tests.support import (
    insert_job,
    insert_job_blocking,
    make_settings,
    query,
    running_worker,
    status_counts,
    wait_for_counts,
    wait_until,
)

pytestmark = pytest.mark.anyio

CLAIM = {
    "stores": ["store-a"],
    "limits": [2],
    "worker_id": "w1",
    "lease_seconds": 60,
    "max_payload_bytes": 65_536,
    "announce": False,
    "kinds": ["product_description"],
    "lane": "openai",
}


def _sync_commit_after(conn: psycopg.Connection[Any], block: str, sql: str, **params: Any) -> str:
    """`synchronous_commit` in force when this statement's transaction commits."""
    with conn.transaction():
        conn.execute(queries(sql)[block], params)
        row = conn.execute("SHOW synchronous_commit").fetchone()
    assert row is not None
    return str(row[0])


def test_leases_and_the_limiter_commit_unflushed_outcomes_and_pauses_flushed(
    database_url: str,
) -> None:
    insert_job_blocking(database_url, "store-a", 3)
    with psycopg.connect(database_url, autocommit=True) as conn:
        # A claim, a lease renewal, a heartbeat: losing one in a crash only loses a lease.
        assert _sync_commit_after(conn, "claim", "items", **CLAIM) == "off"
        claimed = [
            int(r[0]) for r in conn.execute("SELECT id FROM job_items WHERE claimed_by = 'w1'")
        ]
        assert len(claimed) == 2
        leases = {"ids": claimed, "worker_id": "w1", "lease_seconds": 60}
        assert _sync_commit_after(conn, "extend_leases", "items", **leases) == "off"
        beat = {
            "worker_id": "w1",
            "hostname": "h",
            "pid": 1,
            "listener_connected": True,
            "stats": json.dumps({}),
            "stale_seconds": 15,
        }
        assert _sync_commit_after(conn, "upsert_heartbeat", "heartbeat", **beat) == "off"
        # The limiter's row: every process queues on its lock, held until the commit returns.
        step = timedelta(milliseconds=2)
        reserve = {"name": "openai", "request_advance": step, "token_advance": step}
        assert (
            _sync_commit_after(conn, "reserve", "limiter", settle=timedelta(0), **reserve) == "off"
        )
        pause = {"name": "openai", "duration": step, "rate_limited": 1}
        assert _sync_commit_after(conn, "pause", "limiter", **pause) == "on"
        # The setting is the transaction's alone: the session is back to its default.
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        # An outcome is what the client waits for: it keeps the flush.
        (job_id,) = conn.execute("SELECT job_id FROM job_items WHERE id = %s", [claimed[0]])
        done_item = Outcome(claimed[0], "COMPLETED", {"text": "ok"}, attempt=1, job_id=job_id[0])
        outcome = items_db.outcome_params("w1", [done_item])
        assert _sync_commit_after(conn, "finish_items", "items", **outcome) == "on"
        done = conn.execute("SELECT count(*) FROM job_items WHERE status = 'COMPLETED'")
        assert done.fetchone() == (1,)


async def _instant(item: Item) -> Result:
    return Result({"text": "ok"}, cost=0)


def InstantHandler() -> App:
    """No OpenAI call at all: the worker's own pace is all that is left."""
    return App([Kind(DEFAULT_KIND, _instant, estimate=0)])


async def test_a_busy_worker_claims_for_all_its_workers_at_once(database_url: str) -> None:
    # 16 workers, each back for its next item a few event-loop turns after the last: the
    # claimer waits for them, so a claim serves about its share of them (8: another claim on
    # its way serves the other 8), not the 2 or 3 back when it could have set out.
    settings = make_settings("http://127.0.0.1:9/v1", worker_concurrency=16)
    for n in range(20):
        await insert_job(database_url, f"store-{n}", 100)
    async with assembly.running_worker(
        settings, database_url, InstantHandler(), name="test-worker"
    ) as worker:
        await wait_for_counts(database_url, lambda counts: counts.get("COMPLETED") == 2000, 120)
        claims, items = worker.dispatcher.claims, worker.dispatcher.claimed_items
    assert items >= 2000
    assert worker.dispatcher.claim_size == 8
    assert items / claims >= 6, f"{items} item(s) in {claims} claim(s)"


async def test_under_a_big_budget_workers_share_reservations_and_claims(database_url: str) -> None:
    # 60,000 RPM: slots 1 ms apart, more than two seekers could follow with a reservation and a
    # claim each. The seekers queue together for one reservation statement and the slots of one
    # 10 ms tick start together, so a claim serves several of them.
    settings = make_settings("http://127.0.0.1:9/v1", worker_concurrency=16, rate_limit_rpm=60_000)
    for n in range(20):
        await insert_job(database_url, f"store-{n}", 50)
    async with assembly.running_worker(
        settings, database_url, InstantHandler(), name="test-worker"
    ) as worker:
        reservations: list[int] = []
        reserve = worker.limiter._reserve  # type: ignore[attr-defined]

        async def counted(tokens: list[int]) -> Any:
            reservations.append(len(tokens))
            return await reserve(tokens)

        worker.limiter._reserve = counted  # type: ignore[attr-defined]
        await wait_for_counts(database_url, lambda counts: counts.get("COMPLETED") == 1000, 120)
        claims, items = worker.dispatcher.claims, worker.dispatcher.claimed_items
    assert items >= 1000
    assert items / claims >= 3, f"{items} item(s) in {claims} claim(s)"
    assert sum(reservations) / len(reservations) >= 3, reservations
    # Each item once, and the limiter never let two requests share a slot.
    assert await query(database_url, "SELECT max(attempts) FROM job_items") == [(1,)]


async def test_stores_share_evenly_when_claims_want_more_items_than_there_are_stores(
    database_url: str,
) -> None:
    # 16 workers, 10 stores: a claim takes 2 items of 6 stores and 1 of 4. Which stores get 2
    # must change from claim to claim, or the same 6 get twice the others' share.
    settings = make_settings("http://127.0.0.1:9/v1", worker_concurrency=16)
    for n in range(10):
        await insert_job(database_url, f"store-{n}", 300)
    async with assembly.running_worker(settings, database_url, InstantHandler(), name="test"):
        await wait_for_counts(database_url, lambda counts: counts.get("COMPLETED", 0) >= 1000, 120)
    done = dict(
        await query(
            database_url,
            "SELECT instance_id, count(*) FROM job_items WHERE status = 'COMPLETED' GROUP BY 1",
        )
    )
    assert len(done) == 10
    assert max(done.values()) <= 1.25 * min(done.values()), done


def test_a_claim_that_writes_outcomes_keeps_the_flush(database_url: str) -> None:
    insert_job_blocking(database_url, "store-a", 3)
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        conn.execute(queries("items")["claim"], CLAIM)
        conn.execute(queries("items")["flush_at_commit"])
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)


async def test_under_a_budget_each_claim_writes_the_outcomes_waiting(database_url: str) -> None:
    # At 600 RPM items start 100 ms apart, a claim each: each claim also writes the outcomes
    # finished since the one before, so an item costs a reservation and a claim, not a third
    # round trip and commit of its own. Only outcomes no claim came for in time (the last
    # ones; a stall of the machine) are written by the completer alone.
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url, rate_limit_rpm=600, worker_concurrency=4)
        await insert_job(database_url, "paced", 12)
        async with running_worker(database_url, settings) as worker:
            await wait_for_counts(database_url, lambda counts: counts == {"COMPLETED": 12})
            taken, alone = worker.completer.outcomes_taken, worker.completer.batches_written
    assert taken >= 6, (taken, alone)
    assert alone <= 6, (taken, alone)


async def test_outcomes_a_failed_claim_took_are_written_at_once(database_url: str) -> None:
    await insert_job(database_url, "store-a", 2)
    settings = make_settings("http://127.0.0.1:9/v1")
    pool = await open_pool(database_url, settings)
    try:
        result = await items_db.claim(pool, "w1", ["store-a"], [2], 60.0, 65_536)
        done = anyio.Event()
        # Held for a claim for ten minutes: only the give-back can make it write now.
        completer = Completer(pool, "w1", lambda _w, _s: None, Random(1), hold_seconds=600)
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.run, done)
            for item in result.items:
                completer.emit(Outcome.completed(item, {"text": "ok"}))
            taken = completer.take()
            assert len(taken) == 2
            completer.give_back(taken)  # as the claimer does when its claim fails
            await wait_for_counts(database_url, lambda counts: counts == {"COMPLETED": 2})
            completer.close(give_up_after=5.0)
        assert completer.batches_written == 1
    finally:
        await pool.close()


async def test_a_claim_does_not_wait_for_a_cancel_that_holds_the_job_of_an_outcome_it_carries(
    database_url: str,
) -> None:
    # Issue 25, weakness 9: a store-wide cancel holds its jobs' rows until it commits (seconds at
    # 100,000 items). A claim carrying an outcome of such a job used to wait for the row, up to
    # the lock timeout, then fail, and its limiter slot was lost; now it leaves that outcome to
    # the completer and claims at once.
    job_id = await insert_job(database_url, "cancelled", 2)
    await insert_job(database_url, "other", 1)
    # A short lock timeout: the wait, before the fix, fails the claim quickly.
    settings = make_settings("http://127.0.0.1:9/v1", db_lock_timeout_seconds=0.5)
    pool = await open_pool(database_url, settings)
    try:
        first = await items_db.claim(pool, "w1", ["cancelled"], [1], 60.0, 65_536)
        (item,) = first.items
        completer = Completer(pool, "w1", lambda _w, _s: None, Random(1), hold_seconds=600)
        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.run, done)
            try:
                completer.emit(Outcome.completed(item, {"text": "answer"}))
                carried = completer.take()
                with psycopg.connect(database_url) as cancel:
                    answer = cancel.execute("SELECT listener_cancel_job(%s)", [job_id]).fetchone()
                    assert answer is not None and answer[0]["in_flight"] == 1
                    # The cancel's transaction is open: it holds the job's row.
                    result = await items_db.claim(
                        pool, "w1", ["other"], [1], 60.0, 65_536, outcomes=carried
                    )
                    assert [i.instance_id for i in result.items] == ["other"]
                    assert result.written == set() and result.deferred == {item.id}
                    completer.written(carried, result.written, result.deferred)
                    cancel.commit()
                # The completer writes it alone once the row is free: the answer is kept, and the
                # job ends CANCELLED with its last item.
                await wait_for_counts(
                    database_url,
                    lambda counts: counts == {"COMPLETED": 1, "CANCELLED": 1, "PROCESSING": 1},
                )
            finally:
                completer.close(give_up_after=5.0)
        rows = await query(database_url, "SELECT status FROM jobs WHERE id = %s", (job_id,))
    finally:
        await pool.close()
    assert rows == [("CANCELLED",)]


async def test_claims_wait_while_the_completer_cannot_write(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The completer cannot write (another transaction holds the job's row, which it locks
    # first): the claimer stops once OUTCOMES_WAITING_LIMIT outcomes wait, instead of claiming
    # the whole backlog into PROCESSING; once the row is free, everything completes.
    monkeypatch.setattr(dispatch, "OUTCOMES_WAITING_LIMIT", 40)
    items = 1_000
    job_id = await insert_job(database_url, "store-held", items)
    settings = make_settings("http://127.0.0.1:9/v1", worker_concurrency=8)
    async with await psycopg.AsyncConnection.connect(database_url) as blocker:
        await blocker.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", [job_id])
        async with running_worker(database_url, settings, InstantHandler()) as worker:
            await wait_until(lambda: worker.dispatcher.held_for_outcomes > 0)
            counts = await status_counts(database_url)
            # The limit, the batch the completer is trying to write, two claims on their way
            # and the items in the workers' hands: far from the backlog.
            bound = 40 + 40 + 2 * worker.dispatcher.claim_size + settings.worker_concurrency
            assert counts.get("PROCESSING", 0) <= bound, counts
            assert counts.get("PENDING", 0) >= items - bound, counts
            await blocker.rollback()
            await wait_for_counts(database_url, lambda c: c == {"COMPLETED": items})


async def test_a_batch_asks_only_about_jobs_the_worker_holds_no_other_item_of(
    database_url: str,
) -> None:
    # Without a budget the completer is the one writer: a job of which this worker still holds
    # another item is open for sure, and its end is asked by the batch that writes its last one.
    settings = make_settings("http://127.0.0.1:9/v1")
    async with running_worker(database_url, settings, InstantHandler()) as worker:

        def item(item_id: int, job_id: int) -> ClaimedItem:
            return ClaimedItem(item_id, job_id, "store-x", None, "{}", 2, attempts=1)

        a1, a2, b1 = item(1, 10), item(2, 10), item(3, 20)
        worker._on_claimed([a1, a2, b1])
        first = [Outcome.completed(a1, None), Outcome.completed(b1, None)]
        assert worker.completer.still_held(first) == {10}
        worker._on_written(first, [])
        assert worker.completer.still_held([Outcome.completed(a2, None)]) == set()
        worker._on_written([Outcome.completed(a2, None)], [])
        assert not worker.held
