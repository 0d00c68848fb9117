"""The fair core end to end: real PostgreSQL, real worker, real openai client, real HTTP stub."""

from __future__ import annotations

import re
import signal
from collections import Counter, defaultdict

import pytest

from listener.stub.server import StubConfig, run_stub
from tests.support import (
    RecordingGenerator,
    communicate,
    insert_job,
    make_settings,
    query,
    running_worker,
    spawn_worker,
    starts_at_arrival,
    status_counts,
    wait_for_counts,
    wait_until,
    worker_is_ready,
    workers_are_ready,
)

pytestmark = pytest.mark.anyio


async def test_checklist_scenario_new_store_starts_within_one_free_slot(database_url: str) -> None:
    # Store A submits 100 items; while A is being processed, store B submits 50.
    async with run_stub(StubConfig(latency=0.1)) as stub:
        settings = make_settings(stub.base_url, worker_concurrency=4)
        handler = RecordingGenerator(settings)
        async with running_worker(database_url, settings, handler) as worker:
            b_arrived = starts_at_arrival(worker, handler, "store-B")
            await insert_job(database_url, "store-A", 100)
            await wait_until(lambda: len(handler.starts) >= 12)
            await insert_job(database_url, "store-B", 50)
            await wait_for_counts(database_url, lambda c: c.get("COMPLETED", 0) == 150)
            # Counted once the batch's commit has come back, which another session's read can
            # see before the worker does.
            await wait_until(lambda: worker.counters.completed == 150)
    after = [item.store for item in handler.starts[b_arrived[0] :]]
    first_b = after.index("store-B")
    # The old FIFO worker started B after A's remaining ~88 items; ours in the next free
    # slot once it knows of B: only items already handed to workers start before it.
    assert first_b < settings.worker_concurrency, after[:10]
    # And then the two stores take turns while both have work.
    window = after[first_b : first_b + 20]
    assert Counter(window)["store-B"] >= 9, window


async def test_three_hundred_stores_are_each_served_once_per_turn(database_url: str) -> None:
    # Three claims of 100 to a turn, 50 workers: enough to cross claims and batches. A thousand
    # stores are test_ring's (pure) and 10,000 the many_stores benchmark's.
    stores = 300
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(
            stub.base_url, worker_concurrency=50, claim_batch_size=100, max_per_instance=2
        )
        async with running_worker(database_url, settings):
            await query(
                database_url,
                "INSERT INTO jobs (instance_id) SELECT 'store-' || n FROM generate_series(1, %s) n",
                (stores,),
            )
            await query(
                database_url,
                "INSERT INTO job_items (job_id, instance_id, product_id, payload)"
                " SELECT j.id, j.instance_id, 'p' || n, jsonb_build_object('name', 'P' || n)"
                " FROM jobs j CROSS JOIN generate_series(1, 3) n",
            )
            # A bound against a hang, not a speed target: generous for a machine shared with others.
            await wait_for_counts(
                database_url,
                lambda c: c.get("COMPLETED", 0) == 3 * stores,
                deadline=120,
                every=0.5,
            )
            # 50 workers in flight, yet the process holds its pool plus the listener at most.
            ((connections,),) = await query(
                database_url,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name IN ('test-worker', 'listener-listen')",
            )
            assert 1 < connections <= settings.db_pool_max + 1
    rows = await query(
        database_url, "SELECT claimed_at, instance_id FROM job_items ORDER BY claimed_at, id"
    )
    per_claim: dict[object, Counter[str]] = defaultdict(Counter)
    for claimed_at, store in rows:
        per_claim[claimed_at][store] += 1
    assert max(max(c.values()) for c in per_claim.values()) <= 2
    # Round robin: the first 300 items started cover the 300 stores, each once.
    first_turn = [store for _at, store in rows[:stores]]
    assert len(set(first_turn)) == stores


async def test_items_inserted_while_the_listener_is_disconnected_are_picked_up(
    database_url: str,
) -> None:
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url)
        async with running_worker(database_url, settings) as worker:
            worker.listener.backoff.base = 1.0  # a window in which nobody listens
            pid = worker.listener.backend_pid
            await query(database_url, "SELECT pg_terminate_backend(%s)", (pid,))
            await wait_until(lambda: not worker.listener.connected)
            await insert_job(database_url, "store-while-away", 5)
            await wait_for_counts(database_url, lambda c: c.get("COMPLETED", 0) == 5)
            assert worker.listener.reconnects >= 1
            assert worker.listener.backend_pid != pid


async def test_failures_retry_fail_permanently_and_never_lose_items(database_url: str) -> None:
    async with run_stub(StubConfig()) as stub:
        stub.state.config.fail_next_status.extend([500, 503])
        settings = make_settings(stub.base_url, worker_concurrency=1, max_attempts=3)
        async with running_worker(database_url, settings):
            await insert_job(database_url, "store-R", 1)
            await insert_job(
                database_url, "store-bad", 2, payload=lambda n: [1, 2] if n == 1 else {}
            )
            await wait_for_counts(
                database_url,
                lambda c: sum(c.values()) == 3 and c.keys() <= {"COMPLETED", "FAILED"},
            )
    rows = {
        r[0]: r[1:]
        for r in await query(
            database_url,
            "SELECT instance_id || product_id, status, attempts, error,"
            " result->>'text' FROM job_items",
        )
    }
    status, attempts, _error, text = rows["store-Rp1"]
    assert (status, attempts) == ("COMPLETED", 3)
    assert "Product 1 of store-R" in text
    assert rows["store-badp1"][0] == "FAILED" and "JSON object" in rows["store-badp1"][2]
    assert rows["store-badp2"][0] == "FAILED" and "'name'" in rows["store-badp2"][2]
    jobs = dict(await query(database_url, "SELECT instance_id, status FROM jobs"))
    assert jobs == {"store-R": "COMPLETED", "store-bad": "COMPLETED_WITH_ERRORS"}


async def test_retries_end_in_failed_with_the_error_after_max_attempts(database_url: str) -> None:
    async with run_stub(StubConfig()) as stub:
        stub.state.config.fail_next_status.extend([500, 500])
        settings = make_settings(stub.base_url, worker_concurrency=1, max_attempts=2)
        async with running_worker(database_url, settings):
            await insert_job(database_url, "store-X", 1)
            await wait_for_counts(database_url, lambda c: c == {"FAILED": 1})
    ((attempts, error),) = await query(database_url, "SELECT attempts, error FROM job_items")
    assert attempts == 2
    assert "gave up after 2 attempt(s)" in error and "500" in error


async def test_two_worker_processes_share_the_work_and_never_claim_twice(
    database_url: str,
) -> None:
    async with run_stub(StubConfig(latency=0.02)) as stub:
        procs = [spawn_worker(database_url, stub.base_url) for _ in range(2)]
        try:
            await wait_until(lambda: workers_are_ready(database_url, procs))
            for n in range(10):
                await insert_job(database_url, f"store-{n}", 30)
            await wait_for_counts(database_url, lambda c: c.get("COMPLETED", 0) == 300, deadline=60)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            outputs = [await communicate(p, 30) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        assert stub.state.completed_total == 300  # each item sent to OpenAI exactly once
    assert await query(database_url, "SELECT max(attempts) FROM job_items") == [(1,)]
    by_worker = dict(
        await query(database_url, "SELECT claimed_by, count(*) FROM job_items GROUP BY 1")
    )
    assert len(by_worker) == 2 and min(by_worker.values()) > 0, by_worker
    for output in outputs:
        assert "[Worker] Starting background job worker..." in output
        assert "[Worker] OpenAI API key is configured" in output
        assert "[Worker] ✅ Initialized with" in output


async def test_a_killed_worker_s_items_come_back_after_the_lease(database_url: str) -> None:
    async with run_stub(StubConfig(latency=60)) as stub:
        doomed = spawn_worker(database_url, stub.base_url, LEASE_SECONDS="2")
        try:
            await wait_until(lambda: worker_is_ready(database_url, doomed.pid))
            await insert_job(database_url, "store-K", 6)
            await wait_for_counts(database_url, lambda c: c.get("PROCESSING", 0) == 4)
        finally:
            doomed.kill()  # SIGKILL: no goodbye, no release
            await communicate(doomed, 10)
        stub.state.config.latency = 0
        stub.state.release_hung()
        settings = make_settings(stub.base_url, lease_seconds=2)
        async with running_worker(database_url, settings) as rescuer:
            await wait_for_counts(database_url, lambda c: c == {"COMPLETED": 6})
            assert rescuer.counters.completed == 6
    attempts = sorted(r[0] for r in await query(database_url, "SELECT attempts FROM job_items"))
    assert attempts == [1, 1, 2, 2, 2, 2]  # the four in flight were tried again, once


async def test_sigterm_returns_unfinished_items_and_exits_zero(database_url: str) -> None:
    async with run_stub(StubConfig(latency=60)) as stub:
        proc = spawn_worker(database_url, stub.base_url, SHUTDOWN_GRACE_SECONDS="1")
        await wait_until(lambda: worker_is_ready(database_url, proc.pid))
        await insert_job(database_url, "store-T", 10)
        await wait_for_counts(database_url, lambda c: c.get("PROCESSING", 0) == 4)
        proc.send_signal(signal.SIGTERM)
        output = await communicate(proc, 15)
        stub.state.release_hung()
    assert proc.returncode == 0, output
    assert "grace period over: returning 4 item(s) to PENDING" in output
    assert await status_counts(database_url) == {"PENDING": 10}
    assert await query(database_url, "SELECT max(attempts), count(claimed_by) FROM job_items") == [
        (0, 0)
    ]
    assert await query(database_url, "SELECT count(*) FROM worker_heartbeats") == [(0,)]


async def test_sigterm_lets_in_flight_items_finish_within_the_grace_period(
    database_url: str,
) -> None:
    async with run_stub(StubConfig(latency=0.5)) as stub:
        proc = spawn_worker(database_url, stub.base_url, SHUTDOWN_GRACE_SECONDS="20")
        await wait_until(lambda: worker_is_ready(database_url, proc.pid))
        await insert_job(database_url, "store-G", 10)
        await wait_for_counts(database_url, lambda c: c.get("PROCESSING", 0) == 4)
        proc.send_signal(signal.SIGTERM)
        output = await communicate(proc, 15)
    assert proc.returncode == 0, output
    # The four seen in flight finish, and so does any a loaded machine let start before the
    # signal landed; the rest were never started: PENDING, their attempt untouched.
    counts = await status_counts(database_url)
    assert counts.keys() <= {"COMPLETED", "PENDING"} and sum(counts.values()) == 10, counts
    in_flight = int(re.findall(r"(\d+) item\(s\) in flight get", output)[0])
    assert counts["COMPLETED"] >= max(4, in_flight), (counts, in_flight)
    assert "grace period over" not in output, output
    assert stub.state.completed_total == counts["COMPLETED"]
    tried = "SELECT count(*) FROM job_items WHERE status = 'PENDING' AND attempts > 0"
    assert await query(database_url, tried) == [(0,)]


async def test_a_timed_out_call_is_retried(database_url: str) -> None:
    async with run_stub(StubConfig(hang_seconds=5)) as stub:
        stub.state.config.timeout_next = 1
        settings = make_settings(stub.base_url, worker_concurrency=1, openai_timeout_seconds=0.3)
        async with running_worker(database_url, settings) as worker:
            await insert_job(database_url, "store-slow", 1)
            await wait_for_counts(database_url, lambda c: c == {"COMPLETED": 1})
        stub.state.release_hung()
    # The hung call was retried; on a loaded machine the next one may outlast 0.3 s as well,
    # so the count is at least one, and every retry is one attempt more.
    assert worker.counters.retried >= 1
    assert await query(database_url, "SELECT attempts FROM job_items") == [
        (worker.counters.retried + 1,)
    ]


async def test_a_new_store_is_not_queued_behind_a_backlog_found_at_start(
    database_url: str,
) -> None:
    # 300 stores already have work when the worker starts: that is backlog, served in turns;
    # a store that arrives afterwards still gets the next free slot.
    await query(
        database_url,
        "INSERT INTO jobs (instance_id) SELECT 'old-' || n FROM generate_series(1, 300) n",
    )
    await query(
        database_url,
        "INSERT INTO job_items (job_id, instance_id, product_id, payload)"
        " SELECT j.id, j.instance_id, 'p' || n, jsonb_build_object('name', 'P' || n)"
        " FROM jobs j CROSS JOIN generate_series(1, 5) n",
    )
    async with run_stub(StubConfig(latency=0.02)) as stub:
        settings = make_settings(stub.base_url, rate_limit_rpm=3000, worker_concurrency=4)
        handler = RecordingGenerator(settings)
        async with running_worker(database_url, settings, handler) as worker:
            arrived = starts_at_arrival(worker, handler, "store-new")
            await wait_until(lambda: len(handler.starts) >= 10)
            await insert_job(database_url, "store-new", 3)
            await wait_until(lambda: any(i.store == "store-new" for i in handler.starts))
            after = [item.store for item in handler.starts[arrived[0] :]]
    assert after.index("store-new") < settings.worker_concurrency, after[:10]
