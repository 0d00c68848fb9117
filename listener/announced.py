"""Announced stores: the claimer retires those it found drained, the listener clears the rest.

The insert trigger notifies only for a store it adds to `announced_stores` (`sql/schema.sql`),
so a busy store's producers commit without the database-wide notify lock. The price: a store
stays announced, and silent, until someone finds it drained and retires it. The claimer does
so for every store a claim came back short for; `listener_retire_announced` tells it each
store's fate, and a store that is not retired goes on being looked at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg_pool import AsyncConnectionPool

from listener.db import database_call
from listener.sqlfiles import queries

Fate = Literal["retired", "pending", "busy"]


@dataclass(frozen=True)
class Retirement:
    """What became of the stores a retirement judged.

    `pending`: due items after all (committed after the claim's snapshot, announced by nobody):
    claim them. `busy`: a producer of the store's lock slot was committing, nothing was judged:
    look again in a moment."""

    retired: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)


def _sorted(rows: Sequence[tuple[Any, ...]]) -> Retirement:
    found = Retirement()
    lists: dict[str, list[str]] = {
        "retired": found.retired,
        "pending": found.pending,
        "busy": found.busy,
    }
    for store, fate in rows:
        lists[str(fate)].append(str(store))
    return found


@database_call("retiring drained stores failed")
async def retire_drained(
    pool: AsyncConnectionPool, stores: Sequence[str], kinds: Sequence[str]
) -> Retirement:
    """Retire `stores`, found drained of due items of `kinds` by a claim."""
    if not stores:
        return Retirement()
    params = {"stores": sorted(set(stores)), "kinds": list(kinds)}
    async with pool.connection() as conn:
        cursor = await conn.execute(queries("items")["retire_drained"], params)
        return _sorted(await cursor.fetchall())


@database_call("clearing stale announced stores failed")
async def retire_stale(conn: psycopg.AsyncConnection[Any], kinds: Sequence[str]) -> Retirement:
    """Retire the announced stores of `kinds` with no due item that nobody retired."""
    cursor = await conn.execute(queries("items")["retire_stale"], {"kinds": list(kinds)})
    return _sorted(await cursor.fetchall())
