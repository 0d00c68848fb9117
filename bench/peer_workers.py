"""One worker process of listener, pgqueuer or procrastinate with a no-op handler, for
`bench.peers`: `python -m bench.peer_workers SYSTEM DATABASE_URL [--concurrency N]`.

Each prints to stdout (flushed) `first <time.time()>` when its first job starts and
`probe <key> <time.time()>` when a probe job (key starting with `probe-`) starts, so the
harness measures the idle pickup on the same clock as the insert's commit. SIGTERM stops it.
listener reads its other settings from the environment, like `python -m listener worker`.
With BENCH_CPROFILE=<file>, the process runs under cProfile timed by its CPU time (not the wall
clock: on a shared machine a process waiting for a core is not spending) and writes the
statistics there when it stops (bench.profile_worker --cprofile).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import signal
import sys
import time
from datetime import timedelta
from typing import Any

import anyio
import psycopg

from bench.workers import InstantHandler
from listener import assembly
from listener.handler import Item, Result
from listener.settings import load_settings

PGQUEUER_ENTRYPOINT = "noop"
PROCRASTINATE_TASK = "noop"


class Reporter:
    """The lines the harness reads; the first job's time, then probes only."""

    def __init__(self) -> None:
        self.first = False

    def started(self, key: str) -> None:
        now = time.time()
        if not self.first:
            self.first = True
            print(f"first {now:.6f}", flush=True)
        if key.startswith("probe-"):
            print(f"probe {key} {now:.6f}", flush=True)


class ReportingInstantHandler(InstantHandler):
    def __init__(self, reporter: Reporter) -> None:
        super().__init__()
        self.reporter = reporter

    async def handle(self, item: Item) -> Result:
        self.reporter.started(item.store)
        return Result({"text": "ok"}, cost=0)


async def run_listener(url: str, concurrency: int | None, reporter: Reporter) -> None:
    overrides: dict[str, Any] = {"database_url": url}
    if concurrency is not None:
        overrides["worker_concurrency"] = concurrency
    settings = load_settings(**overrides)
    handler = ReportingInstantHandler(reporter)
    async with assembly.running_worker(settings, url, handler, name="listener-peers", grace=2):
        print("ready", flush=True)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _signum in signals:
                break


async def run_pgqueuer(url: str, concurrency: int | None, reporter: Reporter) -> None:
    from pgqueuer import Queries, QueueManager
    from pgqueuer.models import Job

    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    manager = QueueManager(Queries.from_psycopg_connection(conn))

    @manager.entrypoint(PGQUEUER_ENTRYPOINT)
    async def noop(job: Job) -> None:
        reporter.started((job.payload or b"").decode())

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, manager.shutdown.set)
    print("ready", flush=True)
    # QueueManager.run's defaults (batch_size=10, no concurrency cap) unless told otherwise.
    options: dict[str, Any] = {}
    if concurrency is not None:
        options = {"max_concurrent_tasks": concurrency, "batch_size": max(1, concurrency // 2)}
    await manager.run(dequeue_timeout=timedelta(seconds=30), **options)
    await conn.close()


async def run_procrastinate(url: str, concurrency: int | None, reporter: Reporter) -> None:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name=PROCRASTINATE_TASK)
    async def noop(key: str) -> None:
        reporter.started(key)

    async with app.open_async():
        print("ready", flush=True)
        # procrastinate's own default is one job at a time; 10 as in the table.
        await app.run_worker_async(concurrency=concurrency or 10, install_signal_handlers=True)


RUNNERS = {"listener": run_listener, "pgqueuer": run_pgqueuer, "procrastinate": run_procrastinate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("system", choices=sorted(RUNNERS))
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=None, help="default: the system's")
    args = parser.parse_args()
    reporter = Reporter()
    runner = RUNNERS[args.system]
    profile_to = os.environ.get("BENCH_CPROFILE")
    profile = cProfile.Profile(time.process_time) if profile_to else None
    if profile is not None:
        profile.enable()
    try:
        if args.system == "listener":
            anyio.run(runner, args.url, args.concurrency, reporter)
        else:
            asyncio.run(runner(args.url, args.concurrency, reporter))
    finally:
        if profile is not None and profile_to:
            profile.disable()
            profile.dump_stats(profile_to)
    sys.exit(0)


if __name__ == "__main__":
    main()
