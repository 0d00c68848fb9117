"""A worker process always ends, with 0, and hands back what it holds: whatever fails at its
start-up, and whatever claim is still on its way when SIGTERM comes.

Real worker processes, the real stub; a lock held by the test's own connection is what keeps a
statement waiting, as a migration would.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from random import Random
from typing import Any

import anyio
import psycopg
import pytest

from listener.complete import Completer
from listener.db import open_pool
from listener.items import Outcome
from listener.stub.server import StubConfig, run_stub
from tests.support import (
    WorkerProcess,
    communicate,
    insert_job,
    make_settings,
    query,
    read_lines_until,
    spawn_worker,
    status_counts,
    wait_for_counts,
    wait_until,
)

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def table_locked(conninfo: str, mode: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """`LOCK TABLE job_items IN <mode> MODE` in a transaction left open until the block ends."""
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        await conn.execute(f"LOCK TABLE job_items IN {mode} MODE")  # the test's own constant
        yield conn


async def waiting_on_a_lock(conninfo: str, application_name: str) -> bool:
    rows = await query(
        conninfo,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s AND wait_event_type = 'Lock'",
        (application_name,),
    )
    return int(rows[0][0]) > 0


async def finish(proc: WorkerProcess, seconds: float = 20) -> str:
    """SIGTERM, then the process's output; one that does not end in time is killed, and fails."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await communicate(proc, seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        output = await communicate(proc, 10)
        raise AssertionError(f"the worker ignored SIGTERM for {seconds} s:\n{output}") from None


async def test_a_failed_start_up_count_neither_stops_the_work_nor_the_exit(
    database_url: str,
) -> None:
    # A failover at start-up: the pool's connection dies between the listener's ring and the
    # first count. The count is only a log line; the worker must work, and exit on SIGTERM.
    await insert_job(database_url, "store-S", 3)
    async with run_stub(StubConfig()) as stub:
        async with table_locked(database_url, "ACCESS EXCLUSIVE"):
            # One pooled connection, opened before the listener's rebuild, which the lock holds.
            proc = spawn_worker(
                database_url,
                stub.base_url,
                DB_POOL_MIN="1",
                DB_POOL_MAX="1",
                DB_LOCK_TIMEOUT_SECONDS="30",
            )
            try:
                await wait_until(lambda: waiting_on_a_lock(database_url, "listener-listen"))
                await query(
                    database_url,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = 'listener-worker'",
                )
            except BaseException:
                await finish(proc)
                raise
        # The lock is gone: the ring is built, then the count meets the dead connection.
        try:
            await wait_for_counts(database_url, lambda c: c == {"COMPLETED": 3})
        finally:
            output = await finish(proc)
    assert proc.returncode == 0, output
    assert "[Worker] could not count the pending items at start" in output, output
    assert "Traceback" not in output, output


async def test_sigterm_during_a_start_up_held_by_a_lock_exits_zero_at_once(
    database_url: str,
) -> None:
    async with (
        run_stub(StubConfig()) as stub,
        table_locked(database_url, "ACCESS EXCLUSIVE"),
    ):
        proc = spawn_worker(
            database_url,
            stub.base_url,
            DB_LOCK_TIMEOUT_SECONDS="30",
        )
        try:
            await wait_until(lambda: waiting_on_a_lock(database_url, "listener-listen"))
        finally:
            output = await finish(proc, seconds=10)  # the lock is still held meanwhile
    assert proc.returncode == 0, output
    assert "[Worker] SIGTERM received" in output, output
    assert "Traceback" not in output, output


async def test_a_claim_that_returns_after_sigterm_gives_its_items_back(database_url: str) -> None:
    # The claim waits on a lock (SHARE: reads pass, the claim's UPDATE waits); SIGTERM comes;
    # then the lock goes and the claim returns its items to a worker that is shutting down.
    # One pooled connection: the claim holds it, so nothing else can hurry the exit along.
    await insert_job(database_url, "store-C", 3)
    async with run_stub(StubConfig()) as stub:
        async with table_locked(database_url, "SHARE"):
            proc = spawn_worker(
                database_url,
                stub.base_url,
                DB_POOL_MAX="1",
                DB_LOCK_TIMEOUT_SECONDS="30",
            )
            try:
                await wait_until(lambda: waiting_on_a_lock(database_url, "listener-worker"))
                proc.send_signal(signal.SIGTERM)
                await read_lines_until(
                    proc, lambda lines: any("[Worker] stopping" in line for line in lines)
                )
            except BaseException:
                await finish(proc)
                raise
        output = await finish(proc)
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output
    # Handed back at once, the attempt given back: not left PROCESSING until a lease expires.
    assert await status_counts(database_url) == {"PENDING": 3}
    held = "SELECT max(attempts), count(claimed_by), count(lease_expires_at) FROM job_items"
    assert await query(database_url, held) == [(0, 0, 0)]


async def test_an_outcome_after_the_completer_closed_is_left_to_its_lease(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Only a claim that outlives the shutdown's give-up can come back so late: logged, left to
    # the item's lease, and no ClosedResourceError takes the worker's exit down with it.
    settings = make_settings("http://127.0.0.1:9/v1")
    pool = await open_pool(database_url, settings, name="test-completer")
    try:
        completer = Completer(pool, "worker-x", lambda _written, _superseded: None, Random(1))
        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.run, done)
            completer.close(give_up_after=1.0)
            completer.emit(Outcome(item_id=7, status="PENDING", refund=True))
        assert done.is_set()
    finally:
        await pool.close()
    assert "item 7 came back after the outcomes were closed" in caplog.text
