"""Issue 11, defect 4: a runner killed anywhere in `migrate up` leaves a database that the next
`up` finishes, with nothing applied twice and nothing missing. The runner is a real process
SIGKILLed after each statement in turn (see `migrate_then_die.py`)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from listener.migrate import (
    MigrationRunner,
    load_migrations,
    load_schema_file,
    schema_diff,
    scratch_database,
)
from tests.conftest import Server
from tests.support import (
    query_blocking,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "migrate_then_die.py"
# (migration, statement number): killed after that statement ran; None: after it was complete.
STEPS: list[tuple[str, int | None]] = [
    (migration.name, number)
    for migration in load_migrations()
    for number in [*range(1, len(migration.up) + 1), None]
]


@pytest.fixture(scope="module")
def schema_target(pg_server: Server) -> Iterator[str]:
    """sql/schema.sql loaded once: what every recovered database must equal."""
    with scratch_database(pg_server.conninfo("postgres"), "crash_target") as target:
        load_schema_file(target)
        yield target


@pytest.mark.parametrize(
    "kill_after", range(1, len(STEPS) + 1), ids=[f"{n}:{s or 'done'}" for n, s in STEPS]
)
def test_up_killed_after_any_step_is_finished_by_the_next_up(
    empty_database_url: str, schema_target: str, kill_after: int
) -> None:
    killed = subprocess.run(
        [sys.executable, str(SCRIPT), empty_database_url, str(kill_after)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    name, number = STEPS[kill_after - 1]
    migration = next(m for m in load_migrations() if m.name == name)
    recorded = {
        row[0] for row in query_blocking(empty_database_url, "SELECT name FROM schema_migrations")
    }
    # Killed before its commit, a transactional migration left nothing behind, not even its row.
    if migration.transactional and number is not None:
        assert name not in recorded
    if number is None:
        assert name in recorded

    MigrationRunner(empty_database_url, output=lambda _line: None).up()

    names = [
        row[0] for row in query_blocking(empty_database_url, "SELECT name FROM schema_migrations")
    ]
    assert sorted(names) == [m.name for m in load_migrations()]
    assert schema_diff(empty_database_url, schema_target) == "", (name, number)
