"""Sample and file products for `enqueue`, and the progress `status` reads (creating a job is
`listener.producer`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg

from listener.db import wrap
from listener.errors import ListenerError
from listener.sqlfiles import queries

CATEGORIES = ("Home", "Outdoor", "Kitchen", "Toys", "Fashion", "Garden")


def sample_products(count: int, store: str) -> list[dict[str, Any]]:
    """Synthetic products for demos and load tests."""
    return [
        {
            "id": f"{store}-p{n}",
            "name": f"{CATEGORIES[n % len(CATEGORIES)]} item {n} from {store}",
            "description": "A well-made product our customers love.",
            "category": CATEGORIES[n % len(CATEGORIES)],
            "price": round(9.99 + n % 50, 2),
            "attributes": {"color": ("red", "blue", "green")[n % 3], "sku": f"SKU-{n:05d}"},
        }
        for n in range(1, count + 1)
    ]


def read_products(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ListenerError(f"cannot read products from {path}: {error}") from None
    if not isinstance(data, list):
        raise ListenerError(f"{path} must hold a JSON array of products")
    return data


def _fetch(conninfo: str, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    try:
        with psycopg.connect(conninfo) as conn:
            return conn.execute(queries("jobs")[name], params).fetchall()
    except psycopg.Error as error:
        raise wrap(error, f"reading {name.replace('_', ' ')} failed") from error


def job_progress(conninfo: str, job_id: int) -> tuple[Any, ...] | None:
    rows = _fetch(conninfo, "job_progress", {"job_id": job_id})
    return rows[0] if rows else None


def recent_jobs(conninfo: str, limit: int = 10) -> list[tuple[Any, ...]]:
    return _fetch(conninfo, "recent_jobs", {"limit": limit})


def backlog_by_store(conninfo: str, limit: int = 20) -> list[tuple[Any, ...]]:
    return _fetch(conninfo, "backlog_by_store", {"limit": limit})


def failed_items(conninfo: str, job_id: int, limit: int = 10) -> list[tuple[Any, ...]]:
    return _fetch(conninfo, "failed_items", {"job_id": job_id, "limit": limit})


def job_batches(conninfo: str, job_id: int) -> list[tuple[Any, ...]]:
    return _fetch(conninfo, "job_batches", {"job_id": job_id})
