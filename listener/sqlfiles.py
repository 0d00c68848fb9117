"""Named SQL blocks loaded once from the `sql/` folder.

A file holds blocks introduced by a line `-- name --`, the procrastinate convention, so that the
SQL is reviewed, highlighted and EXPLAINed as SQL rather than as Python strings.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from importlib.resources.abc import Traversable
from pathlib import Path


def data_dir(name: str) -> Traversable:
    """`sql` or `migrations`: inside the package when it is installed from a wheel (setuptools
    maps the repository's top-level folders to listener/sql and listener/migrations), beside it
    in a checkout (an editable install, or `python -m listener` from the repository's root)."""
    packaged = importlib.resources.files("listener") / name
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / name


SQL_DIR = data_dir("sql")
_HEADER = re.compile(r"^-- ([a-z_]+) --\s*$", re.MULTILINE)


def parse_blocks(text: str) -> dict[str, str]:
    """Split a file's text into its named blocks."""
    parts = _HEADER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    blocks: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in blocks:
            raise ValueError(f"duplicate SQL block {name!r}")
        blocks[name] = body.strip()
    return blocks


@functools.cache
def queries(filename: str) -> dict[str, str]:
    """The named blocks of `sql/<filename>.sql`, parsed once per process."""
    return parse_blocks((SQL_DIR / f"{filename}.sql").read_text(encoding="utf-8"))
