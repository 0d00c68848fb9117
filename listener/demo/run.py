"""`listener demo`: stores of very different sizes arrive at different times, and the real worker
serves them fairly from one budget, shown live.

Everything it needs is started here and stopped at the end: an embedded PostgreSQL when
DATABASE_URL is unset, the local OpenAI stub when OPENAI_API_KEY is unset (both in setup.py),
and the worker itself, in this process, so that the view (view.py) can read its limiter and
see each item start.
"""

from __future__ import annotations

import argparse
import math
import signal
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from rich.console import Console

from listener import jobs, usage
from listener.assembly import served_app
from listener.costs import StoreCost, store_costs
from listener.db import wrap
from listener.demo.setup import (
    DEMO_LIMITER,
    REAL_RPM,
    SCALE,
    Setup,
    execute,
    openai_settings,
    prepare_database,
)
from listener.demo.store import BULK_STORE, STORES, Store, plan
from listener.demo.view import (
    duration_text,
    live_view,
    logs_through,
    render_live,
    render_summary,
    status_line,
)
from listener.errors import ListenerError
from listener.handler import App, Item
from listener.openai import prices
from listener.openai.prices import PriceTable
from listener.producer import enqueue
from listener.settings import Settings
from listener.sqlfiles import queries
from listener.tiers import BATCH, FLEX, REALTIME

if TYPE_CHECKING:
    from listener.worker import Worker

PREFIX = "demo-"
REFRESH_SECONDS = 0.25
RATE_WINDOW_SECONDS = 10.0  # "items/min now" is measured over this sliding window
EXIT_AUTH = 3
# The dashboard's cost figures are read this often in the demo (a run lasts a minute).
COST_SECONDS_DEMO = 2.0


def timed_app(settings: Settings, stores: list[Store]) -> App:
    """The real OpenAI kinds, noting when each store's first item starts (the demo's key
    figure)."""
    by_name = {store.name: store for store in stores}

    def started(item: Item) -> None:
        store = by_name.get(item.store)
        if store is not None and store.first_start is None:
            store.first_start = time.monotonic()

    return served_app(settings).observed(started)


def _enqueue(conninfo: str, store: Store) -> tuple[int, float]:
    products = jobs.sample_products(store.products, store.name)
    job_id = enqueue(
        conninfo, store.name, products, kind=store.kind, options=store.options, tier=store.tier
    )
    return job_id, time.monotonic()


class Demo:
    """One run: its stores, the worker serving them, and the figures the view shows."""

    def __init__(
        self, args: argparse.Namespace, console: Console, stores: list[Store], worker: Worker
    ) -> None:
        self.args = args
        self.console = console
        self.stores = stores
        self.worker = worker
        self.budget = worker.limiter.snapshot().rpm
        self.started = time.monotonic()
        self.ended: float | None = None
        self.stop = anyio.Event()
        self._samples: deque[tuple[float, int]] = deque()
        self._announced: set[str] = set()
        # What each store cost, priced at the end (before the demo's rows are removed).
        self.costs: dict[str, StoreCost] | None = None
        self.prices: PriceTable | None = None

    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def done(self) -> int:
        return sum(s.completed + s.failed for s in self.stores)

    def all_finished(self) -> bool:
        return all(s.job_id is not None and s.took is not None for s in self.stores)

    def per_minute(self) -> float | None:
        now, done = time.monotonic(), self.done()
        self._samples.append((now, done))
        while now - self._samples[0][0] > RATE_WINDOW_SECONDS:
            self._samples.popleft()
        first_at, first_done = self._samples[0]
        return None if now - first_at < 1.0 else (done - first_done) * 60 / (now - first_at)

    # -- the simulation -------------------------------------------------------------------------

    async def arrivals(self, conninfo: str) -> None:
        for store in self.stores:
            await anyio.sleep(max(0.0, store.arrives_after - self.elapsed()))
            # enqueue is sync psycopg: a thread keeps the worker and the view running.
            store.job_id, store.committed = await anyio.to_thread.run_sync(
                _enqueue, conninfo, store
            )
            if self.args.headless:
                self.say(f"{store.name} arrives with {store.products:,} products")

    async def refresh(self, conn: psycopg.AsyncConnection[Any]) -> None:
        by_id = {s.job_id: s for s in self.stores if s.job_id is not None}
        try:
            cursor = await conn.execute(queries("demo")["progress"], {"job_ids": list(by_id)})
            rows = await cursor.fetchall()
        except psycopg.Error as error:
            raise wrap(error, "demo: reading the progress failed") from error
        for job_id, completed, failed, took, batched in rows:
            store = by_id[job_id]
            store.completed, store.failed, store.took = completed, failed, took
            if store.tier == BATCH and batched and store.first_start is None:
                store.first_start = time.monotonic()  # its items are in a batch: started

    async def watch(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Refresh the figures until the time is up, Ctrl-C, or the worker stops by itself."""
        next_line = 2.0  # headless: a status line every 2 s, once the rate means something
        with live_view(self) as live:
            while self.elapsed() < self.args.seconds and not self.worker.stopping:
                await self.refresh(conn)
                rate = self.per_minute()
                if live is not None:
                    live.update(render_live(self, rate), refresh=True)
                else:
                    self._announce_first_items()
                    if self.elapsed() >= next_line:
                        next_line += 2.0
                        self.say(status_line(self, rate))
                if self.all_finished():  # nothing left to show: the summary comes early
                    self.say("every store has finished: the demo ends early")
                    break
                with anyio.move_on_after(REFRESH_SECONDS):
                    await self.stop.wait()
                if self.stop.is_set():
                    break

    def _announce_first_items(self) -> None:
        for store in self.stores:
            if store.latency is not None and store.name not in self._announced:
                self._announced.add(store.name)
                after = duration_text(store.latency)
                if store.tier == BATCH:
                    self.say(
                        f"{store.name}: first item started {after} after its commit, in a "
                        "Batch API batch (the batch tier: half the price, outside the budget)"
                    )
                else:
                    self.say(f"{store.name}: first item started {after} after its commit")

    async def on_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _signum in signals:
                if not self.stop.is_set():
                    self.stop.set()
                else:  # a second Ctrl-C: in-flight items go back to PENDING now
                    self.worker.cancel_in_flight()

    def say(self, line: str) -> None:
        self.console.print(f"t={self.elapsed():6.1f} s  {line}")


async def _run(args: argparse.Namespace, settings: Settings, setup: Setup, console: Console) -> int:
    from listener.assembly import open_worker

    console.print(f"  database: {setup.database}")
    if setup.embedded:  # the demo's own scratch database: a crashed run's jobs go
        for block in (
            "clear_old_jobs",
            "delete_usage",
            "delete_daily_usage",
            "delete_monthly_usage",
        ):
            sql = queries("demo")[block]
            await anyio.to_thread.run_sync(execute, setup.conninfo, sql, {"pattern": f"{PREFIX}%"})
    else:
        live, params = queries("fleet")["count_live_workers"], {"stale_seconds": 15}
        [(others,)] = await anyio.to_thread.run_sync(execute, setup.conninfo, live, params)
        if others:
            console.print(
                f"  [yellow]note[/yellow]: {others} other worker(s) are live on this database: "
                "they will take some of the demo's items too"
            )
    bulk_tier = args.bulk_tier or (REALTIME if settings.openai_api_key is not None else BATCH)
    stores = plan(args.seconds, bulk_tier)
    table = prices.load(settings.openai_prices_file)
    async with openai_settings(args, settings, console) as worker_settings:
        app = timed_app(worker_settings, stores)
        try:
            async with open_worker(
                worker_settings, setup.conninfo, app, name="listener-demo"
            ) as worker:
                demo = Demo(args, console, stores, worker)
                console.print(
                    f"  worker:   {worker_settings.worker_concurrency} tasks in this process, "
                    f"the limiter spacing requests for {demo.budget:,}/min, at most "
                    f"{worker_settings.max_per_instance} items of one store per claim; the "
                    f"stores are named {PREFIX}* and removed at the end; {BULK_STORE} on the "
                    f"{bulk_tier} tier"
                )
                await _simulate(demo, setup.conninfo)
                demo.prices = table
                demo.costs = await anyio.to_thread.run_sync(
                    _costs, setup.conninfo, [s.name for s in stores], table
                )
            console.print(render_summary(demo), soft_wrap=False)  # the title centred over the table
        finally:
            # Leave no demo job behind for another worker (maybe with a real key) to take.
            await _remove(setup.conninfo, stores, console)
    if setup.embedded:
        console.print(f"stopping the embedded PostgreSQL in {args.data_dir}")
    return EXIT_AUTH if worker.fatal else 0


def _costs(conninfo: str, names: list[str], table: PriceTable) -> dict[str, StoreCost]:
    rows = [row for name in names for row in usage.read_usage(conninfo, name)]
    return store_costs(rows, table)


async def _simulate(demo: Demo, conninfo: str) -> None:
    """Run the worker, the arrivals and the view; stop the worker when the view ends."""
    worker, worker_done = demo.worker, anyio.Event()

    async def run_worker(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            await worker.run(task_status=task_status)
        finally:
            worker_done.set()

    async with (
        await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(demo.on_signals)
        await tg.start(run_worker)
        if demo.args.port is not None:
            await tg.start(_dashboard, demo)
        demo.started = time.monotonic()
        try:
            async with anyio.create_task_group() as simulation:
                simulation.start_soon(demo.arrivals, conninfo)
                await demo.watch(conn)
                simulation.cancel_scope.cancel()
            if worker.running:
                demo.say(f"stopping: {len(worker.running)} item(s) in flight get to finish")
        finally:
            # Even when the view failed: stopped, not cancelled, the worker hands back its items.
            worker.stop(grace=worker.settings.shutdown_grace_seconds)
            await worker_done.wait()
            tg.cancel_scope.cancel()  # the signal watcher
    demo.ended = time.monotonic()
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await demo.refresh(conn)  # the items finished while the worker stopped count too


async def _dashboard(demo: Demo, *, task_status: anyio.abc.TaskStatus[None]) -> None:
    """The operators' dashboard of this run on 127.0.0.1:--port (read-only: no API_TOKEN), its
    cost figures read every COST_SECONDS_DEMO."""
    from listener.http.app import build_app
    from listener.http.serve import serving

    worker = demo.worker
    app = build_app(worker.pool, worker.settings, worker, cost_seconds=COST_SECONDS_DEMO)
    async with serving(app, "127.0.0.1", demo.args.port) as server:
        demo.say(f"the dashboard (its Cost section too) is at http://127.0.0.1:{server.port}/")
        task_status.started()
        await anyio.sleep_forever()


async def _remove(conninfo: str, stores: list[Store], console: Console) -> None:
    """Delete this run's batches, jobs (their items cascade), usage and the stub's limiter
    row."""
    sql = queries("demo")
    job_ids = [s.job_id for s in stores if s.job_id is not None]
    pattern = {"pattern": f"{PREFIX}%"}
    try:
        with anyio.CancelScope(shield=True):  # even on the way out of a failure
            for block, params in (
                ("delete_batches", {"job_ids": job_ids}),
                ("delete_jobs", {"job_ids": job_ids}),
                ("delete_usage", pattern),
                ("delete_daily_usage", pattern),
                ("delete_monthly_usage", pattern),
                ("delete_limiter", {"name": DEMO_LIMITER}),
            ):
                await anyio.to_thread.run_sync(execute, conninfo, sql[block], params)
    except ListenerError as error:
        console.print(f"[yellow]could not remove the demo's jobs[/yellow] {job_ids}: {error}")
        return
    if job_ids:
        console.print(f"removed the demo's {len(job_ids)} job(s) from the database")


def _first_listener_error(group: BaseExceptionGroup[BaseException]) -> ListenerError | None:
    for error in group.exceptions:
        if isinstance(error, ListenerError):
            return error
        if isinstance(error, BaseExceptionGroup) and (found := _first_listener_error(error)):
            return found
    return None


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    # Soft wrap: a log line is not cut at the terminal's width; the tables still fit it. Not a
    # terminal (CI): wide enough for each table row on one line.
    width = None if Console().is_terminal else 130
    console = Console(highlight=False, soft_wrap=True, width=width)
    big, *small = STORES.values()
    console.print(
        f"[bold]listener demo[/bold]: {len(STORES)} stores arrive over the first third of a "
        f"{args.seconds:g} s run, one with {big:,} products, the others with {min(small)} to "
        f"{max(small)}."
    )
    try:
        with logs_through(console, args.verbose):
            return anyio.run(_run, args, settings, prepare_database(args, settings), console)
    except BaseExceptionGroup as group:
        # Task groups wrap the worker's own errors: report the first one like any other.
        error = _first_listener_error(group)
        if error is None:
            raise
        raise error from None


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def register(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="stores of different sizes arrive and are served fairly, shown live"
    )
    add = demo.add_argument
    add(
        "--seconds",
        type=_positive,
        default=60.0,
        help="run this long (default 60; Ctrl-C ends early)",
    )
    add("--headless", action="store_true", help="no live view: progress lines and the summary")
    add(
        "--rpm",
        type=_positive_int,
        default=None,
        help=(
            f"the stub's and the limiter's requests per minute (default {REAL_RPM}×{SCALE} = "
            f"{REAL_RPM * SCALE} with the stub, RATE_LIMIT_RPM with a real key)"
        ),
    )
    add("--latency", type=float, default=0.3, help="the stub's seconds per answer (default 0.3)")
    add(
        "--data-dir",
        type=Path,
        default=Path(".pgdata"),
        help="the embedded PostgreSQL's folder when DATABASE_URL is unset (default .pgdata)",
    )
    add("--verbose", action="store_true", help="show the worker's INFO log lines too")
    add(
        "--bulk-tier",
        choices=(BATCH, FLEX, REALTIME),
        default=None,
        help=f"the tier of {BULK_STORE}'s import (default: batch with the stub, realtime with a "
        "real key: a real batch may take hours, and flex serves some models only)",
    )
    add(
        "--port",
        type=_positive_int,
        default=None,
        help="serve the dashboard on 127.0.0.1:PORT while the demo runs (read-only)",
    )
    demo.set_defaults(handler=_demo)
