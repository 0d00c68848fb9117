"""The migration runner: `listener migrate up | down [N] | status | diff | check`.

A migration is one file in `migrations/`, named `<timestamp>_<name>.sql`, holding an `-- up --`
and a `-- down --` block. It runs in one transaction unless its header says
`-- transaction: off` (needed for CREATE INDEX CONCURRENTLY and for a backfill that commits per
batch); such a migration is written so that every statement can run again.

A transactional migration is recorded in `schema_migrations` inside its own transaction: it is
applied and recorded, or neither. A non-transactional one is recorded after its last statement;
a runner killed before that runs it again from the top, which its idempotent statements allow
(`tests/test_migrations.py` kills a real runner after every statement to prove it).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from typing import LiteralString

import pglast
import psycopg
from psycopg import sql

from listener.errors import DatabaseError, MigrationError
from listener.sqlfiles import SQL_DIR, data_dir, parse_blocks

MIGRATIONS_DIR = data_dir("migrations")
SCHEMA_FILE = SQL_DIR / "schema.sql"
# Any fixed 64-bit number: every runner of every deploy contends for the same lock.
ADVISORY_LOCK_KEY = 7_310_420_115_001
LOCK_POLL_SECONDS = 0.5
_NON_TRANSACTIONAL = re.compile(r"^-- transaction: off\s*$", re.MULTILINE)

Output = Callable[[str], None]
# Called after each statement has run (in a transaction: before the commit) with its number, and
# with None once the migration is complete (committed and recorded): where a test interrupts a
# real runner.
AfterStatement = Callable[["Migration", int | None], None]


@dataclass(frozen=True)
class Migration:
    name: str
    path: Traversable
    transactional: bool
    up: tuple[str, ...]
    down: tuple[str, ...]


def split_statements(text: str) -> tuple[str, ...]:
    """Statements of a block, with pglast's splitter: it knows `$$` bodies and comments."""
    return tuple(s for s in pglast.split(text, with_parser=False) if strip_comments(s))


def strip_comments(statement: str) -> str:
    lines = [ln for ln in statement.splitlines() if not ln.strip().startswith("--")]
    return "\n".join(lines).strip()


def load_migrations(directory: Traversable = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    files = (entry for entry in directory.iterdir() if entry.name.endswith(".sql"))
    for path in sorted(files, key=lambda entry: entry.name):
        text = path.read_text(encoding="utf-8")
        blocks = parse_blocks(text)
        if "up" not in blocks or "down" not in blocks:
            raise MigrationError(f"{path.name}: needs an '-- up --' and a '-- down --' block")
        migrations.append(
            Migration(
                name=path.name.removesuffix(".sql"),
                path=path,
                transactional=not _NON_TRANSACTIONAL.search(text),
                up=split_statements(blocks["up"]),
                down=split_statements(blocks["down"]),
            )
        )
    return migrations


def _print(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - the runner's output is for the operator's terminal


def connect(conninfo: str, output: Output) -> psycopg.Connection[tuple[object, ...]]:
    try:
        conn = psycopg.connect(conninfo, autocommit=True, application_name="listener-migrate")
    except psycopg.OperationalError as error:
        raise DatabaseError(f"cannot connect to the database: {error}".strip()) from error

    # Migrations speak through RAISE NOTICE: a backfill's progress reaches the terminal live.
    # Only RAISE is shown; the server's own "does not exist, skipping" notes are noise here.
    def forward(diag: psycopg.errors.Diagnostic) -> None:
        if diag.source_function == "exec_stmt_raise":
            output(diag.message_primary or "")

    conn.add_notice_handler(forward)
    return conn


class MigrationRunner:
    def __init__(
        self,
        conninfo: str,
        output: Output = _print,
        migrations: list[Migration] | None = None,
        after_statement: AfterStatement | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.output = output
        self.migrations = load_migrations() if migrations is None else migrations
        self.after_statement = after_statement

    @contextlib.contextmanager
    def _locked(self) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
        """A session holding the advisory lock: concurrent deploys run one after the other."""
        with connect(self.conninfo, self.output) as conn:
            # Wait client-side: a session blocked in pg_advisory_lock() holds a snapshot, and the
            # other runner's CREATE INDEX CONCURRENTLY would wait for it: a deadlock.
            waited = False
            lock = "SELECT pg_try_advisory_lock(%s)"
            while conn.execute(lock, (ADVISORY_LOCK_KEY,)).fetchone() != (True,):
                if not waited:
                    self.output("waiting for another migration runner to finish...")
                    waited = True
                time.sleep(LOCK_POLL_SECONDS)
            try:
                ensure_tracking_table(conn)
                yield conn
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))

    def applied(self, conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
        rows = conn.execute("SELECT name FROM schema_migrations ORDER BY name").fetchall()
        return [str(row[0]) for row in rows]

    def up(self) -> list[str]:
        """Apply every pending migration in order; return the names applied."""
        done: list[str] = []
        with self._locked() as conn:
            applied = set(self.applied(conn))
            for migration in self.migrations:
                if migration.name in applied:
                    continue
                self.output(f"applying {migration.name}")
                self._run(conn, migration, migration.up, _RECORD)
                done.append(migration.name)
        if not done:
            self.output("nothing to apply: the database is up to date")
        return done

    def down(self, count: int = 1) -> list[str]:
        """Revert the last `count` applied migrations, newest first."""
        if count < 1:
            raise MigrationError("down needs a count of at least 1")
        by_name = {m.name: m for m in self.migrations}
        undone: list[str] = []
        with self._locked() as conn:
            for name in reversed(self.applied(conn)[-count:]):
                migration = by_name.get(name)
                if migration is None:
                    raise MigrationError(f"{name} is applied but its file is missing")
                self.output(f"reverting {name}")
                self._run(conn, migration, migration.down, _FORGET)
                undone.append(name)
        return undone

    def status(self) -> list[tuple[str, bool]]:
        with connect(self.conninfo, self.output) as conn:
            ensure_tracking_table(conn)
            applied = set(self.applied(conn))
        rows = [(m.path.name, m.name in applied) for m in self.migrations]
        for filename, is_applied in rows:
            self.output(f"{filename} [{'COMPLETED' if is_applied else 'PENDING'}]")
        return rows

    def _run(
        self,
        conn: psycopg.Connection[tuple[object, ...]],
        migration: Migration,
        statements: tuple[str, ...],
        record: LiteralString,
    ) -> None:
        """Run a block's statements, then `record` (the schema_migrations row's change, given the
        migration's name): in the migration's transaction when it has one, so a crash cannot
        leave it applied but unrecorded (or reverted but still recorded)."""
        transaction = conn.transaction() if migration.transactional else contextlib.nullcontext()
        with transaction:
            for number, statement in enumerate(statements, start=1):
                try:
                    conn.execute(statement.encode())
                except psycopg.Error as error:
                    raise MigrationError(
                        f"{migration.path.name} failed"
                        f"{' and was rolled back' if migration.transactional else ''}: "
                        f"{str(error).strip()}\n  in statement: {first_line(statement)}"
                    ) from error
                if self.after_statement is not None:
                    self.after_statement(migration, number)
            conn.execute(record, (migration.name,))
        if self.after_statement is not None:
            self.after_statement(migration, None)


_RECORD: LiteralString = "INSERT INTO schema_migrations (name) VALUES (%s)"
_FORGET: LiteralString = "DELETE FROM schema_migrations WHERE name = %s"


def first_line(statement: str) -> str:
    code = strip_comments(statement)
    first = code.splitlines()[0] if code else statement
    return first + (" ..." if "\n" in code else "")


def ensure_tracking_table(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )


# -- diff and check, with migra's engine (results.dbdiff) ----------------------------------------


@contextlib.contextmanager
def scratch_database(conninfo: str, purpose: str) -> Iterator[str]:
    """A throwaway database on the same server, dropped on the way out."""
    name = f"listener_{purpose}_{secrets.token_hex(4)}"
    with connect(conninfo, lambda _line: None) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(conninfo, dbname=name)
    finally:
        with connect(conninfo, lambda _line: None) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def load_schema_file(conninfo: str) -> None:
    with connect(conninfo, lambda _line: None) as conn:
        conn.execute(SCHEMA_FILE.read_text(encoding="utf-8").encode())
        ensure_tracking_table(conn)


def schema_diff(from_conninfo: str, to_conninfo: str) -> str:
    """SQL that turns the `from` database's schema into the `to` database's."""
    from results.dbdiff import Migration as DbDiff

    with (
        psycopg.connect(from_conninfo, autocommit=True) as source,
        psycopg.connect(to_conninfo, autocommit=True) as target,
    ):
        diff = DbDiff(source.cursor(), target.cursor())
        diff.set_safety(False)
        diff.add_all_changes_ordered()
        return str(diff.sql)


def diff_against_schema(conninfo: str) -> str:
    """`migrate diff`: what turns the live database into `sql/schema.sql`."""
    with scratch_database(conninfo, "target") as target:
        load_schema_file(target)
        return schema_diff(conninfo, target)


def check_migrations(conninfo: str, migrations: list[Migration] | None = None) -> str:
    """`migrate check`: an empty database migrated up must equal `sql/schema.sql`."""
    with (
        scratch_database(conninfo, "migrated") as migrated,
        scratch_database(conninfo, "target") as target,
    ):
        MigrationRunner(migrated, output=lambda _line: None, migrations=migrations).up()
        load_schema_file(target)
        return schema_diff(migrated, target)
