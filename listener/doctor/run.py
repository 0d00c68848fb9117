"""`listener doctor`: the deployment checklist's verification as one command (issue 15)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from listener.database import database_url
from listener.doctor import backlog, connections, fleet, schema
from listener.doctor.context import Context, connect_read_only
from listener.doctor.report import Check, exit_code, fail, render_json, render_text
from listener.errors import DatabaseError, one_line
from listener.settings import Settings

Outcome = Check | list[Check]


class _Checks(list[Check]):
    def run(self, name: str, check: Callable[[], Outcome]) -> None:
        """A check that errors is a ✗ of its own; the rest still run."""
        try:
            result = check()
        except psycopg.Error as error:
            result = fail(name, f"could not check: {one_line(error)}", "see the error")
        self.extend(result if isinstance(result, list) else [result])


def run_checks(
    conninfo: str,
    settings: Settings,
    processes: int | None = None,
    api_processes: int = 1,
    schema_diff: bool = True,
) -> list[Check]:
    """Every check, in the checklist's order."""
    try:
        conn = connect_read_only(conninfo)
    except psycopg.OperationalError as error:
        raise DatabaseError(f"cannot connect to the database: {one_line(error)}") from error
    checks = _Checks()
    with conn:
        ctx = Context(conn, conninfo, settings, processes, api_processes)
        # The schema comparison (scratch database, migra's inspection: ~2 s whatever the data)
        # runs beside the other checks, on connections of its own.
        with ThreadPoolExecutor(max_workers=1) as beside:
            compared = beside.submit(schema.check_schema_matches, ctx) if schema_diff else None
            _in_order(ctx, checks)
        if compared is not None:
            checks.insert(1, compared.result())
    return list(checks)


def _in_order(ctx: Context, checks: _Checks) -> None:
    checks.run("migrations", lambda: schema.check_migrations(ctx))
    checks.run("instance_id", lambda: schema.check_instance_id(ctx))
    checks.run("indexes", lambda: schema.check_indexes(ctx))
    checks.run("statistics", lambda: schema.check_statistics(ctx))
    try:
        reading = backlog.Backlog(ctx)
    except psycopg.Error as error:
        checks.append(fail("backlog", f"could not check: {one_line(error)}", "see the error"))
    else:
        checks.run("claim plan", lambda: backlog.check_claim_plan(ctx, reading))
        checks.run("backlog", lambda: backlog.check_backlog(ctx, reading))
    checks.run("leases", lambda: backlog.check_leases(ctx))
    checks.run("backoff", lambda: backlog.check_backoff(ctx))
    checks.run("failures", lambda: backlog.check_failures(ctx))
    checks.run("connections", lambda: connections.check_connections(ctx))
    checks.run("workers", lambda: fleet.check_workers(ctx))
    checks.run("kinds", lambda: fleet.check_kinds(ctx))
    checks.run("listen", lambda: fleet.check_listen(ctx))
    checks.run("budget", lambda: fleet.check_budget(ctx))
    checks.run("settings", lambda: connections.check_settings(ctx))


def _doctor(args: argparse.Namespace, settings: Settings) -> int:
    started = time.perf_counter()
    checks = run_checks(
        database_url(settings),
        settings,
        processes=args.processes,
        api_processes=args.api,
        schema_diff=not args.no_schema_diff,
    )
    seconds = time.perf_counter() - started
    if args.json:
        sys.stdout.write(render_json(checks, seconds) + "\n")
    else:
        sys.stdout.write("\n".join(render_text(checks, seconds)) + "\n")
    return exit_code(checks)


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def register(commands: Any) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="verify a deployment: schema, indexes, backlog, connections, workers, LISTEN,"
        " budget, settings (read-only; exit 1 when a check fails)",
    )
    doctor.add_argument("--json", action="store_true", help="the report as JSON, for machines")
    doctor.add_argument(
        "--processes",
        type=_count,
        help="worker processes the fleet runs (default: the live heartbeats)",
    )
    doctor.add_argument(
        "--api", type=_count, default=1, help="`listener api` processes (default 1)"
    )
    doctor.add_argument(
        "--no-schema-diff",
        action="store_true",
        help="skip comparing the schema with sql/schema.sql (it needs a scratch database)",
    )
    doctor.set_defaults(handler=_doctor)
