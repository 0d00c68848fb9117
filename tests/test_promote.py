"""Items waiting out a backoff: out of the claim's range (job_items.in_backoff, set by the writers
that put an item in backoff) until the promote step puts them back at their due time and
announces their store."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from listener import items as items_db
from listener.announced import retire_drained
from listener.handler import DEFAULT_KIND
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
            # The claimer retires a store its claim found drained: its next ready item (this
            # one, when the promote step puts it back) announces it again.
            retired = await retire_drained(pool, ["store-R"], [DEFAULT_KIND])
            assert retired.retired == ["store-R"]
            await listener.execute("LISTEN job_items_ready")
            promoter.due_in(0.3)  # what the worker does once the retry is written
            heard = None
            passed = promoter.passed
            async for notify in listener.notifies(timeout=10 * SLACK, stop_after=1):
                heard = notify.payload
            # The notification arrives at the pass's commit, before the pass is counted.
            with anyio.fail_after(10 * SLACK):
                while promoter.promoted == 0:
                    await passed.wait()
                    passed = promoter.passed
            services.cancel_scope.cancel()
        assert heard == "store-R"
        (again,) = await _claim(pool, "store-R")
    assert (again.id, again.attempts) == (item.id, 2)
    ((on_time, flag),) = await query(
        database_url, "SELECT claimed_at >= run_after, in_backoff FROM job_items"
    )
    assert on_time and not flag
    # A pass at start, then one at the item's due time (two if the first came a hair early):
    # no polling between.
    assert promoter.promoted == 1 and 2 <= promoter.passes <= 3


def _flags(conn: psycopg.Connection[Any]) -> dict[str, tuple[str, bool]]:
    rows = conn.execute("SELECT product_id, status, in_backoff FROM job_items").fetchall()
    return {str(product): (str(status), bool(flag)) for product, status, flag in rows}


async def test_the_writers_that_put_an_item_in_backoff_flag_it(database_url: str) -> None:
    await insert_job(database_url, "store-W", 5)
    async with AsyncConnectionPool(database_url, min_size=1, max_size=2) as pool:
        items = {item.product_id: item for item in await _claim(pool, "store-W")}
        await items_db.finish(
            pool,
            "w",
            [
                Outcome.retry(items["p1"], "HTTP 500", delay=60.0),
                Outcome.release(items["p2"], "HTTP 429", delay=30.0),
                Outcome.release(items["p3"]),  # shutting down: due at once, its place kept
                Outcome.failed(items["p4"], "bad payload"),
            ],
        )
        # p5's worker died: the reaper gives it back, due now.
        await query(
            database_url,
            "UPDATE job_items SET lease_expires_at = now() - interval '1 second'"
            " WHERE product_id = 'p5'",
        )
        await items_db.reap_expired(pool, max_attempts=5)
    with psycopg.connect(database_url, autocommit=True) as conn:
        # An insert dated later waits like a retry (the insert trigger); one due now does not.
        conn.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id, run_after)"
            " SELECT id, instance_id, 'later', now() + interval '1 hour' FROM jobs"
            " UNION ALL SELECT id, instance_id, 'now', now() FROM jobs"
        )
        flags = _flags(conn)
    assert flags == {
        "p1": ("PENDING", True),
        "p2": ("PENDING", True),
        "p3": ("PENDING", False),
        "p4": ("FAILED", False),
        "p5": ("PENDING", False),
        "later": ("PENDING", True),
        "now": ("PENDING", False),
    }


def test_an_item_an_operator_dates_later_is_claimed_when_due_only(database_url: str) -> None:
    # The rare path left unflagged: the claim reads past it until due, never takes it early.
    with psycopg.connect(database_url, autocommit=True) as conn:
        insert_backlog(conn, stores=1, per_store=2)
        conn.execute(
            "UPDATE job_items SET run_after = now() + interval '1 hour' WHERE product_id = 'p1'"
        )
        with conn.transaction(force_rollback=True):
            claimed = conn.execute(
                "SELECT product_id FROM job_items WHERE id IN ("
                " SELECT id FROM job_items WHERE instance_id = 'store-1' AND status = 'PENDING'"
                " AND NOT in_backoff AND run_after <= now() ORDER BY priority DESC, run_after, id"
                " LIMIT 5)"
            ).fetchall()
        flags = _flags(conn)
    assert claimed == [("p2",)]
    assert flags == {"p1": ("PENDING", False), "p2": ("PENDING", False)}


def _flag_due_items(conn: psycopg.Connection[Any]) -> None:
    """Every item in backoff, due a minute ago (store-1's two): what a retry's backoff becomes
    once it ends, without waiting for the time to pass."""
    conn.execute(
        "UPDATE job_items SET in_backoff = true, run_after = now() - CASE instance_id"
        " WHEN 'store-1' THEN interval '2 minutes' ELSE interval '1 minute' END"
    )


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
            # Found drained by the claimers (every item in backoff): no longer announced.
            await retire_drained(pool, ["store-1", "store-2"], [DEFAULT_KIND])
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


async def test_a_promoted_item_of_another_kind_wakes_the_processes_serving_it(
    database_url: str,
) -> None:
    with (
        psycopg.connect(database_url, autocommit=True) as conn,
        psycopg.connect(database_url, autocommit=True) as listener,
    ):
        conn.execute("INSERT INTO jobs (instance_id, kind) VALUES ('store-K', 'summary')")
        conn.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id)"
            " SELECT id, instance_id, 'p1' FROM jobs"
        )
        conn.execute("UPDATE job_items SET in_backoff = true, run_after = now()")
        listener.execute("LISTEN job_items_ready")
        async with AsyncConnectionPool(database_url, min_size=1, max_size=1) as pool:
            await retire_drained(pool, ["store-K"], ["summary"])
            promotion = await promote_due(pool)
        heard = heard_so_far(listener, conn, "job_items_ready")
    assert promotion.promoted == 1 and heard == ["store-K\x1fsummary"]
