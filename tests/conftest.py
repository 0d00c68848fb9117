"""Every test talks to a real PostgreSQL: the machine's server when it answers on 127.0.0.1:5432
(CI), otherwise a throwaway server started with pgserver. Each test gets a fresh database, copied
from a template migrated once per session.
"""

from __future__ import annotations

import itertools
import os
import queue
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from pytest_postgresql.janitor import DatabaseJanitor

from listener.migrate import MigrationRunner


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str

    def conninfo(self, dbname: str) -> str:
        return make_conninfo("", host=self.host, port=self.port, user=self.user, dbname=dbname)


def _answers(server: Server) -> bool:
    try:
        with psycopg.connect(server.conninfo("postgres"), connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    machine = Server(
        host=os.environ.get("LISTENER_TEST_PGHOST", "127.0.0.1"),
        port=int(os.environ.get("LISTENER_TEST_PGPORT", "5432")),
        user=os.environ.get("LISTENER_TEST_PGUSER", "postgres"),
    )
    if _answers(machine):
        yield machine
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="listener-pg-") as data_dir:
        embedded = pgserver.get_server(data_dir, cleanup_mode="stop")
        try:
            yield Server(host=data_dir, port=5432, user="postgres")
        finally:
            embedded.cleanup()


_names = itertools.count()


def _janitor(server: Server, dbname: str, template: str | None = None) -> DatabaseJanitor:
    return DatabaseJanitor(
        user=server.user,
        host=server.host,
        port=server.port,
        dbname=dbname,
        template_dbname=template,
    )


class Dropper:
    """Drops the tests' databases on a thread of its own. PostgreSQL 15's DROP DATABASE forces a
    checkpoint (about a second here, more under load): a test need not wait for the one before it
    to be dropped. Names are unique (pid and counter), so nothing waits for a name to be free."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.pending: queue.Queue[str | None] = queue.Queue()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="drop-test-databases", daemon=True)
        self.thread.start()

    def drop(self, dbname: str) -> None:
        self.pending.put(dbname)

    def _run(self) -> None:
        while (dbname := self.pending.get()) is not None:
            try:
                # Refuses new connections, ends the test's leftovers, then drops.
                _janitor(self.server, dbname).drop()
            except Exception as error:  # raised in the main thread by close()
                self.errors.append(error)

    def close(self) -> None:
        """Every queued database dropped; a drop that failed fails the session's teardown."""
        self.pending.put(None)
        self.thread.join()
        if self.errors:
            raise ExceptionGroup("test databases not dropped", self.errors)


@pytest.fixture(scope="session")
def dropper(pg_server: Server) -> Iterator[Dropper]:
    dropper = Dropper(pg_server)
    try:
        yield dropper
    finally:
        dropper.close()


@pytest.fixture(scope="session")
def migrated_template(pg_server: Server) -> Iterator[str]:
    # One per process (each xdist worker builds its own): a copy ends every session on its
    # template first, so a template shared with a worker still migrating it would break.
    name = f"listener_template_{os.getpid()}"
    janitor = _janitor(pg_server, name)
    janitor.init()
    try:
        MigrationRunner(pg_server.conninfo(name), output=lambda _line: None).up()
        yield name
    finally:
        janitor.drop()


def _fresh(server: Server, dropper: Dropper, template: str | None) -> Iterator[str]:
    name = f"listener_test_{os.getpid()}_{next(_names)}"
    _janitor(server, name, template).init()
    try:
        yield server.conninfo(name)
    finally:
        dropper.drop(name)


@pytest.fixture
def database_url(pg_server: Server, dropper: Dropper, migrated_template: str) -> Iterator[str]:
    """A fresh database at the schema of `sql/schema.sql`, reached through the migrations."""
    yield from _fresh(pg_server, dropper, migrated_template)


@pytest.fixture
def empty_database_url(pg_server: Server, dropper: Dropper) -> Iterator[str]:
    """A fresh, empty database (no migration applied)."""
    yield from _fresh(pg_server, dropper, None)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# The system's Chromium (Debian's `chromium` package): Playwright's own browser download cannot
# be fetched everywhere the tests run. `.ci/run` installs it.
CHROMIUM = os.environ.get("LISTENER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Fifty tabs of one site share a few renderer processes instead of fifty.
    "--renderer-process-limit=4",
]


@pytest.fixture
def chromium_path() -> str:
    """The browser's path; in CI its absence fails the test instead of skipping it."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs it (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
