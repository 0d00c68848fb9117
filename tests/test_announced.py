"""A store is announced once (`announced_stores`): its producers' later commits send no NOTIFY
until a claimer finds it drained and retires it. Nothing may be missed on the way: a store
retired is announced again, a producer committing during a retirement is found by it, a row
nobody retired (a worker stopped, an older worker) is cleared by the listener. And a claim that
writes outcomes tells the fleet what it served after its commit, not in it."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from listener.items import Outcome, claim
from listener.sqlfiles import queries
from listener.stub.server import StubConfig, run_stub
from tests.support import (
    heard_so_far,
    insert_job,
    insert_job_blocking,
    make_settings,
    query,
    running_worker,
    status_counts,
    wait_for_counts,
    wait_until,
)

KINDS = ["product_description"]
STORE = "store-1"


def _claim_all(conn: psycopg.Connection[Any], store: str = STORE) -> list[tuple[Any, ...]]:
    """A claimer's claim of every due item of `store`; the items it got."""
    params = {
        "stores": [store],
        "limits": [1000],
        "worker_id": "w1",
        "lease_seconds": 60,
        "max_payload_bytes": 65_536,
        "announce": False,
        "kinds": KINDS,
        "lane": "openai",
    }
    return [row for row in conn.execute(queries("items")["claim"], params) if row[0] is not None]


def _retire(conn: psycopg.Connection[Any], store: str = STORE) -> str:
    """What the claimer's retirement (`retire_drained`) answers for `store`."""
    rows = conn.execute(
        queries("items")["retire_drained"], {"stores": [store], "kinds": KINDS}
    ).fetchall()
    assert [row[0] for row in rows] == [store]
    return str(rows[0][1])


def _announced(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute("SELECT instance_id FROM announced_stores ORDER BY 1").fetchall()
    return [str(row[0]) for row in rows]


def test_a_store_is_announced_once_then_again_once_a_claimer_retired_it(
    database_url: str,
) -> None:
    with (
        psycopg.connect(database_url, autocommit=True) as listener,
        psycopg.connect(database_url, autocommit=True) as conn,
    ):
        listener.execute("LISTEN job_items_ready")
        insert_job_blocking(database_url, STORE, 2)
        assert heard_so_far(listener, conn, "job_items_ready") == [STORE]
        # Announced already: the next jobs' commits take no notify lock.
        insert_job_blocking(database_url, STORE, 1)
        insert_job_blocking(database_url, STORE, 1)
        assert heard_so_far(listener, conn, "job_items_ready") == []
        assert len(_claim_all(conn)) == 4
        assert _retire(conn) == "retired"
        assert _announced(conn) == []
        insert_job_blocking(database_url, STORE, 1)
        assert heard_so_far(listener, conn, "job_items_ready") == [STORE]
        assert _announced(conn) == [STORE]


def test_a_producer_committing_during_a_retirement_is_found_by_it(database_url: str) -> None:
    with (
        psycopg.connect(database_url, autocommit=True) as listener,
        psycopg.connect(database_url, autocommit=True) as claimer,
        psycopg.connect(database_url) as producer,
    ):
        listener.execute("LISTEN job_items_ready")
        job = insert_job_blocking(database_url, STORE, 1)
        assert len(_claim_all(claimer)) == 1
        assert heard_so_far(listener, claimer, "job_items_ready") == [STORE]
        # 1. The producer has looked at the row (the store is announced: it sends nothing) and
        # not committed yet when the claim finds the store empty. The retirement must not
        # delete the row on the claim's word: the producer's item would then be announced by
        # nobody.
        producer.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id) VALUES (%s, %s, 'late-1')",
            (job, STORE),
        )
        assert _claim_all(claimer) == []
        assert _retire(claimer) == "busy"
        producer.commit()
        assert heard_so_far(listener, claimer, "job_items_ready") == []
        assert _announced(claimer) == [STORE]
        # Looked at again (the dispatcher does it RETIRE_BUSY_SECONDS later): the item is seen.
        assert _retire(claimer) == "pending"
        assert [row[3] for row in _claim_all(claimer)] == ["late-1"]
        # 2. The producer commits between the claim that found the store empty and the
        # retirement: the retirement's own look (a later snapshot) finds its item.
        assert _claim_all(claimer) == []
        producer.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id) VALUES (%s, %s, 'late-2')",
            (job, STORE),
        )
        producer.commit()
        assert _retire(claimer) == "pending"
        assert _announced(claimer) == [STORE]
        assert [row[3] for row in _claim_all(claimer)] == ["late-2"]
        # 3. A producer after a retirement finds no row, and announces the store.
        assert _retire(claimer) == "retired"
        producer.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id) VALUES (%s, %s, 'late-3')",
            (job, STORE),
        )
        producer.commit()
        assert heard_so_far(listener, claimer, "job_items_ready") == [STORE]


def test_a_repeatable_read_producer_may_meet_a_row_announced_after_its_snapshot(
    database_url: str,
) -> None:
    # ON CONFLICT DO NOTHING refuses a conflicting row that a REPEATABLE READ snapshot cannot
    # see with a serialization failure: the trigger takes it as "announced already".
    job = insert_job_blocking(database_url, "store-0", 1)
    with (
        psycopg.connect(database_url) as producer,
        psycopg.connect(database_url, autocommit=True) as other,
    ):
        producer.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        producer.execute("SELECT count(*) FROM job_items").fetchone()  # its snapshot, now
        other.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id) VALUES (%s, %s, 'a')",
            (job, STORE),
        )
        producer.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id) VALUES (%s, %s, 'b'),"
            " (%s, 'store-2', 'c')",
            (job, STORE, job),
        )
        producer.commit()
        assert _announced(other) == ["store-0", STORE, "store-2"]


async def _none_announced(conninfo: str) -> bool:
    return await query(conninfo, "SELECT 1 FROM announced_stores") == []


@pytest.mark.anyio
async def test_a_drained_store_s_next_jobs_start_without_the_sweep(database_url: str) -> None:
    # The sweep is 300 s away (make_settings): only a notification can bring these jobs in.
    async with run_stub(StubConfig(latency=0.01)) as stub:
        settings = make_settings(stub.base_url, worker_concurrency=2)
        async with running_worker(database_url, settings) as worker:
            await insert_job(database_url, STORE, 3)
            await wait_for_counts(database_url, lambda c: c.get("COMPLETED", 0) == 3)
            # Right away, while the claimer may be retiring the store: announced again, or
            # found by the retirement.
            await insert_job(database_url, STORE, 2)
            await wait_for_counts(database_url, lambda c: c.get("COMPLETED", 0) == 5)
            # And once the claimer has retired it (the claim after the last item came back
            # empty): announced again.
            await wait_until(lambda: _none_announced(database_url))
            assert worker.dispatcher.retirements >= 1
            await insert_job(database_url, STORE, 1)
            await wait_for_counts(database_url, lambda c: c.get("COMPLETED", 0) == 6)
    assert await status_counts(database_url) == {"COMPLETED": 6}


@pytest.mark.anyio
async def test_a_worker_clears_announced_stores_nobody_retired(database_url: str) -> None:
    # An older worker (or one stopped between a claim and its retirement) finished the store's
    # items and left its row: its next items would be announced by nobody.
    await insert_job(database_url, STORE, 2)
    await query(database_url, "UPDATE job_items SET status = 'COMPLETED'")
    assert await query(database_url, "SELECT instance_id FROM announced_stores") == [(STORE,)]
    async with run_stub(StubConfig(latency=0.01)) as stub:
        settings = make_settings(stub.base_url, worker_concurrency=2)
        async with running_worker(database_url, settings) as worker:
            await insert_job(database_url, STORE, 1)
            await wait_for_counts(database_url, lambda c: c.get("COMPLETED", 0) == 3)
            assert worker.listener.stale_retired == 1


@pytest.mark.anyio
async def test_a_claim_that_writes_outcomes_announces_what_it_served_after_its_commit(
    database_url: str,
) -> None:
    # In the claim's transaction, `stores_served` would hold the notify lock through the
    # outcomes' WAL flush; sent after the commit, the fleet hears the same.
    await insert_job(database_url, STORE, 3)
    async with AsyncConnectionPool(
        database_url, min_size=1, max_size=2, kwargs={"autocommit": True}
    ) as pool:
        first = await claim(pool, "w1", [STORE], [1], 60, 65_536, announce=True, lane="openai")
        [item] = first.items
        with psycopg.connect(database_url, autocommit=True) as listener:
            listener.execute("LISTEN stores_served")
            second = await claim(
                pool,
                "w1",
                [STORE],
                [2],
                60,
                65_536,
                announce=True,
                outcomes=[Outcome.completed(item, {"text": "done"})],
                lane="openai",
            )
            with psycopg.connect(database_url, autocommit=True) as conn:
                heard = await anyio.to_thread.run_sync(
                    heard_so_far, listener, conn, "stores_served"
                )
    assert second.written == {item.id} and len(second.items) == 2
    assert heard == [f"w1\x1f{STORE}\x1f2\x1fopenai"]
