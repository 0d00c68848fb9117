"""The built wheel: what it holds, its metadata, and what a production install of it does in a
clean virtual environment (not editable, no checkout to fall back on, no extras)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import venv
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest

import listener
from listener.embedded import MISSING_EXTRA
from listener.migrate import load_migrations
from listener.sqlfiles import SQL_DIR, queries
from listener.stub.server import StubConfig, run_stub
from tests.support import (
    UNSET,
    WorkerProcess,
    communicate,
    wait_for_counts,
    wait_until,
    worker_is_ready,
)

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "fair-pg-worker"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    # setuptools builds in the checkout's build/ folder: two test processes (pytest-xdist) or a
    # developer's own build at once collide there ("File exists"), so one builds at a time.
    lock_path = ROOT / "build" / ".wheel.lock"
    lock_path.parent.mkdir(exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(dist)],
            check=True,
        )
    [built] = dist.glob("fair_pg_worker-*.whl")
    return built


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_wheel_holds_every_package_query_and_migration_of_the_checkout(wheel: Path) -> None:
    names = _names(wheel)
    # The packages are listed in pyproject.toml (sql/ and migrations/ are mapped into the
    # package): a subpackage added to the checkout and not to that list fails here.
    # Every file of the package, modules and data alike (a kind's TOML, a template, ...): a new
    # subpackage or data file needs a line there too.
    for path in (ROOT / "listener").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            assert path.relative_to(ROOT).as_posix() in names, "add it to pyproject.toml"
    for folder in ("sql", "migrations"):
        files = sorted(path.name for path in (ROOT / folder).glob("*.sql"))
        assert files
        assert files == sorted(
            name.rpartition("/")[2] for name in names if name.startswith(f"listener/{folder}/")
        )
    assert not any(name.startswith(("sql/", "migrations/", "tests/")) for name in names)


def test_the_wheel_says_its_name_version_licence_and_extras(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        headers = HeaderParser().parsestr(archive.read(metadata).decode())
        licence = archive.read(metadata.replace("METADATA", "licenses/LICENSE")).decode()
    assert headers["Name"] == DISTRIBUTION
    assert headers["Version"] == listener.__version__
    assert headers["License-Expression"] == "MIT"
    assert "Copyright (c) 2026 the listener authors" in licence
    requires = headers.get_all("Requires-Dist") or []
    # A production install carries no PostgreSQL binaries: pgserver comes with the extra alone.
    [pgserver] = [r for r in requires if r.startswith("pgserver")]
    assert 'extra == "embedded"' in pgserver
    assert "embedded" in (headers.get_all("Provides-Extra") or [])


def test_an_unpacked_wheel_finds_its_queries_and_migrations(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    # Run from elsewhere with only the unpacked wheel on the path: no checkout to fall back on.
    probe = (
        "import listener.sqlfiles as s, listener.migrate as m;"
        "print(len(s.queries('items')), len(m.load_migrations()), s.SQL_DIR)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {probe}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    blocks, count, where = out.split(maxsplit=2)
    assert int(blocks) == len(queries("items"))
    assert int(count) == len(load_migrations())
    assert Path(where.strip()) == site / "listener" / "sql"


def test_a_checkout_finds_the_top_level_folders() -> None:
    # This suite runs on an editable install; a plain `python -m listener` from the repository's
    # root imports the same folder: both read sql/ and migrations/ at the top level.
    assert Path(str(SQL_DIR)) == ROOT / "sql"
    assert len(load_migrations()) == len(list((ROOT / "migrations").glob("*.sql")))
    probe = (
        "import listener.sqlfiles as s, listener.migrate as m; print(s.SQL_DIR, m.MIGRATIONS_DIR)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, ''); {probe}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [Path(p) for p in out] == [ROOT / "sql", ROOT / "migrations"]


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into a fresh virtual environment with its dependencies from the
    package index, as `pip install fair-pg-worker` does: the bin folder."""
    where = tmp_path_factory.mktemp("clean") / "venv"
    venv.create(where, with_pip=True)
    subprocess.run([where / "bin" / "pip", "install", "-q", str(wheel)], check=True)
    return where / "bin"


def _clean_env(**env: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in (*UNSET, "VIRTUAL_ENV")} | env


def _run(bin_dir: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [bin_dir / "listener", *args],
        cwd=cwd,
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_a_production_install_needs_a_database_url_and_has_no_embedded_server(
    installed: Path, tmp_path: Path
) -> None:
    version = _run(installed, tmp_path, "--version")
    assert (version.returncode, version.stdout) == (0, f"listener {listener.__version__}\n")
    probe = [installed / "python", "-c", "import listener; print(listener.__file__)"]
    imported = subprocess.run(probe, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(imported.stdout.strip()).is_relative_to(installed.parent / "lib")
    unset = _run(installed, tmp_path, "status")
    assert unset.returncode == 2
    assert unset.stderr.startswith("listener: invalid setting DATABASE_URL: not set"), unset.stderr
    assert "--embedded" in unset.stderr and unset.stderr.count("\n") == 1
    embedded = _run(installed, tmp_path, "--embedded", "migrate", "status")
    assert (embedded.returncode, embedded.stderr) == (2, f"listener: {MISSING_EXTRA}\n")
    assert not (tmp_path / ".pgdata").exists()


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_installed_wheel_migrates_and_its_worker_completes_an_item(
    installed: Path, empty_database_url: str, tmp_path: Path
) -> None:
    url = empty_database_url
    for step in (("migrate", "up"), ("migrate", "check")):
        done = _run(installed, tmp_path, *step, DATABASE_URL=url)
        assert done.returncode == 0, done.stdout + done.stderr
    enqueued = _run(
        installed, tmp_path, "enqueue", "--store", "s1", "--products", "2", DATABASE_URL=url
    )
    assert enqueued.returncode == 0, enqueued.stderr
    async with run_stub(StubConfig()) as stub:
        env = _clean_env(
            DATABASE_URL=url,
            OPENAI_API_KEY="test-key",
            OPENAI_BASE_URL=stub.base_url,
            RATE_LIMIT_RPM="0",
            RATE_LIMIT_TPM="0",
        )
        worker = WorkerProcess([str(installed / "listener"), "worker"], env, cwd=tmp_path)
        try:
            await wait_until(lambda: worker_is_ready(url, worker.pid))
            await wait_for_counts(url, lambda counts: counts == {"COMPLETED": 2})
        finally:
            worker.send_signal(signal.SIGTERM)
            output = await communicate(worker, 30)
    assert worker.returncode == 0, output
    assert stub.state.completed_total == 2


def test_the_changelog_has_an_entry_for_this_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{listener.__version__}] - " in text
