"""The job lifecycle against real PostgreSQL, real worker processes and the real stub: status,
cancel, retry and the `job_finished` notification."""

from __future__ import annotations

import signal
from datetime import datetime
from typing import Any

import anyio
import psycopg
import pytest

from listener import enqueue, lifecycle
from listener import items as items_db
from listener.db import open_pool
from listener.sqlfiles import queries
from listener.stub.server import StubConfig, run_stub
from tests.subscriber import subscribed
from tests.support import (
    communicate,
    insert_job,
    make_settings,
    query,
    query_blocking,
    run_listener,
    running_worker,
    spawn_worker,
    wait_until,
    workers_are_ready,
)

pytestmark = pytest.mark.anyio


def job_row(conninfo: str, job_id: int) -> tuple[Any, ...]:
    rows = query_blocking(
        conninfo,
        "SELECT status, started_at, completed_at, cancelled_at FROM jobs WHERE id = %s",
        (job_id,),
    )
    return rows[0]


def item_counts(conninfo: str, job_id: int) -> dict[str, int]:
    return dict(
        query_blocking(
            conninfo,
            "SELECT status, count(*) FROM job_items WHERE job_id = %s GROUP BY status",
            (job_id,),
        )
    )


async def cli(*args: str, conninfo: str) -> Any:
    """`listener ARGS` in a thread: the stub serving the workers runs on this event loop."""
    return await anyio.to_thread.run_sync(lambda: run_listener(*args, DATABASE_URL=conninfo))


async def test_a_job_goes_pending_processing_completed(database_url: str) -> None:
    products = [{"id": f"p{n}", "name": f"Product {n}"} for n in range(6)]
    job_id = enqueue(database_url, "store-life", products)
    assert job_row(database_url, job_id)[:3] == ("PENDING", None, None)
    async with run_stub(StubConfig(latency=0.3)) as stub, subscribed(database_url) as heard:
        settings = make_settings(stub.base_url, worker_concurrency=2)
        async with running_worker(database_url, settings):
            await wait_until(lambda: job_row(database_url, job_id)[0] != "PENDING")
            status, started_at, completed_at, _ = job_row(database_url, job_id)
            assert status == "PROCESSING" and started_at is not None and completed_at is None
            await heard.wait_for(1)
    status, started_at, completed_at, cancelled_at = job_row(database_url, job_id)
    assert status == "COMPLETED" and cancelled_at is None
    assert started_at <= completed_at
    (finished,) = heard.for_job(job_id)
    assert finished.payload == {
        "job_id": job_id,
        "instance_id": "store-life",
        "status": "COMPLETED",
        "completed": 6,
        "failed": 0,
        "cancelled": 0,
    }


async def test_cancel_while_items_are_in_flight_in_worker_processes(database_url: str) -> None:
    # Two worker processes, three items each in flight for 0.6 s: the 240 items would take 24 s,
    # so most are still to go when the cancel commits. Another store's job runs on untouched.
    async with run_stub(StubConfig(latency=0.6)) as stub, subscribed(database_url) as heard:
        procs = [
            spawn_worker(database_url, stub.base_url, WORKER_CONCURRENCY="3") for _ in range(2)
        ]
        try:
            await wait_until(lambda: workers_are_ready(database_url, procs))
            doomed = await insert_job(database_url, "store-doomed", 240)
            other = await insert_job(database_url, "store-other", 6)
            await wait_until(lambda: item_counts(database_url, doomed).get("COMPLETED", 0) >= 3)
            await wait_until(lambda: item_counts(database_url, doomed).get("PROCESSING", 0) >= 1)
            cancelled = await cli("cancel", str(doomed), conninfo=database_url)
            # The cancel has committed by now (its `cancelled_at` is when it began: a claim
            # that began after that but committed before the cancel did was in flight).
            ((committed_by,),) = await query(database_url, "SELECT clock_timestamp()")
            assert cancelled.returncode == 0, cancelled.stderr
            assert cancelled.stdout.startswith(f"job {doomed} cancelled: "), cancelled.stdout
            assert "in flight will finish" in cancelled.stdout
            await heard.wait_for(2)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            outputs = [await communicate(p, 30) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs

    status, _started, completed_at, cancelled_at = job_row(database_url, doomed)
    assert status == "CANCELLED" and completed_at >= cancelled_at
    counts = item_counts(database_url, doomed)
    assert set(counts) == {"COMPLETED", "CANCELLED"}, counts  # none lost, none pending
    assert sum(counts.values()) == 240
    # None started after the cancel committed: every item done was claimed before it, kept its
    # result, and OpenAI saw exactly the items that completed (both jobs').
    late: list[tuple[datetime, datetime]] = await query(
        database_url,
        "SELECT claimed_at, %s::timestamptz FROM job_items WHERE job_id = %s"
        " AND status = 'COMPLETED' AND (claimed_at > %s OR result IS NULL)",
        (committed_by, doomed, committed_by),
    )
    assert late == []
    assert await query(
        database_url,
        "SELECT count(*) FROM job_items WHERE job_id = %s AND status = 'CANCELLED'"
        " AND claimed_at IS NOT NULL",
        (doomed,),
    ) == [(0,)]
    assert stub.state.requests_total == counts["COMPLETED"] + 6
    assert item_counts(database_url, other) == {"COMPLETED": 6}
    (finished,) = heard.for_job(doomed)
    assert finished.payload["status"] == "CANCELLED"
    assert finished.payload["completed"] == counts["COMPLETED"]
    assert finished.payload["cancelled"] == counts["CANCELLED"]
    assert (finished.job_status, finished.ended) == ("CANCELLED", True)
    assert len(heard.for_job(other)) == 1

    again = await cli("cancel", str(doomed), conninfo=database_url)
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"job {doomed} had already ended (CANCELLED): nothing changed\n"
    assert item_counts(database_url, doomed) == counts


async def test_an_in_flight_item_that_fails_after_the_cancel_is_not_retried(
    database_url: str,
) -> None:
    # Both first requests hang past the client's timeout: their retry would put them back to
    # PENDING, but their job was cancelled meanwhile, so they end CANCELLED and never restart.
    config = StubConfig(timeout_next=2, hang_seconds=30)
    async with run_stub(config) as stub, subscribed(database_url) as heard:
        settings = make_settings(
            stub.base_url, worker_concurrency=2, openai_timeout_seconds=1.5, max_attempts=5
        )
        async with running_worker(database_url, settings):
            job_id = await insert_job(database_url, "store-hang", 8)
            await wait_until(lambda: item_counts(database_url, job_id).get("PROCESSING") == 2)
            answer = (await query(database_url, "SELECT listener_cancel_job(%s)", (job_id,)))[0][0]
            assert answer["changed"] and answer["in_flight"] == 2 and answer["cancelled"] == 6
            await heard.wait_for(1)
    assert item_counts(database_url, job_id) == {"CANCELLED": 8}
    assert stub.state.requests_total == 2
    assert heard.heard[0].payload["status"] == "CANCELLED"
    assert heard.heard[0].payload["cancelled"] == 8


async def test_cancel_and_retry_name_a_missing_job_in_one_line(database_url: str) -> None:
    for command in ("cancel", "retry"):
        result = await cli(command, "424242", conninfo=database_url)
        assert result.returncode == 1
        assert result.stderr == "listener: no job 424242\n"
    usage = await cli("cancel", conninfo=database_url)
    assert usage.returncode == 2


async def test_cancel_a_store_cancels_its_unfinished_jobs_only(database_url: str) -> None:
    async with subscribed(database_url) as heard:
        first = await insert_job(database_url, "store-gone", 3)
        second = await insert_job(database_url, "store-gone", 4)
        kept = await insert_job(database_url, "store-kept", 2)
        result = await cli("cancel", "--store", "store-gone", conninfo=database_url)
        assert result.returncode == 0, result.stderr
        assert result.stdout == (
            "store store-gone: 2 job(s) cancelled, 7 pending item(s) cancelled, "
            "0 in flight will finish\n"
        )
        await heard.wait_for(2)
    assert {h.payload["job_id"] for h in heard.heard} == {first, second}
    assert all(h.ended and h.job_status == "CANCELLED" for h in heard.heard)
    assert job_row(database_url, kept)[0] == "PENDING"
    assert item_counts(database_url, kept) == {"PENDING": 2}
    again = await cli("cancel", "--store", "store-gone", conninfo=database_url)
    assert again.stdout == "store store-gone: no unfinished job, nothing changed\n"
    # A finished, cancelled job is not reopened by a retry.
    retried = await cli("retry", str(first), conninfo=database_url)
    assert retried.stdout == f"job {first} was cancelled: nothing retried\n"


async def test_retry_after_failures_redoes_the_failed_items(database_url: str) -> None:
    async with run_stub(StubConfig()) as stub, subscribed(database_url) as heard:
        stub.state.config.fail_next_status.extend([400, 400])  # a 400 fails an item at once
        settings = make_settings(stub.base_url, worker_concurrency=1)
        async with running_worker(database_url, settings):
            job_id = await insert_job(database_url, "store-retry", 5)
            await heard.wait_for(1)
            assert heard.heard[0].payload["status"] == "COMPLETED_WITH_ERRORS"
            assert (heard.heard[0].payload["failed"], heard.heard[0].payload["completed"]) == (2, 3)
            errors = await query(
                database_url,
                "SELECT id, error, attempts FROM job_items WHERE job_id = %s AND status = 'FAILED'",
                (job_id,),
            )
            result = await cli("retry", str(job_id), conninfo=database_url)
            assert result.returncode == 0, result.stderr
            assert result.stdout == (
                f"job {job_id}: 2 FAILED item(s) back to PENDING, the job is PROCESSING\n"
            )
            # Served again like any store with work: the retry's NOTIFY wakes the worker.
            await heard.wait_for(2)
    assert heard.heard[1].payload["status"] == "COMPLETED"
    assert heard.heard[1].payload["completed"] == 5
    assert job_row(database_url, job_id)[0] == "COMPLETED"
    for item_id, error, attempts in errors:
        ((status, now_attempts, history),) = await query(
            database_url,
            "SELECT status, attempts, error_history FROM job_items WHERE id = %s",
            (item_id,),
        )
        assert (status, now_attempts) == ("COMPLETED", 1)
        assert len(history) == 1
        assert history[0]["error"] == error and history[0]["attempts"] == attempts
    nothing = await cli("retry", str(job_id), conninfo=database_url)
    assert nothing.stdout == f"job {job_id} has no FAILED item (COMPLETED): nothing changed\n"


async def test_retry_a_store_puts_back_every_failed_item(database_url: str) -> None:
    first = await insert_job(database_url, "store-r", 2)
    second = await insert_job(database_url, "store-r", 2)
    await query(
        database_url,
        "UPDATE job_items SET status = 'FAILED', error = 'boom', completed_at = now()"
        " WHERE job_id IN (%s, %s) AND product_id = 'p1' RETURNING id",
        (first, second),
    )
    result = await cli("retry", "--store", "store-r", conninfo=database_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "store store-r: 2 FAILED item(s) of 2 job(s) back to PENDING\n"
    assert item_counts(database_url, first) == {"PENDING": 2}
    assert await query(database_url, "SELECT DISTINCT status FROM jobs") == [("PROCESSING",)]


async def test_a_subscriber_hears_each_job_once_after_its_rows(database_url: str) -> None:
    async with run_stub(StubConfig(latency=0.02)) as stub, subscribed(database_url) as heard:
        settings = make_settings(stub.base_url, worker_concurrency=4)
        async with running_worker(database_url, settings):
            jobs = [await insert_job(database_url, f"store-{n % 3}", 1 + n % 4) for n in range(12)]
            # One more, cancelled before any worker could take all of it.
            jobs.append(await insert_job(database_url, "store-x", 200))
            await query(database_url, "SELECT listener_cancel_job(%s)", (jobs[-1],))
            await heard.wait_for(len(jobs))
            await heard.flush(database_url)  # a duplicate would have come before this
    assert sorted(h.payload["job_id"] for h in heard.heard) == sorted(jobs)
    for h in heard.heard:
        # The rows were there, final, and agreeing with the payload when it arrived.
        assert h.ended and h.job_status == h.payload["status"]
        expected = {
            status: h.payload[key]
            for status, key in (
                ("COMPLETED", "completed"),
                ("FAILED", "failed"),
                ("CANCELLED", "cancelled"),
            )
            if h.payload[key]
        }
        assert h.counts == expected, h
    assert heard.for_job(jobs[-1])[0].payload["status"] == "CANCELLED"


async def test_the_async_calls_for_the_http_app(database_url: str) -> None:
    job_id = await insert_job(database_url, "store-async", 2)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        answer = await lifecycle.call_async(conn, "cancel_job", {"job_id": job_id})
        assert lifecycle.describe_cancel(answer) == (
            f"job {job_id} cancelled: 2 pending item(s) cancelled; the job has ended"
        )
        with pytest.raises(lifecycle.NoSuchJob, match="no job 424242"):
            await lifecycle.call_async(conn, "retry_job", {"job_id": 424242})


def wait_for_lock(conninfo: str, pid: int) -> bool:
    rows = query_blocking(
        conninfo, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
    )
    return rows == [("Lock",)]


async def test_a_stale_look_does_not_close_a_job_a_retry_reopened(database_url: str) -> None:
    # The last in-flight item has just finished (one FAILED, one COMPLETED) and its worker's
    # "is the job done?" starts while a retry of the job is committing: it must not close it.
    job_id = await insert_job(database_url, "store-race", 2)
    await query(
        database_url,
        "UPDATE job_items SET status = CASE WHEN product_id = 'p1' THEN 'FAILED'"
        " ELSE 'COMPLETED' END, completed_at = now() WHERE job_id = %s RETURNING id",
        (job_id,),
    )
    with psycopg.connect(database_url) as retry, psycopg.connect(database_url) as finisher:
        retry.execute("SELECT listener_retry_job(%s)", (job_id,))  # open, holding the job
        pid = finisher.info.backend_pid
        statement = queries("items")["finish_jobs"]
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                anyio.to_thread.run_sync,
                lambda: finisher.execute(statement, {"job_ids": [job_id]}),
            )
            await wait_until(lambda: wait_for_lock(database_url, pid))
            retry.commit()
        finisher.commit()
    status, _started, completed_at, _cancelled = job_row(database_url, job_id)
    assert (status, completed_at) == ("PROCESSING", None)
    assert item_counts(database_url, job_id) == {"PENDING": 1, "COMPLETED": 1}


async def test_the_reapers_sweep_closes_a_job_left_open(database_url: str) -> None:
    job_id = await insert_job(database_url, "store-stranded", 2)
    open_job = await insert_job(database_url, "store-stranded", 2)
    await query(
        database_url,
        "UPDATE job_items SET status = 'COMPLETED', completed_at = now()"
        " WHERE job_id = %s RETURNING id",
        (job_id,),
    )
    async with subscribed(database_url) as heard:
        settings = make_settings("http://127.0.0.1:9/v1")
        pool = await open_pool(database_url, settings)
        try:
            assert (await items_db.close_stranded_jobs(pool)).closed == 1
            assert (await items_db.close_stranded_jobs(pool)).closed == 0
        finally:
            await pool.close()
        await heard.wait_for(1)
    assert heard.heard[0].payload["job_id"] == job_id
    assert job_row(database_url, job_id)[0] == "COMPLETED"
    assert job_row(database_url, open_job)[0] == "PENDING"


async def test_the_sweep_walks_the_open_jobs_a_chunk_at_a_time_one_process_at_a_time(
    database_url: str,
) -> None:
    # Ten open jobs; the eighth has every item finished. Chunks of three: 1-3, 4-6, then 7-9
    # closes it, 10 ends the walk and the next pass starts again from the first job.
    jobs = [await insert_job(database_url, "store-walk", 1) for _ in range(10)]
    stranded = jobs[7]
    await query(
        database_url,
        "UPDATE job_items SET status = 'FAILED', completed_at = now() WHERE job_id = %s",
        (stranded,),
    )
    pool = await open_pool(database_url, make_settings("http://127.0.0.1:9/v1"))
    try:
        sweeps = []
        after = 0
        for _ in range(5):
            sweep = await items_db.close_stranded_jobs(pool, after, chunk=3)
            sweeps.append((sweep.closed, sweep.judged))
            after = sweep.after
        assert sweeps == [(0, 3), (0, 3), (1, 3), (0, 1), (0, 3)]
        assert after == jobs[2]
        # Another process sweeping holds the lock: this one skips its pass and keeps its place.
        with psycopg.connect(database_url) as other:
            other.execute("SELECT pg_advisory_xact_lock(%s)", (items_db.STRANDED_LOCK_KEY,))
            busy = await items_db.close_stranded_jobs(pool, after, chunk=3)
        assert (busy.locked, busy.judged, busy.after) == (False, 0, after)
        # A random start (a process's first pass) still ends at the end and wraps round.
        first = await items_db.close_stranded_jobs(pool, -1, chunk=100)
        assert first.locked and first.after == 0
    finally:
        await pool.close()
    assert job_row(database_url, stranded)[0] == "COMPLETED_WITH_ERRORS"


async def test_two_finishers_of_a_jobs_last_items_end_it_at_once(database_url: str) -> None:
    # Two workers write a job's last two outcomes at the same moment. The first writes its
    # outcome and looks for open items (the other is still PROCESSING) but has not committed;
    # the second must wait for it and then end the job itself, not leave it to the reaper.
    job_id = await insert_job(database_url, "store-both", 2)
    # One connection: the one the second finisher waits on.
    settings = make_settings("http://127.0.0.1:9/v1", db_pool_min=1, db_pool_max=1)
    pool = await open_pool(database_url, settings)
    try:
        first = await items_db.claim(pool, "worker-a", ["store-both"], [1], 60.0, 100_000)
        second = await items_db.claim(pool, "worker-b", ["store-both"], [1], 60.0, 100_000)
        (item_a,), (item_b,) = first.items, second.items
        sql = queries("items")
        outcome_a = items_db.Outcome.completed(item_a, {"text": "a"})
        async with subscribed(database_url) as heard:
            with psycopg.connect(database_url) as writer_a:
                writer_a.execute(sql["lock_jobs_of_outcomes"], {"job_ids": [job_id]})
                params = items_db.outcome_params("worker-a", [outcome_a])
                writer_a.execute(sql["finish_items"], params)
                writer_a.execute(sql["finish_jobs"], {"job_ids": [job_id]})
                outcome_b = items_db.Outcome.completed(item_b, {"text": "b"})
                async with pool.connection() as conn:
                    pid_b = conn.info.backend_pid

                async def finish_b() -> None:
                    assert await items_db.finish(pool, "worker-b", [outcome_b]) == {item_b.id}

                async with anyio.create_task_group() as tg:
                    tg.start_soon(finish_b)
                    await wait_until(lambda: wait_for_lock(database_url, pid_b))
                    assert job_row(database_url, job_id)[2] is None
                    writer_a.commit()
            await heard.wait_for(1)
    finally:
        await pool.close()
    status, _started, completed_at, _cancelled = job_row(database_url, job_id)
    assert status == "COMPLETED" and completed_at is not None
    assert [h.payload["job_id"] for h in heard.heard] == [job_id]
