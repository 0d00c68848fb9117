"""Store policy: each store's weight, caps and pause, as the operator set them in `stores`.

The workers keep a copy (`StorePolicies`): weights act in each process's ring, and a paused
store stays out of it. The copy is refreshed from `stores_changed` notifications (a trigger on
`stores`) and in full at every (re)connect and sweep. Caps and pause are also held by the claim
itself, in PostgreSQL, so a stale copy can never let a capped store exceed its cap.
`listener store …` reads and writes the table through `show` and `set_policy`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

import psycopg
from psycopg.rows import class_row

from listener.db import database_call, wrap
from listener.errors import UsageError
from listener.sqlfiles import queries

CHANNEL = "stores_changed"
WEIGHT_RANGE = (1, 1000)
PRIORITY_RANGE = (-100, 100)
# A cap beyond these is not a cap: refused like a typo (and int4 holds it).
MAX_RPM_LIMIT = 1_000_000
MAX_IN_FLIGHT = 1_000_000


@dataclass(frozen=True)
class StorePolicy:
    weight: int = 1
    rpm_limit: int | None = None
    max_in_flight: int | None = None
    paused: bool = False

    @property
    def capped(self) -> bool:
        return self.rpm_limit is not None or self.max_in_flight is not None


DEFAULT = StorePolicy()


class PolicyRow(NamedTuple):
    """A row of `stores` as the workers read it (`all_policies`, `policies_of`)."""

    instance_id: str
    weight: int
    rpm_limit: int | None
    max_in_flight: int | None
    paused: bool


class StorePolicies:
    """This process's copy of `stores`: only stores that differ from the defaults are kept."""

    def __init__(self) -> None:
        self._policies: dict[str, StorePolicy] = {}

    def __getitem__(self, store: str) -> StorePolicy:
        return self._policies.get(store, DEFAULT)

    def weight(self, store: str) -> int:
        return self[store].weight

    def paused(self, store: str) -> bool:
        return self[store].paused

    def __len__(self) -> int:
        return len(self._policies)

    def replace_all(self, rows: Iterable[PolicyRow | tuple[Any, ...]]) -> None:
        self._policies = {}
        self.update(rows, ())

    def update(self, rows: Iterable[PolicyRow | tuple[Any, ...]], asked: Iterable[str]) -> None:
        """Apply the rows read for the stores `asked` about; an asked store without a row is
        back to the defaults (its row was deleted)."""
        for store in asked:
            self._policies.pop(store, None)
        for store, weight, rpm_limit, max_in_flight, paused in rows:
            policy = StorePolicy(int(weight), rpm_limit, max_in_flight, bool(paused))
            if policy == DEFAULT:
                self._policies.pop(str(store), None)
            else:
                self._policies[str(store)] = policy


@database_call("reading the store policies failed")
async def read_all(conn: psycopg.AsyncConnection[Any]) -> list[PolicyRow]:
    async with conn.cursor(row_factory=class_row(PolicyRow)) as cursor:
        await cursor.execute(queries("stores")["all_policies"])
        return await cursor.fetchall()


@database_call("reading the store policies failed")
async def read_some(conn: psycopg.AsyncConnection[Any], stores: list[str]) -> list[PolicyRow]:
    async with conn.cursor(row_factory=class_row(PolicyRow)) as cursor:
        await cursor.execute(queries("stores")["policies_of"], {"stores": stores})
        return await cursor.fetchall()


# -- the operator's side (`listener store …`) ----------------------------------------------


def parse_int(field: str, text: str, low: int, high: int) -> int:
    """An integer argument in [low, high], or one line naming the field: "1.5", "x", "1e9"."""
    try:
        value = int(text.strip())
    except ValueError:
        raise UsageError(
            f"invalid {field} {text!r}: must be an integer from {low} to {high}"
        ) from None
    return check_range(field, value, low, high)


def parse_cap(field: str, text: str, high: int) -> int | None:
    """A cap argument: a positive integer, or "none" to remove the cap."""
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text.strip())
    except ValueError:
        raise UsageError(
            f"invalid {field} {text!r}: must be an integer from 1 to {high}, or none"
        ) from None
    return check_range(field, value, 1, high)


def check_range(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise UsageError(f"invalid {field} {value}: must be an integer from {low} to {high}")
    return value


def show(conninfo: str, store: str | None, limit: int = 200) -> list[tuple[Any, ...]]:
    try:
        with psycopg.connect(conninfo) as conn:
            return conn.execute(
                queries("stores")["show_stores"], {"instance_id": store, "limit": limit}
            ).fetchall()
    except psycopg.Error as error:
        raise wrap(error, "reading the stores failed") from error


# A cap left as it is (None removes the cap).
KEEP: Final = "keep"
Cap = int | Literal["keep"] | None


def set_policy(
    conninfo: str,
    store: str,
    *,
    weight: int | None = None,
    rpm_limit: Cap = KEEP,
    max_in_flight: Cap = KEEP,
    paused: bool | None = None,
    options: dict[str, Any] | None = None,
) -> None:
    """Upsert the store's row; fields left out keep their value (or the default). `options`:
    the defaults of every job of the store (a job's own options win), replacing the old ones."""
    if weight is not None:
        check_range("weight", weight, *WEIGHT_RANGE)
    if isinstance(rpm_limit, int):
        check_range("rpm", rpm_limit, 1, MAX_RPM_LIMIT)
    if isinstance(max_in_flight, int):
        check_range("max-in-flight", max_in_flight, 1, MAX_IN_FLIGHT)
    params = {
        "instance_id": store,
        "weight": weight,
        "rpm_limit": None if rpm_limit == KEEP else rpm_limit,
        "keep_rpm_limit": rpm_limit == KEEP,
        "max_in_flight": None if max_in_flight == KEEP else max_in_flight,
        "keep_max_in_flight": max_in_flight == KEEP,
        "paused": paused,
        "options": None if options is None else json.dumps(options),
    }
    try:
        with psycopg.connect(conninfo) as conn:
            conn.execute(queries("stores")["set_policy"], params)
    except psycopg.Error as error:
        raise wrap(error, f"changing store {store!r} failed") from error
