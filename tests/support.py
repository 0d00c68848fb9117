"""Helpers shared by the tests that run real workers against the real stub."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psycopg

from listener import assembly
from listener.assembly import served_app
from listener.dispatch import Dispatcher
from listener.handler import App, Handler, Item
from listener.settings import Settings, load_settings
from listener.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
# Every deadline a test gives (a wait, a process's exit) is a bound against a hang, sized for an
# idle machine; it is stretched this much, so a machine shared with other work (a CI runner, two
# cores running several suites) is slow, not failing. Speed is measured in bench/, never here.
SLACK = 3.0


async def insert_job(
    conninfo: str, store: str, count: int, payload: Callable[[int], Any] | None = None
) -> int:
    """What a client does: one job, its items in one statement; returns the job id."""
    make = payload or (lambda n: {"name": f"Product {n} of {store}", "price": n})
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        cursor = await conn.execute(
            "INSERT INTO jobs (instance_id) VALUES (%s) RETURNING id", (store,)
        )
        row = await cursor.fetchone()
        assert row is not None
        job_id = int(row[0])
        await conn.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id, payload)"
            " SELECT %s, %s, 'p' || n, (%s::jsonb)->(n - 1)"
            " FROM generate_series(1, %s) n",
            (job_id, store, json.dumps([make(n) for n in range(1, count + 1)]), count),
        )
    return job_id


def insert_job_blocking(
    conninfo: str, store: str, count: int, payload: Callable[[int], Any] | None = None
) -> int:
    """`insert_job` for plain (not async) tests, which run no event loop to stall."""
    return anyio.run(insert_job, conninfo, store, count, payload)


def insert_backlog(conn: psycopg.Connection[Any], stores: int, per_store: int) -> None:
    """One job for each of `stores` stores (`store-1`, …), `per_store` items each, by SQL."""
    conn.execute(
        "INSERT INTO jobs (instance_id) SELECT 'store-' || n FROM generate_series(1, %s) n",
        (stores,),
    )
    conn.execute(
        "INSERT INTO job_items (job_id, instance_id, product_id, payload)"
        " SELECT j.id, j.instance_id, 'p' || n, '{}'::jsonb"
        " FROM jobs j CROSS JOIN generate_series(1, %s) n",
        (per_store,),
    )


# Async: the tests run the worker and the stub on their own event loop, where a blocking call
# would stall both for its whole round trip (jitter every timing-sensitive test would feel).
async def query(conninfo: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        cursor = await conn.execute(sql, params)
        return await cursor.fetchall() if cursor.description else []


def query_blocking(conninfo: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """`query` for plain (not async) tests, which run no event loop to stall."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


async def status_counts(conninfo: str) -> dict[str, int]:
    return dict(await query(conninfo, "SELECT status, count(*) FROM job_items GROUP BY status"))


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], deadline: float = 30.0, every: float = 0.05
) -> None:
    """Wait for a condition on the outside world (the database, another process), which no
    in-process event can announce; `deadline` bounds the wait so a broken worker fails the test.
    The condition may be a coroutine function (a query), awaited on each round.
    """
    with anyio.fail_after(deadline * SLACK):
        while True:
            met = condition()
            if inspect.isawaitable(met):
                met = await met
            if met:
                return
            await anyio.sleep(every)


async def wait_for_counts(
    conninfo: str,
    condition: Callable[[dict[str, int]], bool],
    deadline: float = 30.0,
    every: float = 0.05,
) -> None:
    """Wait until the items' counts per status satisfy `condition` (over a large table, poll
    less often: each count reads the whole table, CPU the worker under test needs)."""

    async def met() -> bool:
        return condition(await status_counts(conninfo))

    await wait_until(met, deadline, every)


def heard_so_far(
    listener: psycopg.Connection[Any], conn: psycopg.Connection[Any], channel: str
) -> list[str]:
    """Every notification on `channel` committed so far. A marker sent now arrives after them
    (notifications come in commit order): read up to it, not for a while that a loaded
    machine may outlast."""
    conn.execute("SELECT pg_notify(%s, 'marker')", (channel,))
    heard: list[str] = []
    for notify in listener.notifies(timeout=10 * SLACK):
        if notify.payload == "marker":
            return heard
        heard.append(notify.payload)
    raise AssertionError(f"the marker never came; heard {heard}")


def new_dispatcher(pool: Any, clock: Callable[[], float] = anyio.current_time) -> Dispatcher:
    """A claimer of 10 items a claim, 5 of a store, for `pool` (None where no claim is made)."""
    return Dispatcher(
        pool,
        "w",
        claim_batch_size=10,
        max_per_instance=5,
        lease_seconds=60,
        max_payload_bytes=65_536,
        on_claimed=lambda _items: None,
        on_orphan=lambda _item: None,
        clock=clock,
    )


def make_settings(base_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "openai_api_key": "test-key",
        "openai_base_url": base_url,
        "rate_limit_rpm": 0,
        "rate_limit_tpm": 0,
        "worker_concurrency": 4,
        "sweep_interval_seconds": 300,
        "retry_base_seconds": 0.05,
        "retry_cap_seconds": 0.2,
        # Short, so the tests' two-second leases pass the lease/lock check (LEASE_SECONDS).
        "db_lock_timeout_seconds": 1,
        "openai_timeout_seconds": 5,
        "shutdown_grace_seconds": 5,
    }
    values.update(overrides)
    return load_settings(**values)


class RecordingGenerator(App):
    """The real OpenAI kinds, noting which item started when (for ordering assertions)."""

    def __init__(self, settings: Settings) -> None:
        self.starts: list[Item] = []
        self.changed = anyio.Event()
        base = served_app(settings)
        kinds = (dataclasses.replace(kind, handler=self._wrap(kind.handler)) for kind in base)
        super().__init__(kinds, base.budgets.values())

    def _wrap(self, handler: Handler) -> Handler:
        async def recorded(item: Item) -> Any:
            self.starts.append(item)
            self.changed.set()
            self.changed = anyio.Event()
            return await self.call(handler, item)

        return recorded

    async def call(self, handler: Handler, item: Item) -> Any:
        return await handler(item)


def starts_at_arrival(worker: Worker, handler: RecordingGenerator, store: str) -> list[int]:
    """Filled in with how many items had started when `store`'s first notification reached the
    worker: an order judged from there does not depend on how long the notification took to come
    (which a loaded machine stretches), only on what the worker did once it knew."""
    seen: list[int] = []
    notify = worker.listener.on_notify

    def noting(payload: str) -> None:
        if payload == store and not seen:
            seen.append(len(handler.starts))
        notify(payload)

    worker.listener.on_notify = noting
    return seen


def running_worker(
    conninfo: str, settings: Settings, app: App | None = None
) -> AbstractAsyncContextManager[Worker]:
    """A worker in this process, ready (LISTEN done, ring built) when the block starts."""
    return assembly.running_worker(settings, conninfo, app, name="test-worker")


class WorkerProcess(subprocess.Popen[str]):
    """A process whose output (stdout and stderr) a thread reads as it comes. A pipe nobody
    reads fills at 64 KiB, a few hundred claims' log lines, and the process then blocks on its
    next line, holding its items; a test waiting for those items then fails on a loaded machine,
    where the claims are smaller and the lines more."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path = ROOT) -> None:
        super().__init__(
            args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.stdout is not None
        for line in self.stdout:
            self.lines.append(line)

    @property
    def output_closed(self) -> bool:
        """The process closed its output: it ended (or is ending), no line will come."""
        return not self._reader.is_alive()

    def output(self, seconds: float = 10.0) -> str:
        """Everything it printed; once it has ended, after its last line is read."""
        self._reader.join(seconds)
        return "".join(self.lines)


def spawn_worker(conninfo: str, base_url: str, **env: str) -> WorkerProcess:
    """`python -m listener worker` as a real process."""
    # A developer's own PORT or API_TOKEN stays out; the test's `env` may set them.
    full_env = {
        **{k: v for k, v in os.environ.items() if k not in UNSET},
        "DATABASE_URL": conninfo,
        "OPENAI_API_KEY": "test-key",
        "OPENAI_BASE_URL": base_url,
        "RATE_LIMIT_RPM": "0",
        "RATE_LIMIT_TPM": "0",
        "WORKER_CONCURRENCY": "4",
        "RETRY_BASE_SECONDS": "0.05",
        "RETRY_CAP_SECONDS": "0.2",
        "DB_LOCK_TIMEOUT_SECONDS": "1",
        "LOG_LEVEL": "INFO",
        **env,
    }
    return WorkerProcess([sys.executable, "-m", "listener", "worker"], full_env)


async def worker_is_ready(conninfo: str, pid: int) -> bool:
    """A worker process beats once it has LISTENed and built its ring."""
    return bool(await query(conninfo, "SELECT 1 FROM worker_heartbeats WHERE pid = %s", (pid,)))


async def workers_are_ready(conninfo: str, procs: Sequence[subprocess.Popen[str]]) -> bool:
    rows = await query(
        conninfo,
        "SELECT count(DISTINCT pid) FROM worker_heartbeats WHERE pid = ANY(%s)",
        ([p.pid for p in procs],),
    )
    return int(rows[0][0]) == len(procs)


def settings_from_env() -> Settings:
    return load_settings()


async def communicate(proc: WorkerProcess, seconds: float) -> str:
    """Wait for a process's exit, then return everything it printed; waited for in a thread:
    the stub serving it runs on this event loop. `subprocess.TimeoutExpired` if it does not
    end in time."""
    await anyio.to_thread.run_sync(lambda: proc.wait(timeout=seconds * SLACK))
    return await anyio.to_thread.run_sync(proc.output)


# A developer's own settings must not leak into the commands a test runs.
UNSET = ("DATABASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "PORT", "HTTP_HOST", "API_TOKEN")


def run_listener(
    *args: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m listener ARGS` as a real process, with `env` on top of a clean environment."""
    full_env = {k: v for k, v in os.environ.items() if k not in UNSET} | env
    return subprocess.run(
        [sys.executable, "-m", "listener", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# A test-only trigger: every write that leaves an item COMPLETED or FAILED is logged, so a
# test can prove each item's outcome was written exactly once, whatever failed on the way.
_AUDIT = """
CREATE TABLE item_writes (item_id bigint NOT NULL, status text NOT NULL, worker text);
CREATE FUNCTION audit_item_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO item_writes VALUES (NEW.id, NEW.status, NEW.claimed_by);
    RETURN NULL;
END;
$$;
CREATE TRIGGER audit_item_write AFTER UPDATE ON job_items
    FOR EACH ROW WHEN (NEW.status IN ('COMPLETED', 'FAILED'))
    EXECUTE FUNCTION audit_item_write();
"""


async def install_write_audit(conninfo: str) -> None:
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute(_AUDIT)


async def outcome_writes(conninfo: str) -> Counter[int]:
    """How many times each item's final outcome was written (items never finished: absent)."""
    rows = await query(conninfo, "SELECT item_id, count(*) FROM item_writes GROUP BY item_id")
    return Counter(dict(rows))


async def item_ids(conninfo: str) -> set[int]:
    return {int(row[0]) for row in await query(conninfo, "SELECT id FROM job_items")}


async def read_lines_until(
    proc: WorkerProcess, done: Callable[[list[str]], bool], deadline: float = 30.0
) -> list[str]:
    """A process's output lines so far, once `done(lines)` holds."""

    def seen() -> bool:
        if done(proc.lines):
            return True
        if proc.output_closed and not done(proc.lines):
            raise AssertionError(f"the process ended first:\n{''.join(proc.lines)}")
        return False

    await wait_until(seen, deadline, every=0.02)
    return list(proc.lines)


@asynccontextmanager
async def api_process(
    *args: str, cwd: Path = ROOT, **env: str
) -> AsyncIterator[tuple[int, bytearray]]:
    """`listener api ARGS` until the block ends, ready (its serving line out); yields its pid
    and its output so far. Stopped with SIGTERM, which must end it with 0. `cwd` is where it
    reads `.env` from."""
    full_env = {k: v for k, v in os.environ.items() if k not in UNSET}
    full_env |= {"LOG_LEVEL": "INFO", **env}
    output = bytearray()

    async def read(stream: anyio.abc.ByteReceiveStream) -> None:
        async for chunk in stream:  # drained all along: a full pipe would block its logging
            output.extend(chunk)

    async with (
        await anyio.open_process(
            [sys.executable, "-m", "listener", "api", *args],
            env=full_env,
            cwd=cwd,
            stderr=subprocess.STDOUT,
        ) as process,
        anyio.create_task_group() as tg,
    ):
        assert process.stdout is not None
        tg.start_soon(read, process.stdout)
        try:
            with anyio.fail_after(30 * SLACK):
                while b"[HTTP] serving" not in output:  # the process says when it is ready
                    assert process.returncode is None, output.decode()
                    await anyio.sleep(0.01)
            yield process.pid, output
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(10 * SLACK):
                assert await process.wait() == 0, output.decode()
        finally:
            if process.returncode is None:
                process.kill()
