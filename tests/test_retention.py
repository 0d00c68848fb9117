"""Retention: finished jobs older than the cutoff go, with their items, in small batches; an
unfinished item never does, even while a worker runs."""

from __future__ import annotations

import signal
from contextlib import nullcontext
from datetime import timedelta

import anyio
import psycopg
import pytest

from listener import retention
from listener.stub.server import StubConfig, run_stub
from tests.subscriber import subscribed
from tests.support import (
    communicate,
    insert_job,
    query,
    run_listener,
    spawn_worker,
    wait_until,
    worker_is_ready,
)

pytestmark = pytest.mark.anyio


def finish(conninfo: str, job_id: int, days_ago: float, status: str = "COMPLETED") -> None:
    """A job that ended `days_ago` days ago."""
    query(
        conninfo,
        "WITH items AS (UPDATE job_items SET status = %s,"
        "  completed_at = now() - make_interval(days => %s) WHERE job_id = %s RETURNING 1)"
        " UPDATE jobs SET status = %s, completed_at = now() - make_interval(days => %s)"
        " WHERE id = %s RETURNING (SELECT count(*) FROM items)",
        (
            "FAILED" if status == "COMPLETED_WITH_ERRORS" else status,
            days_ago,
            job_id,
            status,
            days_ago,
            job_id,
        ),
    )


def remaining(conninfo: str) -> list[tuple[int, int]]:
    return query(
        conninfo,
        "SELECT j.id, count(i.id) FROM jobs j LEFT JOIN job_items i ON i.job_id = j.id"
        " GROUP BY j.id ORDER BY j.id",
    )


def test_ages() -> None:
    assert retention.parse_age("7d") == timedelta(days=7)
    assert retention.parse_age("12h") == timedelta(hours=12)
    assert retention.parse_age("0s") == timedelta(0)
    for bad in ("7", "d", "-1d", "7 days", "1.5d"):
        with pytest.raises(ValueError, match="is not an age"):
            retention.parse_age(bad)


def test_prune_deletes_only_finished_jobs_past_the_cutoff(database_url: str) -> None:
    old = insert_job(database_url, "s", 2500)  # more than one batch of items
    old_failed = insert_job(database_url, "s", 3)
    recent = insert_job(database_url, "s", 3)
    running = insert_job(database_url, "s", 3)
    finish(database_url, old, days_ago=10)
    finish(database_url, old_failed, days_ago=30, status="COMPLETED_WITH_ERRORS")
    finish(database_url, recent, days_ago=2)
    # Unfinished, with items long done: its items stay until the job ends.
    query(
        database_url,
        "UPDATE job_items SET status = 'COMPLETED', completed_at = now() - interval '90 days'"
        " WHERE job_id = %s AND product_id <> 'p1' RETURNING id",
        (running,),
    )
    dry = run_listener("prune", "--older-than", "7d", "--dry-run", DATABASE_URL=database_url)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == "would delete 2 job(s) and 2503 item(s) finished over 7d ago\n"
    assert len(remaining(database_url)) == 4
    done = run_listener("prune", "--older-than", "7d", DATABASE_URL=database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "deleted 2 job(s) and 2503 item(s) finished over 7d ago\n"
    assert remaining(database_url) == [(recent, 3), (running, 3)]


def test_prune_refuses_a_bad_age_in_one_line(database_url: str) -> None:
    result = run_listener("prune", "--older-than", "a week", DATABASE_URL=database_url)
    assert result.returncode == 2
    assert result.stderr == (
        "listener: invalid --older-than: 'a week' is not an age such as 7d, 12h, 30m, 90s or 2w\n"
    )


async def test_one_process_prunes_at_a_time(database_url: str) -> None:
    job = insert_job(database_url, "s", 2)
    finish(database_url, job, days_ago=30)
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (retention.ADVISORY_LOCK_KEY,))
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            pruned = await retention.prune(lambda: nullcontext(conn), timedelta(days=14))
        assert pruned.busy and pruned.batches == 0
        busy = await anyio.to_thread.run_sync(
            lambda: run_listener("prune", "--older-than", "14d", DATABASE_URL=database_url)
        )
        assert busy.returncode == 1
        assert busy.stderr == "listener: another process is pruning right now; try again later\n"
    assert remaining(database_url) == [(job, 2)]


async def test_the_workers_retention_service_prunes_old_jobs(database_url: str) -> None:
    old = insert_job(database_url, "s", 3)
    kept = insert_job(database_url, "s", 3)
    finish(database_url, old, days_ago=15)
    finish(database_url, kept, days_ago=13)
    async with (
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(retention.run_retention, lambda: nullcontext(conn), 14, 0.05, 0.0)
        await wait_until(lambda: len(remaining(database_url)) == 1)
        tg.cancel_scope.cancel()
    assert remaining(database_url) == [(kept, 3)]


async def test_prune_under_a_running_worker_loses_no_unfinished_item(database_url: str) -> None:
    # A worker process finishes 30 jobs of 8 items while the fleet's prune runs without pause
    # with a cutoff of 0 (every job deleted the moment it ends). Every job must still end with
    # all 8 items done: an item of an unfinished job deleted would be missing from the count.
    async with run_stub(StubConfig(latency=0.01)) as stub, subscribed(database_url) as heard:
        proc = spawn_worker(database_url, stub.base_url, WORKER_CONCURRENCY="4")
        try:
            await wait_until(lambda: worker_is_ready(database_url, proc.pid))
            jobs = [insert_job(database_url, f"store-{n % 5}", 8) for n in range(30)]
            pruned = retention.Pruned()
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
                while len(heard.heard) < len(jobs):
                    done = await retention.prune(
                        lambda: nullcontext(conn), timedelta(0), items=5, pause=0
                    )
                    pruned.jobs += done.jobs
                    pruned.items += done.items
                await heard.flush(database_url)
                done = await retention.prune(lambda: nullcontext(conn), timedelta(0))
                pruned.jobs += done.jobs
                pruned.items += done.items
        finally:
            proc.send_signal(signal.SIGTERM)
            output = await communicate(proc, 30)
        assert proc.returncode == 0, output
    assert sorted(h.payload["job_id"] for h in heard.heard) == jobs
    assert all(h.payload["completed"] == 8 for h in heard.heard), heard.heard
    assert (pruned.jobs, pruned.items) == (30, 240)
    assert remaining(database_url) == []
