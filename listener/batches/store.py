"""Our record of OpenAI batches (`openai_batches`) and the items they hold: thin calls of the
named SQL in `sql/batches.sql`, each on the step's own connection (the one holding its lock).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

import anyio
import psycopg
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from listener.db import database_call
from listener.items import ClaimedItem
from listener.sqlfiles import queries
from listener.tiers import BATCH

Connection = psycopg.AsyncConnection[Any]

# One advisory lock per step (distinct from the migrations', retention's, statistics' and the
# stranded sweep's): collecting, submitting (upload and create) and polling each run in one
# process of the fleet at a time, and the three may run in different processes at once.
COLLECT_LOCK = 7_310_420_115_010
SUBMIT_LOCK = 7_310_420_115_011
POLL_LOCK = 7_310_420_115_012


def claimed_by(batch_id: int) -> str:
    """The `claimed_by` of the items a batch holds."""
    return f"batch:{batch_id}"


@dataclass(frozen=True)
class BatchRow:
    id: int
    kind: str
    model: str
    state: str
    input_file_id: str | None
    openai_batch_id: str | None
    status: str | None
    request_count: int
    completed_count: int
    failed_count: int
    estimated_tokens: int
    output_file_id: str | None
    error_file_id: str | None
    outcome: str | None
    last_error: str | None
    created_at: datetime
    submitted_at: datetime | None


@asynccontextmanager
async def step_lock(pool: AsyncConnectionPool, key: int) -> AsyncIterator[Connection | None]:
    """A connection holding the step's advisory lock, or None when another process holds it
    (the step is skipped, never waited for)."""
    async with pool.connection() as conn:
        cursor = await conn.execute(queries("batches")["try_lock"], {"key": key})
        row = await cursor.fetchone()
        if not (row and row[0]):
            yield None
            return
        try:
            yield conn
        finally:
            # A connection going back to the pool must not keep the lock, not even when the
            # step is being cancelled (the worker stopping): shielded.
            with anyio.CancelScope(shield=True):
                if not conn.closed and not conn.broken:
                    await conn.execute(queries("batches")["unlock"], {"key": key})


@database_call("reading the batches failed")
async def open_batches(conn: Connection, states: Sequence[str]) -> list[BatchRow]:
    async with conn.cursor(row_factory=class_row(BatchRow)) as cursor:
        await cursor.execute(queries("batches")["open_batches"], {"states": list(states)})
        return await cursor.fetchall()


@database_call("counting the due batch items failed")
async def due_by_store(conn: Connection, kind: str, cap: int) -> list[tuple[str, int]]:
    cursor = await conn.execute(queries("batches")["due_by_store"], {"kind": kind, "cap": cap})
    return [(str(store), int(due)) for store, due in await cursor.fetchall()]


@database_call("collecting items into a batch failed")
async def collect(
    conn: Connection, kind: str, model: str, stores: Sequence[str], limits: Sequence[int]
) -> tuple[int, int] | None:
    """A new batch of ours holding the heads of `stores`' due items (`limits` of each), in one
    transaction: (batch id, items), or None when it took none (nothing is left behind)."""
    sql = queries("batches")
    async with conn.transaction():
        cursor = await conn.execute(sql["new_batch"], {"kind": kind, "model": model})
        row = await cursor.fetchone()
        assert row is not None
        batch_id = int(row[0])
        params = {"batch_id": batch_id, "kind": kind, "stores": list(stores),
                  "limits": list(limits)}  # fmt: skip
        await conn.execute(sql["take_items"], params)
        cursor = await conn.execute(sql["count_taken"], {"batch_id": batch_id})
        counted = await cursor.fetchone()
        taken = int(counted[0]) if counted else 0
        if taken == 0:
            await conn.execute(sql["drop_batch"], {"batch_id": batch_id})
            return None
    return batch_id, taken


@database_call("reading a batch's items failed")
async def batch_items(conn: Connection, batch_id: int, max_payload_bytes: int) -> list[ClaimedItem]:
    """The items batch `batch_id` still holds (not cancelled, not written yet), in id order."""
    params = {"batch_id": batch_id, "max_payload_bytes": max_payload_bytes}
    cursor = await conn.execute(queries("batches")["batch_items"], params)
    items = []
    for row in await cursor.fetchall():
        (id_, job_id, store, product_id, payload_text, payload_bytes, attempts, kind,
         options) = row  # fmt: skip
        items.append(
            ClaimedItem(
                id=int(id_),
                job_id=int(job_id),
                instance_id=str(store),
                product_id=product_id,
                payload_text=payload_text,
                payload_bytes=payload_bytes,
                attempts=int(attempts),
                kind=str(kind),
                options=MappingProxyType(json.loads(options or "{}")),
                tier=BATCH,
            )
        )
    return items


@database_call("counting a batch's wanted items failed")
async def still_wanted(conn: Connection, batch_id: int) -> int:
    cursor = await conn.execute(queries("batches")["still_wanted"], {"batch_id": batch_id})
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


@database_call("recording a batch failed")
async def execute(conn: Connection, name: str, params: dict[str, Any]) -> int:
    """Run one named statement of sql/batches.sql (its own commit); the rows it changed."""
    cursor = await conn.execute(queries("batches")[name], params)
    return cursor.rowcount


@database_call("reading the enqueued tokens failed")
async def enqueued_tokens(conn: Connection, model: str, batch_id: int) -> int:
    params = {"model": model, "batch_id": batch_id}
    cursor = await conn.execute(queries("batches")["enqueued_tokens"], params)
    row = await cursor.fetchone()
    return int(row[0]) if row else 0
