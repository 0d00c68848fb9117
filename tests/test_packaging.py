"""The wheel carries the SQL and the migrations, and an installed package finds them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from listener.migrate import load_migrations
from listener.sqlfiles import SQL_DIR, queries

ROOT = Path(__file__).resolve().parent.parent


def test_an_unpacked_wheel_finds_its_queries_and_migrations(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(dist)],
        check=True,
    )
    [wheel] = dist.glob("listener-*.whl")
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
    assert where.strip().startswith(str(site))
    assert str(SQL_DIR) != where.strip()
