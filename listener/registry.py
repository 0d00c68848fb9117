"""The `job_kinds` table: each worker registers the kinds it serves at start, and a producer
refuses a job of a kind no worker has registered, or with an option its kind does not declare.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from listener.errors import database_call
from listener.sqlfiles import queries
from listener.tiers import REALTIME, AutoRule

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from listener.handler import App


@dataclass(frozen=True)
class RegisteredKind:
    name: str
    options: frozenset[str] | None  # None: any option
    required_options: frozenset[str]
    budget: str | None
    tier: str = REALTIME  # its default tier
    batchable: bool = False
    auto: AutoRule | None = None  # the fleet's `auto` rule, as its latest worker registered it


@database_call("registering the worker's kinds failed")
async def register_kinds(pool: AsyncConnectionPool, app: App, auto: AutoRule) -> None:
    kinds = list(app)
    params = {
        "names": [kind.name for kind in kinds],
        # Option names are identifiers: joined by a unit separator, which none may hold.
        "options": ["" if k.options is None else "\x1f".join(sorted(k.options)) for k in kinds],
        "required": ["\x1f".join(sorted(kind.required_options)) for kind in kinds],
        "budgets": [kind.budget or "" for kind in kinds],
        "tiers": [kind.tier for kind in kinds],
        "batchable": [kind.batch for kind in kinds],
        "auto_min_items": auto.min_items,
        "auto_max_priority": auto.max_priority,
    }
    async with pool.connection() as conn:
        await conn.execute(queries("kinds")["register_kinds"], params)


def lookup_kind(conn: psycopg.Connection[Any], name: str) -> RegisteredKind | None:
    row = conn.execute(queries("kinds")["kind"], {"name": name}).fetchone()
    return None if row is None else _registered(row)


async def lookup_kind_async(conn: psycopg.AsyncConnection[Any], name: str) -> RegisteredKind | None:
    cursor = await conn.execute(queries("kinds")["kind"], {"name": name})
    row = await cursor.fetchone()
    return None if row is None else _registered(row)


def known_names(conn: psycopg.Connection[Any]) -> list[str]:
    return [str(row[0]) for row in conn.execute(queries("kinds")["kind_names"]).fetchall()]


async def known_names_async(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    cursor = await conn.execute(queries("kinds")["kind_names"])
    return [str(row[0]) for row in await cursor.fetchall()]


def _registered(row: tuple[Any, ...]) -> RegisteredKind:
    name, options, required, budget, tier, batchable, auto_min_items, auto_max_priority = row
    return RegisteredKind(
        name=str(name),
        options=None if options is None else frozenset(options),
        required_options=frozenset(required or ()),
        budget=budget,
        tier=str(tier),
        batchable=bool(batchable),
        auto=None
        if auto_min_items is None or auto_max_priority is None
        else AutoRule(int(auto_min_items), int(auto_max_priority)),
    )


def undeclared_options(kind: RegisteredKind, options: Mapping[str, Any]) -> list[str]:
    if kind.options is None:
        return []
    return sorted(name for name in options if name not in kind.options)
