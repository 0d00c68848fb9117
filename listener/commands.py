"""Commands beyond `migrate` and `stub-openai`: worker, enqueue, status, cancel, retry, prune
(`api` and `demo` are registered from `http/app.py` and `demo/run.py`)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from anyio.abc import TaskStatus

from listener.database import resolve_database
from listener.errors import ConfigurationError, ListenerError, UsageError
from listener.handler import DEFAULT_BUDGET, DEFAULT_KIND, App
from listener.settings import Settings
from listener.tiers import TIERS

if TYPE_CHECKING:
    from listener.worker import Worker

logger = logging.getLogger(__name__)


# The OpenAI key was rejected: cli.EXIT_UNAVAILABLE (cli imports this module's register()).
EXIT_AUTH = 3


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


def check_openai_settings(settings: Settings) -> None:
    if settings.openai_api_key is None and not settings.openai_base_url:
        raise ConfigurationError(
            "invalid setting OPENAI_API_KEY: not set (set it, or point OPENAI_BASE_URL at a stub)"
        )


async def run_worker(settings: Settings, conninfo: str, app: App | None = None) -> int:
    """The `worker` command's body; returns the exit code."""
    from listener.assembly import open_worker
    from listener.db import wait_for_database

    if app is None:
        check_openai_settings(settings)
    fatal = None
    async with anyio.create_task_group() as tg:
        signals = WorkerSignals(tg.cancel_scope)
        # Handlers first: a deploy's SIGTERM may come while the database is still unreachable.
        await tg.start(signals.run)
        await wait_for_database(conninfo)
        async with open_worker(settings, conninfo, app) as worker:
            if settings.openai_api_key is not None:
                logger.info("[Worker] OpenAI API key is configured")
            else:
                logger.info("[Worker] no OpenAI API key: using %s", settings.openai_base_url)
            async with anyio.create_task_group() as serving:
                if settings.port:
                    from listener.http.app import serve_worker_http

                    await serving.start(serve_worker_http, settings, worker.pool, worker)
                signals.worker = worker
                await worker.run()
                serving.cancel_scope.cancel()
            fatal = worker.fatal
        tg.cancel_scope.cancel()
    return EXIT_AUTH if fatal else 0


class WorkerSignals:
    """SIGTERM and SIGINT over the worker command's whole life: before the worker runs, the
    first ends the start-up; once it runs, the first stops it gracefully and a second one
    releases the in-flight items at once."""

    def __init__(self, startup: anyio.CancelScope) -> None:
        self.startup = startup
        self.worker: Worker | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.worker is None:
                    logger.info("[Worker] %s received before the worker started: exiting", name)
                    self.startup.cancel()
                elif not self.worker.stopping:
                    logger.info("[Worker] %s received", name)
                    self.worker.stop()
                else:
                    logger.warning("[Worker] second signal: releasing in-flight items now")
                    self.worker.cancel_in_flight()


def parse_options(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise UsageError(f"invalid --options: not JSON ({error})") from None
    if not isinstance(value, dict):
        raise UsageError('invalid --options: expected a JSON object, e.g. \'{"language": "fr"}\'')
    return value


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from listener.assembly import served_app
    from listener.handler import load_app

    updates = {
        name: value
        for name, value in (("worker_app", args.app), ("worker_kinds", args.kinds))
        if value is not None
    }
    settings = settings.model_copy(update=updates)
    user_app = load_app(settings.worker_app) if settings.worker_app else None
    app = served_app(settings, user_app)
    if any(kind.budget == DEFAULT_BUDGET for kind in app):
        check_openai_settings(settings)
    url = resolve_database(settings)
    return anyio.run(run_worker, settings, url, app)


def _enqueue(args: argparse.Namespace, settings: Settings) -> int:
    from listener import jobs
    from listener.policy import PRIORITY_RANGE, parse_int
    from listener.producer import enqueue

    priority = parse_int("priority", args.priority, *PRIORITY_RANGE)
    products = (
        jobs.read_products(args.file)
        if args.file
        else jobs.sample_products(args.products, args.store)
    )
    options = None if args.options is None else parse_options(args.options)
    job_id = enqueue(
        resolve_database(settings),
        args.store,
        products,
        priority=priority,
        kind=args.kind,
        options=options,
        tier=args.tier,
    )
    _say(str(job_id))
    return 0


def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    from listener import lifecycle

    url = resolve_database(settings)
    if args.store is not None:
        answer = lifecycle.cancel_store(url, args.store)
    else:
        answer = lifecycle.cancel_job(url, args.job_id)
    _say(lifecycle.describe_cancel(answer))
    return 0


def _retry(args: argparse.Namespace, settings: Settings) -> int:
    from listener import lifecycle

    url = resolve_database(settings)
    if args.store is not None:
        answer = lifecycle.retry_store(url, args.store)
    else:
        answer = lifecycle.retry_job(url, args.job_id)
    _say(lifecycle.describe_retry(answer))
    return 0


def _prune(args: argparse.Namespace, settings: Settings) -> int:
    from listener import retention

    try:
        older_than = retention.parse_age(args.age)
    except ValueError as error:
        raise ConfigurationError(f"invalid --older-than: {error}") from None
    url = resolve_database(settings)

    async def run() -> str:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            if args.dry_run:
                jobs, items = await retention.preview(conn, older_than)
                return (
                    f"would delete {jobs} job(s) and {items} item(s) finished over {args.age} ago"
                )
            pruned = await retention.prune(lambda: nullcontext(conn), older_than)
        if pruned.busy and not pruned.batches:
            raise ListenerError("another process is pruning right now; try again later")
        return (
            f"deleted {pruned.jobs} job(s) and {pruned.items} item(s) finished over {args.age} ago"
        )

    _say(anyio.run(run))
    return 0


def _target(parser: argparse.ArgumentParser, what: str) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("job_id", nargs="?", type=int, help=f"the job to {what}")
    target.add_argument("--store", help=f"{what} every job of this store (instance_id)")


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from listener import show

    show.status(resolve_database(settings), args.job_id, args.limit, args.json)
    return 0


def _store(args: argparse.Namespace, settings: Settings) -> int:
    from listener import policy

    if args.action == "show":
        return _store_show(args, settings)
    if args.action == "set":
        weight = (
            None
            if args.weight is None
            else policy.parse_int("weight", args.weight, *policy.WEIGHT_RANGE)
        )
        rpm: policy.Cap = (
            policy.KEEP
            if args.rpm is None
            else policy.parse_cap("rpm", args.rpm, policy.MAX_RPM_LIMIT)
        )
        in_flight: policy.Cap = (
            policy.KEEP
            if args.max_in_flight is None
            else policy.parse_cap("max-in-flight", args.max_in_flight, policy.MAX_IN_FLIGHT)
        )
        options = None if args.options is None else parse_options(args.options)
        if weight is None and rpm == policy.KEEP and in_flight == policy.KEEP and options is None:
            raise UsageError(
                "store set: give at least one of --weight, --rpm, --max-in-flight, --options"
            )
        policy.set_policy(
            resolve_database(settings),
            args.store,
            weight=weight,
            rpm_limit=rpm,
            max_in_flight=in_flight,
            options=options,
        )
    else:
        policy.set_policy(resolve_database(settings), args.store, paused=args.action == "pause")
    # Every worker re-reads the row on the stores_changed notification its commit sends.
    from listener import show

    show.stores(resolve_database(settings), args.store, 1, as_json=False)
    return 0


def _store_show(args: argparse.Namespace, settings: Settings) -> int:
    from listener import show
    from listener.openai import prices

    table = prices.load(settings.openai_prices_file)
    show.stores(resolve_database(settings), args.store, args.limit, args.json, table)
    return 0


def _limit(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be 1 to 10000, got {text!r}")
    return value


def _output_options(parser: argparse.ArgumentParser, what: str, default: int) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON, for machines")
    parser.add_argument("--limit", type=_limit, default=default, help=f"the most {what} shown")


def register(commands: Any) -> None:
    worker = commands.add_parser(
        "worker", help="run the worker (the Procfile's process); HTTP on PORT when set"
    )
    worker.add_argument(
        "--app",
        help="'package.module:attribute' naming a listener.App whose kinds this worker serves "
        "beside the OpenAI ones (default: WORKER_APP)",
    )
    worker.add_argument(
        "--kinds",
        help="serve only these kinds, comma-separated (default: WORKER_KINDS, else every kind "
        "it has a handler for)",
    )
    worker.set_defaults(handler=_worker)

    enqueue = commands.add_parser("enqueue", help="create a job for a store")
    enqueue.add_argument("--store", required=True, help="the store's instance_id")
    source = enqueue.add_mutually_exclusive_group(required=True)
    source.add_argument("--products", type=int, help="this many generated sample products")
    source.add_argument("--file", type=Path, help="a JSON array of product objects")
    enqueue.add_argument(
        "--priority", default="0", help="-100 to 100, higher first, within the store"
    )
    enqueue.add_argument(
        "--kind",
        default=DEFAULT_KIND,
        help=f"the kind of work its items need, one a worker registered (default: {DEFAULT_KIND})",
    )
    enqueue.add_argument(
        "--options", help='the job\'s options as a JSON object, e.g. \'{"language": "French"}\''
    )
    enqueue.add_argument(
        "--tier",
        choices=TIERS,
        help="realtime, batch (OpenAI's Batch API: half the price, within 24 h), flex or auto "
        "(batch when large or of low priority); default: the kind's",
    )
    enqueue.set_defaults(handler=_enqueue)

    store = commands.add_parser("store", help="a store's weight, caps and pause")
    actions = store.add_subparsers(
        dest="action", required=True, metavar="ACTION", help="one of the actions below"
    )
    show = actions.add_parser(
        "show",
        help="weight, caps, paused, backlog, in flight, last minute; cost today and this month",
    )
    show.add_argument(
        "store", nargs="?", help="one store (default: every store with a row or work)"
    )
    _output_options(show, "stores", 200)
    change = actions.add_parser("set", help="change a store's weight or caps")
    change.add_argument("store", help="the store's instance_id")
    change.add_argument("--weight", help="1 to 1000: its share of the budget against others'")
    change.add_argument("--rpm", help="the most items it starts a minute, or none")
    change.add_argument("--max-in-flight", help="the most items it runs at once, or none")
    change.add_argument(
        "--options",
        help="a JSON object: defaults for every job of the store (brand_voice, language, ...), "
        "under each job's own options; replaces the store's previous ones",
    )
    for action, text in (("pause", "start none of its items"), ("resume", "start them again")):
        actions.add_parser(action, help=text).add_argument("store", help="the store's instance_id")
    store.set_defaults(handler=_store)

    cancel = commands.add_parser(
        "cancel", help="cancel a job (or a store's jobs): pending items now, in-flight ones finish"
    )
    _target(cancel, "cancel")
    cancel.set_defaults(handler=_cancel)

    retry = commands.add_parser("retry", help="put a job's (or a store's) FAILED items back")
    _target(retry, "retry")
    retry.set_defaults(handler=_retry)

    prune = commands.add_parser("prune", help="delete finished jobs and their items")
    prune.add_argument(
        "--older-than", dest="age", required=True, help="finished over this long ago: 7d, 12h, 30m"
    )
    prune.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    prune.set_defaults(handler=_prune)

    status = commands.add_parser("status", help="job progress and the backlog per store")
    status.add_argument(
        "job_id", nargs="?", type=int, help="one job, and its failed items (default: the latest)"
    )
    _output_options(status, "jobs, failed items and stores", 10)
    status.set_defaults(handler=_status)
