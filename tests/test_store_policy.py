"""Store policy end to end: priorities, weights, caps and pause, against the real PostgreSQL,
real worker processes where the claim crosses processes, the real openai client and the stub."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import datetime

import anyio
import anyio.to_thread
import psycopg
import pytest

from listener.dispatch import CLAIMS_IN_FLIGHT
from listener.stub.server import StubConfig, run_stub
from tests.support import (
    RecordingGenerator,
    WorkerProcess,
    communicate,
    insert_job,
    insert_job_blocking,
    make_settings,
    query,
    query_blocking,
    run_listener,
    running_worker,
    spawn_worker,
    status_counts,
    wait_for_counts,
    wait_until,
    workers_are_ready,
)

pytestmark = pytest.mark.anyio


def execute(conninfo: str, sql: str, params: tuple[object, ...] = ()) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql, params)  # type: ignore[arg-type]


def changed_at(conninfo: str, store: str) -> datetime:
    """When the CLI's change of the store was made (its commit follows within milliseconds)."""
    ((at,),) = query_blocking(
        conninfo, "SELECT updated_at FROM stores WHERE instance_id = %s", (store,)
    )
    return at  # type: ignore[no-any-return]


async def cli(*args: str, conninfo: str) -> subprocess.CompletedProcess[str]:
    """`listener ARGS` in a thread: the stub the workers call runs on this event loop."""
    return await anyio.to_thread.run_sync(lambda: run_listener(*args, DATABASE_URL=conninfo))


# Async: the stub the worker processes call runs on the test's event loop, which a blocking
# query polled every 50 ms would stall (and with it every call the workers make).
async def starts_of(conninfo: str, store: str) -> list[datetime]:
    rows = await query(
        conninfo,
        "SELECT claimed_at FROM job_items WHERE instance_id = %s AND claimed_at IS NOT NULL"
        " ORDER BY claimed_at",
        (store,),
    )
    return [row[0] for row in rows]


async def start_count(conninfo: str, store: str) -> int:
    ((count,),) = await query(
        conninfo,
        "SELECT count(*) FROM job_items WHERE instance_id = %s AND claimed_at IS NOT NULL",
        (store,),
    )
    return int(count)


async def at_least(count: Awaitable[int], least: int) -> bool:
    return await count >= least


async def started_since(conninfo: str, store: str, moment: datetime) -> bool:
    ((started,),) = await query(
        conninfo,
        "SELECT count(*) > 0 FROM job_items WHERE instance_id = %s AND claimed_at > %s",
        (store, moment),
    )
    return bool(started)


@asynccontextmanager
async def worker_processes(
    conninfo: str, base_url: str, count: int, **env: str
) -> AsyncIterator[list[WorkerProcess]]:
    procs = [spawn_worker(conninfo, base_url, **env) for _ in range(count)]
    try:
        await wait_until(lambda: workers_are_ready(conninfo, procs))
        yield procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        outputs = [await communicate(proc, 30) for proc in procs]
    assert [p.returncode for p in procs] == [0] * count, outputs


# -- priority ------------------------------------------------------------------------------


async def test_a_click_is_its_store_s_next_item_and_takes_nobody_else_s_turn(
    database_url: str,
) -> None:
    async with run_stub(StubConfig(latency=0.02)) as stub:
        settings = make_settings(stub.base_url, worker_concurrency=1)
        handler = RecordingGenerator(settings)
        async with running_worker(database_url, settings, handler):
            await insert_job(database_url, "bulk", 300)
            await insert_job(database_url, "other", 300)
            await wait_until(lambda: len(handler.starts) >= 20)
            with psycopg.connect(database_url) as conn:
                row = conn.execute(
                    "INSERT INTO jobs (instance_id, priority) VALUES ('bulk', 10) RETURNING id"
                ).fetchone()
                assert row is not None
                conn.execute(
                    "INSERT INTO job_items (job_id, instance_id, product_id, payload)"
                    " VALUES (%s, 'bulk', 'click', '{\"name\": \"the clicked product\"}')",
                    row,
                )
            clicked_at = len(handler.starts)
            await wait_until(lambda: any(i.product_id == "click" for i in handler.starts))
            await wait_until(lambda: len(handler.starts) >= clicked_at + 20)
    after = handler.starts[clicked_at:]
    bulk = [item.product_id for item in after if item.store == "bulk"]
    # The very next item of its store (one more may have been claimed as the click committed).
    assert "click" in bulk[:2], bulk[:5]
    # And the turns between the stores are what they were: alternating, no extra turn for bulk.
    stores = [item.store for item in after[:20]]
    assert abs(Counter(stores)["bulk"] - Counter(stores)["other"]) <= 2, stores


# -- weights -------------------------------------------------------------------------------


async def test_weights_share_the_starts_and_a_change_acts_at_once(database_url: str) -> None:
    execute(database_url, "INSERT INTO stores (instance_id, weight) VALUES ('heavy', 3)")
    async with run_stub(StubConfig(latency=0.01)) as stub:
        settings = make_settings(stub.base_url, worker_concurrency=1)
        handler = RecordingGenerator(settings)
        async with running_worker(database_url, settings, handler):
            await insert_job(database_url, "heavy", 400)
            await insert_job(database_url, "light", 400)
            await wait_until(lambda: len(handler.starts) >= 120)
            execute(database_url, "UPDATE stores SET weight = 1 WHERE instance_id = 'heavy'")
            changed_at = len(handler.starts)
            await wait_until(lambda: len(handler.starts) >= changed_at + 110)
    # Skip the first turn (both stores are fresh) and a few starts around the change.
    before = Counter(item.store for item in handler.starts[10:110])
    after = Counter(item.store for item in handler.starts[changed_at + 10 : changed_at + 110])
    assert 70 <= before["heavy"] <= 80, before  # 3 : 1
    assert 45 <= after["heavy"] <= 55, after  # 1 : 1


# -- pause ---------------------------------------------------------------------------------


async def test_pause_stops_a_store_in_every_process_and_resume_starts_it_again(
    database_url: str,
) -> None:
    async with (
        run_stub(StubConfig(latency=0.05)) as stub,
        worker_processes(database_url, stub.base_url, 2) as _procs,
    ):
        await insert_job(database_url, "paused", 2000)
        await insert_job(database_url, "busy", 2000)
        await wait_until(lambda: at_least(start_count(database_url, "paused"), 20))
        result = await cli("store", "pause", "paused", conninfo=database_url)
        assert result.returncode == 0, result.stderr
        paused_at = changed_at(database_url, "paused")
        busy_before = await start_count(database_url, "busy")
        await wait_until(lambda: at_least(start_count(database_url, "busy"), busy_before + 100))
        late = [t for t in await starts_of(database_url, "paused") if t > paused_at]
        # Items in flight finish; nothing of the store starts later than 1 s after the pause.
        assert all((t - paused_at).total_seconds() < 1.0 for t in late), late
        assert await query(
            database_url,
            "SELECT count(*) FROM job_items WHERE instance_id = 'paused' AND status = 'PROCESSING'",
        ) == [(0,)]
        result = await cli("store", "resume", "paused", conninfo=database_url)
        assert result.returncode == 0, result.stderr
        resumed_at = changed_at(database_url, "paused")
        await wait_until(lambda: started_since(database_url, "paused", resumed_at))
        first = min(t for t in await starts_of(database_url, "paused") if t > resumed_at)
        assert (first - resumed_at).total_seconds() < 1.0
    # Its backlog is intact: paused, not lost.
    counts = dict(
        await query(
            database_url,
            "SELECT status, count(*) FROM job_items WHERE instance_id = 'paused' GROUP BY 1",
        )
    )
    assert sum(counts.values()) == 2000 and "FAILED" not in counts


# -- caps, fleet-wide ----------------------------------------------------------------------


async def test_max_in_flight_holds_across_processes(database_url: str) -> None:
    execute(database_url, "INSERT INTO stores (instance_id, max_in_flight) VALUES ('capped', 3)")
    async with (
        run_stub(StubConfig(latency=0.2)) as stub,
        worker_processes(database_url, stub.base_url, 2, WORKER_CONCURRENCY="6") as _procs,
    ):
        await insert_job(database_url, "capped", 200)
        await insert_job(database_url, "free", 200)
        samples: list[int] = []
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            ((count,),) = await query(
                database_url,
                "SELECT count(*) FROM job_items"
                " WHERE instance_id = 'capped' AND status = 'PROCESSING'",
            )
            samples.append(int(count))
            # Sampling, not waiting: the stub serving both processes runs on this loop.
            await anyio.sleep(0.01)
        free_done = await status_counts(database_url)
    assert max(samples) == 3, Counter(samples)  # reached, never passed
    # The budget it cannot use goes to the other store: 12 workers, 3 of them for "capped".
    capped = await start_count(database_url, "capped")
    free = await start_count(database_url, "free")
    assert free > 2 * capped, (capped, free, free_done)


async def test_rpm_limit_holds_across_processes(database_url: str) -> None:
    execute(database_url, "INSERT INTO stores (instance_id, rpm_limit) VALUES ('capped', 120)")
    async with (
        run_stub(StubConfig(latency=0.01)) as stub,
        worker_processes(database_url, stub.base_url, 2) as _procs,
    ):
        await insert_job(database_url, "capped", 200)
        await insert_job(database_url, "free", 2000)
        started = time.monotonic()
        await wait_until(lambda: at_least(start_count(database_url, "capped"), 12), deadline=20)
        elapsed = time.monotonic() - started
    starts = await starts_of(database_url, "capped")
    step = 60.5 / 120  # the GCRA's step: (60 s + 0.5 s tolerance) / rpm_limit
    # Any n + 1 consecutive starts span at least n steps less the tolerance: so no 60 s window
    # ever holds more than rpm_limit, whichever process started them.
    for i, first in enumerate(starts):
        for j in range(i + 1, len(starts)):
            assert (starts[j] - first).total_seconds() >= (j - i) * step - 0.5 - 1e-6
    assert elapsed >= 11 * step - 0.5 - 0.2  # without the cap, 12 items take milliseconds
    workers = await query(
        database_url, "SELECT DISTINCT claimed_by FROM job_items WHERE claimed_by IS NOT NULL"
    )
    assert len(workers) == 2  # both processes were claiming all along


# -- defect 5: items in backoff --------------------------------------------------------------


async def test_a_store_whose_items_are_all_in_backoff_waits_outside_the_ring(
    database_url: str,
) -> None:
    await insert_job(database_url, "later", 3)
    execute(database_url, "UPDATE job_items SET run_after = now() + interval '1.5 seconds'")
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url, worker_concurrency=2)
        async with running_worker(database_url, settings) as worker:
            # Found by the start-up scan, but not due: no ring entry, no claim, no slot.
            assert "later" not in worker.dispatcher.ring
            assert worker.dispatcher.claims == 0
            await wait_for_counts(database_url, lambda counts: counts == {"COMPLETED": 3})
            # Woken when due: at most a claim per item, plus those that find the store empty
            # (a claim that gets its whole quota cannot tell; two may be on their way), none
            # before.
            assert worker.dispatcher.claims <= 3 + CLAIMS_IN_FLIGHT
    ((early,),) = await query(
        database_url, "SELECT count(*) FROM job_items WHERE claimed_at < run_after"
    )
    assert early == 0


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "constraint"),
    [
        ("INSERT INTO stores (instance_id, weight) VALUES ('s', 0)", "stores_weight_range"),
        ("INSERT INTO stores (instance_id, weight) VALUES ('s', -1)", "stores_weight_range"),
        (
            "INSERT INTO stores (instance_id, weight) VALUES ('s', 1000000000)",
            "stores_weight_range",
        ),
        (
            "INSERT INTO stores (instance_id, rpm_limit) VALUES ('s', -1)",
            "stores_rpm_limit_positive",
        ),
        (
            "INSERT INTO stores (instance_id, max_in_flight) VALUES ('s', 0)",
            "stores_max_in_flight_positive",
        ),
        ("INSERT INTO stores (instance_id) VALUES (' ')", "stores_instance_id_valid"),
        ("INSERT INTO jobs (instance_id, priority) VALUES ('s', 101)", "jobs_priority_range"),
    ],
)
def test_sql_writers_get_a_named_constraint(database_url: str, sql: str, constraint: str) -> None:
    with (
        psycopg.connect(database_url) as conn,
        pytest.raises(psycopg.errors.CheckViolation) as error,
    ):
        conn.execute(sql)
    assert error.value.diag.constraint_name == constraint


def test_an_item_priority_out_of_range_is_refused_by_name(database_url: str) -> None:
    job = insert_job_blocking(database_url, "s", 0)
    with (
        psycopg.connect(database_url) as conn,
        pytest.raises(psycopg.errors.CheckViolation) as error,
    ):
        conn.execute(
            "INSERT INTO job_items (job_id, instance_id, priority) VALUES (%s, 's', -101)", (job,)
        )
    assert error.value.diag.constraint_name == "job_items_priority_range"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("store", "set", "s", "--weight", "0"), "weight"),
        (("store", "set", "s", "--weight", "-1"), "weight"),
        (("store", "set", "s", "--weight", "1.5"), "weight"),
        (("store", "set", "s", "--weight", "x"), "weight"),
        (("store", "set", "s", "--weight", "1000000000"), "weight"),
        (("store", "set", "s", "--rpm", "-1"), "rpm"),
        (("store", "set", "s", "--max-in-flight", "0"), "max-in-flight"),
        (("enqueue", "--store", "s", "--products", "1", "--priority", "101"), "priority"),
    ],
)
def test_the_cli_refuses_a_bad_value_in_one_line_naming_it(
    database_url: str, args: tuple[str, ...], field: str
) -> None:
    result = run_listener(*args, DATABASE_URL=database_url)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"invalid {field} " in lines[0], result.stderr
    assert query_blocking(database_url, "SELECT count(*) FROM stores") == [(0,)]
    assert query_blocking(database_url, "SELECT count(*) FROM jobs") == [(0,)]


def test_store_set_show_and_removing_the_row_restores_the_defaults(database_url: str) -> None:
    insert_job_blocking(database_url, "shop", 5)
    result = run_listener(
        "store",
        "set",
        "shop",
        "--weight",
        "4",
        "--rpm",
        "60",
        "--max-in-flight",
        "3",
        DATABASE_URL=database_url,
    )
    assert result.returncode == 0, result.stderr
    assert query_blocking(
        database_url, "SELECT weight, rpm_limit, max_in_flight, paused FROM stores"
    ) == [(4, 60, 3, False)]
    result = run_listener("store", "set", "shop", "--rpm", "none", DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    assert query_blocking(database_url, "SELECT weight, rpm_limit, max_in_flight FROM stores") == [
        (4, None, 3)
    ]
    shown = run_listener("store", "show", "shop", DATABASE_URL=database_url)
    assert shown.returncode == 0, shown.stderr
    # store, weight, rpm, max in flight, paused, backlog, in flight, last minute (then the
    # costs, narrowed by the terminal's width)
    assert _cells(shown.stdout, "shop")[:8] == ["shop", "4", "-", "3", "no", "5", "0", "0"]
    execute(database_url, "DELETE FROM stores")
    shown = run_listener("store", "show", "shop", DATABASE_URL=database_url)
    assert _cells(shown.stdout, "shop")[:8] == ["shop", "1", "-", "-", "no", "5", "0", "0"]


def _cells(table: str, store: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")]
        if len(cells) > 2 and cells[1] == store:
            return cells[1:-1]
    raise AssertionError(table)
