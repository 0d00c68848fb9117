"""Items waiting out a backoff: out of the claim's range (job_items.in_backoff, kept by a trigger
whoever writes the item) until the promote step puts them back at their due time and announces
their store."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from listener import items as items_db
from listener.items import ClaimedItem, Outcome
from listener.promoter import (
    PROMOTE_LOCK_KEY,
    Promoter,
    Promotion,
    promote_due,
    seconds_to_next_pass,
)
from tests.support import SLACK, heard_so_far, insert_backlog, insert_job, query

pytestmark = pytest.mark.anyio


async def _claim(pool: AsyncConnectionPool, store: str) -> list[ClaimedItem]:
    result = await items_db.claim(pool, "w", [store], [5], 60, 65_536)
    return result.items


async def test_a_retried_item_is_claimed_once_due_and_its_store_woken(database_url: str) -> None:
    await insert_job(database_url, "store-R", 1)
    async with (
        AsyncConnectionPool(database_url, min_size=1, max_size=2) as pool,
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as listener,
    ):
        promoter = Promoter(pool, idle_seconds=300)
        async with anyio.create_task_group() as services:
            # Started after its first pass: nothing was in backoff, it now waits `idle_seconds`.
            await services.start(promoter.run)
            (item,) = await _claim(pool, "store-R")
            await items_db.finish(pool, "w", [Outcome.retry(item, "HTTP 500", delay=0.3)])
            rows = await query(
                database_url, "SELECT status, in_backoff, run_after > now() FROM job_items"
            )
            assert rows == [("PENDING", True, True)]
            assert await _claim(pool, "store-R") == []  # nothing before its run_after
            await listener.execute("LISTEN job_items_ready")
            promoter.due_in(0.3)  # what the worker does once the retry is written
            heard = None
            async for notify in listener.notifies(timeout=10 * SLACK, stop_after=1):
                heard = notify.payload
            services.cancel_scope.cancel()
        assert heard == "store-R"
        (again,) = await _claim(pool, "store-R")
    assert (again.id, again.attempts) == (item.id, 2)
    ((on_time, flag),) = await query(
        database_url, "SELECT claimed_at >= run_after, in_backoff FROM job_items"
    )
    assert on_time and not flag
    assert promoter.passes == 2  # at start, then at the item's due time: no polling between


def _flags(conn: psycopg.Connection[Any]) -> dict[str, tuple[str, bool]]:
    rows = conn.execute("SELECT product_id, status, in_backoff FROM job_items").fetchall()
    return {str(product): (str(status), bool(flag)) for product, status, flag in rows}


def test_every_writer_leaves_the_flag_true_to_the_item(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        insert_backlog(conn, stores=1, per_store=4)
        # An insert scheduled for later, and an operator's UPDATE of run_after: in backoff.
        conn.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id, run_after)"
            " SELECT id, instance_id, 'later', now() + interval '1 hour' FROM jobs"
        )
        conn.execute(
            "UPDATE job_items SET run_after = now() + interval '1 hour'"
            " WHERE product_id IN ('p1', 'p2', 'p3')"
        )
        assert _flags(conn) == {
            "p1": ("PENDING", True),
            "p2": ("PENDING", True),
            "p3": ("PENDING", True),
            "p4": ("PENDING", False),
            "later": ("PENDING", True),
        }
        # Any write of an item once due takes it out (an operator moving run_after back), and
        # so does leaving PENDING (failed by hand); the operator's retry brings it back due.
        conn.execute("UPDATE job_items SET run_after = now() WHERE product_id = 'p1'")
        conn.execute(
            "UPDATE job_items SET status = 'FAILED', error = 'by hand' WHERE product_id = 'p2'"
        )
        after_writes = _flags(conn)
        conn.execute("SELECT listener_retry_job(id) FROM jobs")
        retried = _flags(conn)["p2"]
        # A cancel ends the items still in backoff: CANCELLED, out of backoff.
        conn.execute("SELECT listener_cancel_job(id) FROM jobs")
        cancelled = _flags(conn)
    assert after_writes["p1"] == ("PENDING", False)
    assert after_writes["p2"] == ("FAILED", False)
    assert retried == ("PENDING", False)
    assert set(cancelled.values()) == {("CANCELLED", False)}


def _flag_due_items(conn: psycopg.Connection[Any]) -> None:
    """Every item in backoff, due a minute ago (store-1's two): what a retry's backoff becomes
    once it ends (set with the trigger off, rather than waiting for the time to pass)."""
    with conn.transaction():
        conn.execute("ALTER TABLE job_items DISABLE TRIGGER job_items_mark_backoff")
        conn.execute(
            "UPDATE job_items SET in_backoff = true, run_after = now() - CASE instance_id"
            " WHEN 'store-1' THEN interval '2 minutes' ELSE interval '1 minute' END"
        )
        conn.execute("ALTER TABLE job_items ENABLE TRIGGER job_items_mark_backoff")


async def test_the_promote_step_takes_a_bounded_batch_and_announces_each_store(
    database_url: str,
) -> None:
    with (
        psycopg.connect(database_url, autocommit=True) as conn,
        psycopg.connect(database_url, autocommit=True) as listener,
    ):
        insert_backlog(conn, stores=2, per_store=3)
        _flag_due_items(conn)
        conn.execute(
            "UPDATE job_items SET run_after = now() + interval '40 seconds'"
            " WHERE instance_id = 'store-2' AND product_id = 'p3'"
        )
        listener.execute("LISTEN job_items_ready")
        async with AsyncConnectionPool(database_url, min_size=1, max_size=2) as pool:
            passes = [await promote_due(pool, batch=3) for _ in range(3)]
        heard = heard_so_far(listener, conn, "job_items_ready")
        left = conn.execute(
            "SELECT product_id FROM job_items WHERE instance_id = 'store-2' AND in_backoff"
        ).fetchall()
    # Five due, three a pass: the earliest three (store-1's), then the other two, then none;
    # each pass says when the one still in backoff (40 s) is due, and its statement announced
    # its items' store once.
    assert [(p.locked, p.promoted) for p in passes] == [(True, 3), (True, 2), (True, 0)]
    assert all(p.next_due_in is not None and 35 < p.next_due_in <= 40 for p in passes)
    assert heard == ["store-1", "store-2"] and left == [("p3",)]


async def test_one_process_promotes_at_a_time(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        insert_backlog(conn, stores=1, per_store=2)
        _flag_due_items(conn)
        async with AsyncConnectionPool(database_url, min_size=1, max_size=2) as pool:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (PROMOTE_LOCK_KEY,))
                missed = await promote_due(pool)
            done = await promote_due(pool)
    assert missed == Promotion(locked=False, promoted=0, next_due_in=None)
    assert done == Promotion(locked=True, promoted=2, next_due_in=None)


def test_the_next_pass_is_timed_by_the_last_one_s_answer() -> None:
    idle = 30.0
    assert seconds_to_next_pass(Promotion(True, 0, 2.5), 100, idle) == 2.5
    assert seconds_to_next_pass(Promotion(True, 0, None), 100, idle) == idle
    assert seconds_to_next_pass(Promotion(True, 0, 90.0), 100, idle) == idle
    assert seconds_to_next_pass(Promotion(True, 100, 5.0), 100, idle) == 0.0  # more are due
    assert 0 < seconds_to_next_pass(Promotion(False, 0, None), 100, idle) < 1.0
