"""The statistics watch: a worker session's cached claim plan, made while job_items was analyzed
empty, scans the whole table once a backlog lands; the watch's ANALYZE replaces it."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

from listener.db import open_pool, with_session_options
from listener.sqlfiles import queries
from listener.statistics import STALE_MIN_ROWS, StatisticsWatch, statistics_stale
from tests.support import insert_backlog, make_settings, query, running_worker, wait_until

pytestmark = pytest.mark.anyio

CLAIM_PARAMS: dict[str, Any] = {
    "stores": [f"store-{n}" for n in range(1, 31)],
    "limits": [1] * 30,
    "worker_id": "w",
    "lease_seconds": 60,
    "max_payload_bytes": 65_536,
    "announce": False,
    "kinds": ["product_description"],
    "lane": "openai",
}


@pytest.mark.parametrize(
    ("estimated", "live", "stale"),
    [
        (-1, 0, False),  # never analyzed, empty
        (-1, STALE_MIN_ROWS, True),  # never analyzed, a backlog
        (0, STALE_MIN_ROWS - 1, False),  # analyzed empty, too few rows to matter
        (0, 100_000, True),  # analyzed empty, a burst landed since
        (10_000, 100_000, False),  # 10x: autovacuum's business
        (9_999, 100_000, True),
        (1_000_000, 10, False),  # shrunk: plans stay index probes
    ],
)
def test_stale_means_far_more_live_rows_than_estimated(
    estimated: float, live: int, stale: bool
) -> None:
    assert statistics_stale(estimated, live) is stale


def _load(conn: psycopg.Connection[Any], stores: int, per_store: int) -> None:
    insert_backlog(conn, stores, per_store)
    # The inserts' counts reach the cumulative statistics now, not within the next seconds.
    conn.execute("SELECT pg_stat_force_next_flush()")


def _scans(node: dict[str, Any]) -> set[tuple[str, str]]:
    """(node type, index or table) of every scan of job_items in a plan."""
    found: set[tuple[str, str]] = set()
    if node.get("Relation Name") == "job_items" and node["Node Type"] != "ModifyTable":
        found.add((node["Node Type"], node.get("Index Name", "job_items")))
    for child in node.get("Plans", []):
        found |= _scans(child)
    return found


def _cached_claim_plan(conn: psycopg.Connection[Any]) -> set[tuple[str, str]]:
    """How the session's prepared claim reads job_items (psycopg prepared it on its sixth
    run: `prepare_threshold`, 5 runs before)."""
    row = conn.execute(
        "SELECT name FROM pg_prepared_statements WHERE statement LIKE %s",
        ("%FROM unflushed, unnest(%",),
    ).fetchone()
    assert row is not None, "the claim was not prepared"
    # The parameters in the order psycopg numbered them: their first appearance in the text.
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", queries("items")["claim"])))
    explain = sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE {}({})").format(
        sql.Identifier(row[0]),
        sql.SQL(", ").join(sql.Literal(CLAIM_PARAMS[name]) for name in names),
    )
    plan = conn.execute(explain).fetchone()
    assert plan is not None
    return _scans(plan[0][0]["Plan"])


async def test_a_plan_cached_on_an_empty_table_is_replaced_once_a_backlog_lands(
    database_url: str,
) -> None:
    settings = make_settings("http://127.0.0.1:9")
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("ANALYZE job_items")
        admin.execute("ANALYZE jobs")
        worker_session = psycopg.connect(
            with_session_options(database_url, settings), autocommit=True
        )
        with worker_session:
            for _ in range(6):
                worker_session.execute(queries("items")["claim"], CLAIM_PARAMS).fetchall()
            _load(admin, stores=30, per_store=100)
            # The premise: the cached plan scans the table it thought empty.
            assert ("Seq Scan", "job_items") in _cached_claim_plan(worker_session)

            pool = await open_pool(database_url, settings, name="statistics-test")
            async with pool:
                watch = StatisticsWatch(pool)
                analyzed = await watch.check()
                assert [(a.table, a.estimated_rows, a.live_rows) for a in analyzed] == [
                    ("job_items", 0, 3000)
                ]
                assert await watch.check() == []

            assert _cached_claim_plan(worker_session) == {
                ("Index Scan", "idx_job_items_pending"),
                ("Index Scan", "job_items_pkey"),
            }


async def test_a_table_another_session_holds_is_left_for_the_next_pass(
    database_url: str,
) -> None:
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("ANALYZE job_items")
        _load(admin, stores=10, per_store=200)
    pool = await open_pool(database_url, make_settings("http://127.0.0.1:9"), name="watch")
    async with pool:
        watch = StatisticsWatch(pool)
        # What a running VACUUM holds: the ANALYZE neither waits for it nor fails.
        with psycopg.connect(database_url) as vacuum_like:
            vacuum_like.execute("LOCK TABLE job_items IN SHARE UPDATE EXCLUSIVE MODE")
            assert await watch.check() == []
        assert [a.table for a in await watch.check()] == ["job_items"]


async def test_a_role_that_may_not_analyze_is_warned_once(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    role = f"listener_reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("ANALYZE job_items")
        _load(admin, stores=10, per_store=200)
        admin.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        try:
            reader_url = psycopg.conninfo.make_conninfo(database_url, options=f"-c role={role}")
            pool = await open_pool(reader_url, make_settings("http://127.0.0.1:9"), name="reader")
            async with pool:
                watch = StatisticsWatch(pool)
                with caplog.at_level(logging.WARNING, logger="listener.worker"):
                    assert await watch.check() == []
                    assert await watch.check() == []
        finally:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        "[DB] job_items statistics are stale (estimated 0 rows, 2000 live) and this role may not"
    )


async def test_a_worker_started_into_a_backlog_behind_empty_statistics_analyzes_it(
    database_url: str,
) -> None:
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("ANALYZE job_items")
        # Paused, so the worker leaves the items where they are: only its reaper acts.
        admin.execute("INSERT INTO stores (instance_id, paused) VALUES ('store-1', true)")
        _load(admin, stores=1, per_store=2000)

    async def estimated() -> float:
        rows = await query(
            database_url, "SELECT reltuples FROM pg_class WHERE oid = 'job_items'::regclass"
        )
        return float(rows[0][0])

    async def analyzed() -> bool:
        return await estimated() == 2000

    assert await estimated() == 0
    # Leases of an hour: the reaper's next pass is 10 s away, past the wait's bound (3 s x
    # SLACK), so only its pass at start can meet it.
    settings = make_settings("http://127.0.0.1:9", lease_seconds=3600)
    async with running_worker(database_url, settings):
        await wait_until(analyzed, deadline=3)
