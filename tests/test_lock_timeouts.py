"""The worker's statements give up on a lock after DB_LOCK_TIMEOUT_SECONDS: a migration holding
job_items makes claims fail, log one line and retry, and nothing is lost or charged an attempt.
"""

from __future__ import annotations

import logging

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from listener.db import open_pool
from listener.stub.server import StubConfig, run_stub
from tests.support import (
    make_settings,
    query,
    running_worker,
    wait_for_counts,
    wait_until,
)

pytestmark = pytest.mark.anyio


async def test_a_claim_blocked_by_a_migration_s_lock_gives_up_retries_and_loses_nothing(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="listener")
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url, db_lock_timeout_seconds=0.2)
        async with running_worker(database_url, settings) as worker:
            # What `ALTER TABLE job_items …` does for its whole length, from another connection.
            # The job is written in the same transaction: it becomes visible when the lock goes.
            async with await psycopg.AsyncConnection.connect(database_url) as migration:
                await migration.execute("LOCK TABLE job_items IN ACCESS EXCLUSIVE MODE")
                cursor = await migration.execute(
                    "INSERT INTO jobs (instance_id) VALUES ('store-L') RETURNING id"
                )
                row = await cursor.fetchone()
                assert row is not None
                await migration.execute(
                    "INSERT INTO job_items (job_id, instance_id, product_id, payload)"
                    " SELECT %s, 'store-L', 'p' || n, jsonb_build_object('name', 'P' || n)"
                    " FROM generate_series(1, 5) n",
                    (row[0],),
                )
                # A notification from elsewhere sends the worker to claim while the lock holds.
                await query(database_url, "SELECT pg_notify('job_items_ready', 'store-L')")

                def gave_up() -> bool:
                    return any("lock timeout" in r.getMessage() for r in claim_failures(caplog))

                await wait_until(gave_up, deadline=20)
                assert "store-L" in list(worker.dispatcher.ring)  # its turn is kept
            await wait_for_counts(database_url, lambda c: c == {"COMPLETED": 5})
    for record in claim_failures(caplog):
        assert "\n" not in record.getMessage()
        assert record.getMessage().startswith("[Worker] claim failed, retrying: claim failed: ")
    assert await query(database_url, "SELECT max(attempts) FROM job_items") == [(1,)]


def claim_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "claim failed" in r.getMessage()]


async def test_the_worker_s_sessions_carry_the_timeouts_and_keep_the_url_s_options(
    database_url: str,
) -> None:
    # An operator's own options (a search_path, a role setting) must survive ours.
    conninfo = make_conninfo(database_url, options="-c application_name=x -c work_mem=8MB")
    settings = make_settings(
        "http://127.0.0.1:9/v1", db_lock_timeout_seconds=1.5, db_statement_timeout_seconds=42
    )
    pool = await open_pool(conninfo, settings, name="test-timeouts")
    try:
        async with pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'),"
                " current_setting('work_mem')"
            )
            assert await cursor.fetchone() == ("1500ms", "42s", "8MB")
    finally:
        await pool.close()
    async with running_worker(database_url, settings) as worker:
        ((lock, statement),) = await query(
            database_url,
            "SELECT current_setting('lock_timeout'), current_setting('statement_timeout')",
        )
        assert (lock, statement) != ("1500ms", "42s")  # a session of the test's own: untouched
        listener = await psycopg.AsyncConnection.connect(worker.listener.conninfo)
        async with listener:
            cursor = await listener.execute("SHOW lock_timeout")
            assert await cursor.fetchone() == ("1500ms",)
