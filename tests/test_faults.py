"""Faults production brings, each survived with nothing lost and each outcome written once.

Real worker processes, the real PostgreSQL and the real stub; an audit trigger (`support.
install_write_audit`) records every write of a final outcome, so "done twice" is visible.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator

import anyio
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pytest_postgresql.janitor import DatabaseJanitor

from listener.migrate import MigrationRunner
from listener.stub.server import StubConfig, run_stub
from tests.conftest import Server
from tests.support import (
    WorkerProcess,
    communicate,
    insert_job,
    install_write_audit,
    item_ids,
    make_settings,
    outcome_writes,
    query,
    read_lines_until,
    running_worker,
    spawn_worker,
    status_counts,
    wait_for_counts,
    wait_until,
    worker_is_ready,
    workers_are_ready,
)

pytestmark = pytest.mark.anyio


async def in_flight_of(conninfo: str, pid: int) -> int:
    """Items a worker process holds now (its id is host:pid:random)."""
    rows = await query(
        conninfo,
        "SELECT count(*) FROM job_items WHERE status = 'PROCESSING' AND claimed_by LIKE %s",
        (f"%:{pid}:%",),
    )
    return int(rows[0][0])


async def completed(conninfo: str) -> int:
    return (await status_counts(conninfo)).get("COMPLETED", 0)


async def completed_at_least(conninfo: str, count: int) -> bool:
    return await completed(conninfo) >= count


async def completed_exactly(conninfo: str, count: int) -> bool:
    return await completed(conninfo) == count


async def assert_each_outcome_written_once(conninfo: str) -> None:
    writes = await outcome_writes(conninfo)
    assert set(writes) == await item_ids(conninfo)
    doubled = {item: count for item, count in writes.items() if count != 1}
    assert not doubled, f"outcomes written more than once: {doubled}"


async def stop(procs: list[WorkerProcess]) -> list[str]:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    return [await communicate(proc, 40) for proc in procs]


async def test_a_worker_killed_mid_batch_loses_nothing_and_writes_each_outcome_once(
    database_url: str,
) -> None:
    await install_write_audit(database_url)
    async with run_stub(StubConfig(latency=0.2)) as stub:
        procs = [spawn_worker(database_url, stub.base_url, LEASE_SECONDS="2") for _ in range(2)]
        doomed = procs[0]
        try:
            await wait_until(lambda: workers_are_ready(database_url, procs))
            for n in range(5):
                await insert_job(database_url, f"store-{n}", 40)

            async def doomed_is_busy() -> bool:
                return (
                    await completed(database_url) >= 20
                    and await in_flight_of(database_url, doomed.pid) >= 2
                )

            await wait_until(doomed_is_busy)
            doomed.kill()  # SIGKILL: no release, no goodbye; its calls are cut mid-flight
            await communicate(doomed, 10)
            await wait_until(lambda: completed_exactly(database_url, 200), deadline=90)
        finally:
            outputs = await stop(procs)
    assert procs[1].returncode == 0, outputs[1]
    assert doomed.returncode == -signal.SIGKILL
    assert "[Reaper] returned" in outputs[1]
    await assert_each_outcome_written_once(database_url)
    # Only items a worker held were tried again: the killed one's (at most its 4 in flight), and
    # on a loaded machine possibly some of the survivor's, if a 2 s lease lapsed before renewal.
    ((again,),) = await query(database_url, "SELECT count(*) FROM job_items WHERE attempts > 1")
    assert 1 <= again <= 2 * 4


async def test_connections_cut_three_times_mid_run_the_worker_recovers_by_itself(
    database_url: str,
) -> None:
    # pg_terminate_backend of every connection is what a database restart or a failover does
    # to a client: the pool, the listener, the shared limiter and the completer all see it.
    await install_write_audit(database_url)
    async with run_stub(StubConfig(latency=0.02)) as stub:
        proc = spawn_worker(database_url, stub.base_url, RATE_LIMIT_RPM="60000")
        try:
            await wait_until(lambda: worker_is_ready(database_url, proc.pid))
            for store in ("a", "b", "c", "d"):
                await insert_job(database_url, f"store-{store}", 50)
            for cut in range(3):
                await wait_until(lambda cut=cut: completed_at_least(database_url, 40 * (cut + 1)))
                await query(
                    database_url,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                # Work that arrives while the listener is down or reconnecting.
                await insert_job(database_url, f"late-{cut}", 5)
            await wait_until(lambda: completed_exactly(database_url, 215), deadline=90)

            async def listener_is_back() -> bool:
                rows = await query(
                    database_url,
                    "SELECT listener_connected FROM worker_heartbeats WHERE pid = %s",
                    (proc.pid,),
                )
                return rows == [(True,)]

            await wait_until(listener_is_back)
        finally:
            (output,) = await stop([proc])
    assert proc.returncode == 0, output
    assert output.count("[Listener] connection lost or refused") >= 3, output
    assert "Traceback" not in output, output
    await assert_each_outcome_written_once(database_url)
    assert await query(database_url, "SELECT count(*) FROM jobs WHERE status = 'COMPLETED'") == [
        (7,)
    ]


@pytest.fixture
def own_server() -> Iterator[tuple[str, Callable[[], None]]]:
    """A PostgreSQL server of this test's own (pgserver), migrated, and a way to restart it:
    the machine's server is shared and must not be restarted under the other tests."""
    import tempfile
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import pgserver
        from pgserver._commands import pg_ctl

    # Not tmp_path: pgserver runs the server as its own user, who cannot enter pytest's 0700 dirs.
    with tempfile.TemporaryDirectory(prefix="listener-restart-") as data_dir:
        server = pgserver.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
        uri = str(server.get_uri())
        MigrationRunner(uri, output=lambda _line: None).up()

        def restart() -> None:
            # -m fast: every session is cut at once, as in a crash-free restart or a failover.
            pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user)

        try:
            yield uri, restart
        finally:
            server.cleanup()


async def test_a_real_postgres_restart_mid_run_loses_nothing(
    own_server: tuple[str, Callable[[], None]],
) -> None:
    conninfo, restart = own_server
    await install_write_audit(conninfo)
    async with run_stub(StubConfig(latency=0.02)) as stub:
        procs = [spawn_worker(conninfo, stub.base_url, RATE_LIMIT_RPM="60000") for _ in range(2)]
        try:
            await wait_until(lambda: workers_are_ready(conninfo, procs))
            for store in ("a", "b", "c", "d"):
                await insert_job(conninfo, f"store-{store}", 50)
            await wait_until(lambda: completed_at_least(conninfo, 40))
            await anyio.to_thread.run_sync(restart)
            await insert_job(conninfo, "store-after", 10)  # work that arrives after the restart
            await wait_until(lambda: completed_exactly(conninfo, 210), deadline=90)
        finally:
            outputs = await stop(procs)
    assert [p.returncode for p in procs] == [0, 0], outputs
    for output in outputs:
        assert "[Listener] connection lost or refused" in output, output
        assert "Traceback" not in output, output
    await assert_each_outcome_written_once(conninfo)
    assert await query(conninfo, "SELECT count(*) FROM jobs WHERE status = 'COMPLETED'") == [(5,)]


async def test_openai_misbehaving_in_every_way_never_stalls_the_worker(database_url: str) -> None:
    await install_write_audit(database_url)
    async with run_stub(StubConfig(hang_seconds=30)) as stub:
        faults = stub.state.config
        faults.fail_next_status.extend([429] * 12 + [500, 502, 503, 504] * 3)
        faults.timeout_next = 4  # hung connections: accepted, never answered
        faults.malformed_next = 6  # a 200 whose JSON is cut short
        settings = make_settings(
            stub.base_url, worker_concurrency=4, openai_timeout_seconds=0.5, max_attempts=10
        )
        async with running_worker(database_url, settings) as worker:
            for store in ("x", "y", "z"):
                await insert_job(database_url, f"store-{store}", 20)
            await wait_until(lambda: completed_exactly(database_url, 60), deadline=120)
        stub.state.release_hung()
    assert stub.state.errors_injected_total == 12 + 12 + 4 + 6
    assert worker.counters.rate_limited == 12
    # 5xx, timeouts and malformed answers used an attempt each; the 429s used none. A loaded
    # machine may let a healthy call outlast the 0.5 s timeout too: at least these, then.
    assert worker.counters.retried >= 12 + 4 + 6
    ((attempts,),) = await query(database_url, "SELECT sum(attempts - 1) FROM job_items")
    assert attempts == worker.counters.retried
    await assert_each_outcome_written_once(database_url)


async def test_an_api_that_only_hangs_fails_items_with_the_reason_after_the_attempt_limit(
    database_url: str,
) -> None:
    async with run_stub(StubConfig(hang_seconds=30)) as stub:
        stub.state.config.timeout_next = 1_000
        settings = make_settings(
            stub.base_url, worker_concurrency=2, openai_timeout_seconds=0.3, max_attempts=3
        )
        async with running_worker(database_url, settings):
            await insert_job(database_url, "store-hung", 2)
            await wait_for_counts(database_url, lambda c: c == {"FAILED": 2}, deadline=60)
        stub.state.release_hung()
    for attempts, error in await query(database_url, "SELECT attempts, error FROM job_items"):
        assert attempts == 3
        assert error == "gave up after 3 attempt(s): OpenAI request timed out"


async def test_a_frozen_worker_that_wakes_after_its_lease_cannot_overwrite_anything(
    database_url: str,
) -> None:
    # SIGSTOP: a paused VM, a long GC, a laptop lid. The lease expires, another worker does the
    # items; when the frozen one resumes, its late answers and lease renewals are fenced off.
    await install_write_audit(database_url)
    async with run_stub(StubConfig(latency=1.0)) as stub:
        frozen = spawn_worker(database_url, stub.base_url, LEASE_SECONDS="2")
        try:
            await wait_until(lambda: worker_is_ready(database_url, frozen.pid))
            await insert_job(database_url, "store-F", 4)

            async def frozen_holds_all() -> bool:
                return await in_flight_of(database_url, frozen.pid) == 4

            await wait_until(frozen_holds_all)
            frozen.send_signal(signal.SIGSTOP)
            stub.state.config.latency = 0
            settings = make_settings(stub.base_url, lease_seconds=2)
            async with running_worker(database_url, settings) as rescuer:
                await wait_until(lambda: completed_exactly(database_url, 4), deadline=30)
                frozen.send_signal(signal.SIGCONT)
                # Its four calls now return, late: their outcomes must be refused.
                lines = await read_lines_until(
                    frozen, lambda lines: any("outcome(s) not written" in ln for ln in lines)
                )
        finally:
            frozen.send_signal(signal.SIGCONT)
            (output,) = await stop([frozen])
    assert frozen.returncode == 0, output
    assert "outcome(s) not written: their leases had expired" in "".join(lines)
    assert "0 completed, 0 failed, 0 retried, 0 released, 4 superseded" in output
    await assert_each_outcome_written_once(database_url)
    owners = await query(database_url, "SELECT DISTINCT claimed_by FROM job_items")
    assert owners == [(rescuer.worker_id,)]


async def test_overlapping_deploys_lose_nothing_and_do_nothing_twice(database_url: str) -> None:
    # A platform deploy: the new version starts, then the old one gets SIGTERM and finishes
    # or releases its in-flight items within its grace period.
    await install_write_audit(database_url)
    async with run_stub(StubConfig(latency=0.05)) as stub:
        old = spawn_worker(database_url, stub.base_url, SHUTDOWN_GRACE_SECONDS="20")
        procs = [old]
        try:
            await wait_until(lambda: worker_is_ready(database_url, old.pid))
            for n in range(10):
                await insert_job(database_url, f"store-{n}", 30)
            await wait_until(lambda: completed_at_least(database_url, 50))
            new = spawn_worker(database_url, stub.base_url)
            procs.append(new)
            await wait_until(lambda: worker_is_ready(database_url, new.pid))
            # Work the old one cannot finish before its SIGTERM lands, however slowly the new
            # one started: so the new one surely takes over some.
            await insert_job(database_url, "store-late", 40)
            old.send_signal(signal.SIGTERM)
            old_output = await communicate(old, 40)
            await wait_until(lambda: completed_exactly(database_url, 340), deadline=90)
        finally:
            outputs = await stop(procs)
        assert stub.state.completed_total == 340  # each item sent to OpenAI exactly once
    assert old.returncode == 0, old_output
    assert procs[1].returncode == 0, outputs[1]
    assert "[Worker] SIGTERM received" in old_output
    await assert_each_outcome_written_once(database_url)
    assert await query(database_url, "SELECT max(attempts) FROM job_items") == [(1,)]
    by_worker = dict(
        await query(database_url, "SELECT claimed_by, count(*) FROM job_items GROUP BY 1")
    )
    assert len(by_worker) == 2, by_worker


async def test_an_unreachable_database_is_retried_with_backoff_until_it_appears(
    pg_server: Server, migrated_template: str
) -> None:
    # The worker starts before its database exists (a deploy racing the database's creation):
    # one clear line per attempt, growing delays, no traceback; then it works.
    name = f"listener_late_{os.getpid()}"
    conninfo = pg_server.conninfo(name)
    janitor = DatabaseJanitor(
        user=pg_server.user,
        host=pg_server.host,
        port=pg_server.port,
        dbname=name,
        template_dbname=migrated_template,
    )
    async with run_stub(StubConfig()) as stub:
        proc = spawn_worker(conninfo, stub.base_url)
        try:
            lines = await read_lines_until(
                proc, lambda lines: sum("database unreachable" in ln for ln in lines) >= 2
            )
            janitor.init()
            await insert_job(conninfo, "store-late", 3)
            await wait_for_counts(conninfo, lambda c: c == {"COMPLETED": 3}, deadline=60)
        finally:
            (output,) = await stop([proc])
            janitor.drop()
    assert proc.returncode == 0, output
    unreachable = [line for line in lines if "database unreachable" in line]
    assert f'database "{name}" does not exist' in unreachable[0]
    assert "(attempt 1)" in unreachable[0] and "(attempt 2)" in unreachable[1]
    assert "retrying in" in unreachable[0]
    assert "Traceback" not in "".join(lines) + output
    assert "[DB] database reachable after" in output


async def test_sigterm_while_waiting_for_the_database_exits_zero_at_once() -> None:
    closed_port = make_conninfo(
        **{**conninfo_to_dict("host=127.0.0.1 dbname=x user=postgres"), "port": "9"}
    )
    proc = spawn_worker(closed_port, "http://127.0.0.1:9/v1")
    await read_lines_until(proc, lambda lines: any("retrying in" in ln for ln in lines))
    proc.send_signal(signal.SIGTERM)
    output = await communicate(proc, 10)
    assert proc.returncode == 0, output
    assert "Connection refused" in output
    assert "Traceback" not in output
