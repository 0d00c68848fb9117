"""`listener migrate up --plan` / `migrate status -v`: each pending migration's statements and
the locks they take, measured on a scratch copy of the live schema, never on the database.

The copy is made with migra's engine (`results.dbdiff`, as `migrate diff`). A statement that can
run in a transaction is measured by `results.lockinfo` (run, read pg_locks, roll back). One that
cannot (CREATE INDEX CONCURRENTLY, a backfill that commits per batch) is run for real on the
copy while another session holds a snapshot and a light lock on every table: the statement stops
at its first wait, holding (or asking for) its locks, which a third session reads from pg_locks.
Each statement is then applied to the copy, so the next one sees the schema it will see.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from listener.migrate import (
    Migration,
    MigrationRunner,
    connect,
    first_line,
    schema_diff,
    scratch_database,
)
from listener.sqlfiles import queries

# The lock that stops the worker: ACCESS EXCLUSIVE on job_items blocks every claim (and read).
HOT_TABLE = "job_items"
WATCH_SECONDS = 10.0
EFFECTS = {
    "AccessExclusiveLock": "blocks every claim, completion and read",
    "ExclusiveLock": "blocks claims and completions; reads go on",
    "ShareRowExclusiveLock": "blocks claims and completions; reads go on",
    "ShareLock": "blocks claims and completions; reads go on",
    "ShareUpdateExclusiveLock": "claims and completions go on",
}
SEVERITY = [
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
]


@dataclass
class StatementLocks:
    statement: str
    locks: dict[str, str]  # table (or index) -> the strongest lock mode taken on it
    how: str  # "measured in a transaction" / "watched while it ran" / an error
    error: str | None = None


@dataclass
class MigrationPlan:
    migration: Migration
    statements: list[StatementLocks]

    def strongest(self, table: str) -> str | None:
        modes = [s.locks[table] for s in self.statements if table in s.locks]
        return max(modes, key=SEVERITY.index) if modes else None


def _strongest(entries: list[tuple[str, str]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for relation, mode in entries:
        if mode in SEVERITY and (
            relation not in found or SEVERITY.index(mode) > SEVERITY.index(found[relation])
        ):
            found[relation] = mode
    return found


def _in_transaction(url: str, statement: str) -> StatementLocks:
    from results.lockinfo import analyse_locks

    infos = analyse_locks(url, statement)
    if not infos or infos[0].error:
        return StatementLocks(statement, {}, "", error=infos[0].error if infos else "no statement")
    info = infos[0]
    entries = [(lock.relation_name, lock.mode) for lock in info.locks if lock.relation_name]
    return StatementLocks(statement, _strongest(entries), "measured in a rolled-back transaction")


def _watched(url: str, statement: str) -> StatementLocks:
    """Run `statement` for real on the copy, stopped at its first wait by a blocking session."""
    blocks = queries("locks")
    with (
        psycopg.connect(url) as blocker,
        psycopg.connect(url, autocommit=True) as runner,
        psycopg.connect(url, autocommit=True) as watcher,
    ):
        blocker.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        for (table,) in blocker.execute(blocks["public_tables"]).fetchall():
            lock = sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(sql.Identifier(table))
            blocker.execute(lock)
        pid = runner.info.backend_pid
        failure: list[BaseException] = []

        def run() -> None:
            try:
                runner.execute(statement.encode())
            except psycopg.Error as error:
                failure.append(error)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        seen: list[tuple[str, str]] = []
        deadline = time.monotonic() + WATCH_SECONDS
        while thread.is_alive() and time.monotonic() < deadline:
            rows = watcher.execute(blocks["backend_locks"], {"pid": pid}).fetchall()
            seen.extend((str(row[2]), str(row[1])) for row in rows)
            waiting = watcher.execute(blocks["backend_waiting"], {"pid": pid}).fetchone()
            if waiting == (True,) and rows:
                break
            time.sleep(0.005)  # a statement on an empty copy: its locks last milliseconds
        blocker.rollback()
        thread.join(WATCH_SECONDS)
    if failure:
        return StatementLocks(statement, {}, "", error=str(failure[0]).strip())
    how = "watched while it ran (outside a transaction)"
    return StatementLocks(statement, _strongest(seen), how)


def plan_migrations(conninfo: str, output: Callable[[str], None]) -> list[MigrationPlan]:
    """The lock plan of every pending migration; the live database is only read."""
    runner = MigrationRunner(conninfo, output=lambda _line: None)
    with connect(conninfo, lambda _line: None) as conn:
        tracked = conn.execute("SELECT to_regclass('schema_migrations')").fetchone() != (None,)
        applied = set(runner.applied(conn)) if tracked else set()
    pending = [m for m in runner.migrations if m.name not in applied]
    if not pending:
        output("nothing to apply: the database is up to date")
        return []
    output(
        f"{len(pending)} pending migration(s); locks measured on a scratch copy of this"
        " database's schema (results.lockinfo), never on the database itself"
    )
    plans = []
    with scratch_database(conninfo, "plan") as copy:
        copy_sql = schema_diff(copy, conninfo)
        if copy_sql.strip():
            with connect(copy, lambda _line: None) as conn:
                conn.execute(copy_sql.encode())
        for migration in pending:
            plans.append(_plan_one(copy, migration))
    for plan in plans:
        for line in describe(plan):
            output(line)
    return plans


def _plan_one(copy: str, migration: Migration) -> MigrationPlan:
    statements = []
    for statement in migration.up:
        measured = _in_transaction(copy, statement)
        if measured.error is None:
            with connect(copy, lambda _line: None) as conn:
                conn.execute(statement.encode())  # on the copy: the next statement sees it
        elif not migration.transactional:
            measured = _watched(copy, statement)  # runs it on the copy as well
        statements.append(measured)
    return MigrationPlan(migration, statements)


def describe(plan: MigrationPlan) -> list[str]:
    migration = plan.migration
    mode = (
        "one transaction: each lock is held until it commits"
        if migration.transactional
        else "outside a transaction: each statement's locks end with it"
    )
    lines = [f"{migration.path.name} ({mode})"]
    for number, measured in enumerate(plan.statements, start=1):
        lines.append(f"  [{number}] {first_line(measured.statement)}")
        if measured.error:
            lines.append(f"      not measured: {measured.error.splitlines()[0]}")
        notable = {r: m for r, m in measured.locks.items() if m in EFFECTS}
        if not measured.error and not notable:
            lines.append("      no lock that blocks writes (RowExclusiveLock at most)")
        for relation, lock in sorted(notable.items()):
            effect = EFFECTS.get(lock, "")
            mark = "✗" if relation == HOT_TABLE and lock == "AccessExclusiveLock" else " "
            note = f" {mark} {effect}" if relation == HOT_TABLE and effect else ""
            lines.append(f"      {relation}: {lock}{note}")
    strongest = plan.strongest(HOT_TABLE)
    if strongest == "AccessExclusiveLock":
        held = "until the migration commits" if migration.transactional else "for its statement"
        lines.append(
            f"  → ACCESS EXCLUSIVE on {HOT_TABLE} {held}: every claim and completion waits. Even"
            " a catalog-only change queues behind a running claim and every claim queues behind"
            " it: run it with a short lock_timeout, when the backlog is quiet"
        )
    elif strongest is not None:
        lines.append(f"  → strongest on {HOT_TABLE}: {strongest} ({EFFECTS.get(strongest, '')})")
    return lines
