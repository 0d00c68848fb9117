"""The producer API: a Python app creates a job and its items with one call.

    from listener import enqueue
    job_id = enqueue(DATABASE_URL, "store-42", products, priority=10)

One transaction: the job row, then every item in one COPY, so a 10,000-product job costs a few
round trips, and the trigger sends the store's one notification at commit. Given an open
connection in a transaction instead of a URL, the job joins that transaction (as a savepoint),
so an app creates it together with its own rows, or not at all; on an idle connection it
commits at once (psycopg's `transaction()` rule). Every rule the tables enforce is checked first
and refused with `InvalidJob`, naming the first bad entry by its index, before anything is
written.

This module is what `import listener` loads: psycopg and nothing of the worker.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from listener.errors import DatabaseError, ListenerError
from listener.handler import DEFAULT_KIND, KIND_NAME
from listener.registry import (
    RegisteredKind,
    known_names,
    known_names_async,
    lookup_kind,
    lookup_kind_async,
)
from listener.sqlfiles import queries
from listener.tiers import BATCH, REALTIME, TIERS, AutoRule, resolve

# The tables' CHECKs (sql/schema.sql): keep them in step.
MAX_STORE_BYTES = 255  # jobs_instance_id_valid, job_items_instance_id_valid
MAX_PRODUCT_ID_BYTES = 1024  # job_items_product_id_length
MIN_PRIORITY, MAX_PRIORITY = -100, 100

# `\u0000` in JSON text that is not an escaped backslash followed by "u0000": jsonb refuses it.
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# One encoder for every payload: json.dumps would build one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class InvalidJob(ListenerError):
    """The job breaks a rule of the tables; nothing was written."""


@dataclass(frozen=True)
class PreparedJob:
    store: str
    priority: int
    items: list[tuple[str, str]]  # (product id, payload as JSON text)
    kind: str = DEFAULT_KIND
    options: str = "{}"  # the job's options as JSON text
    option_names: tuple[str, ...] = ()
    tier: str | None = None  # as asked; None: the kind's default


def _has_control_character(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in text)


def check_store(store: object) -> str:
    if not isinstance(store, str):
        raise InvalidJob(f"the store id must be a string, got {type(store).__name__}")
    if not store.strip(" "):  # btrim() trims spaces only
        raise InvalidJob("the store id is empty or blank (jobs_instance_id_valid)")
    size = len(store.encode("utf-8", errors="surrogatepass"))
    if size > MAX_STORE_BYTES:
        raise InvalidJob(
            f"the store id is {size} bytes, over the limit of {MAX_STORE_BYTES} "
            "(jobs_instance_id_valid)"
        )
    if _has_control_character(store):
        raise InvalidJob("the store id holds a control character (jobs_instance_id_valid)")
    _check_text(store, "the store id")
    return store


def _check_text(text: str, what: str) -> None:
    if "\x00" in text:
        raise InvalidJob(f"{what} holds a NUL character, which PostgreSQL text cannot store")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidJob(f"{what} holds a lone surrogate, which is not valid UTF-8") from None


def check_priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidJob(f"priority must be an integer, got {type(priority).__name__}")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidJob(f"priority {priority} is outside {MIN_PRIORITY}..{MAX_PRIORITY}")
    return priority


def _product_id(product: dict[str, Any], index: int) -> str:
    value = product.get("id")
    if value is None:  # as the SQL's coalesce(id, product_id, position) read it
        value = product.get("product_id")
    if value is None:
        return f"product-{index + 1}"
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidJob(
            f"products[{index}]: the product id must be a string or an integer, "
            f"got {type(value).__name__}"
        )
    text = str(value)
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_PRODUCT_ID_BYTES:
        raise InvalidJob(
            f"products[{index}]: the product id is {size} bytes, over the limit of "
            f"{MAX_PRODUCT_ID_BYTES} (job_items_product_id_length)"
        )
    _check_text(text, f"products[{index}]: the product id")
    return text


def _payload(product: dict[str, Any], index: int) -> str:
    try:
        text = _ENCODER.encode(product)
    except (TypeError, ValueError, RecursionError) as error:
        raise InvalidJob(f"products[{index}] cannot be written as JSON: {error}") from None
    # The substring test is fast; the exact (slower) test only runs when it matches.
    if "\\u0000" in text and _JSON_NUL.search(text):
        raise InvalidJob(f"products[{index}] holds a NUL character (\\u0000), which jsonb refuses")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidJob(
            f"products[{index}] holds a lone surrogate, which is not valid UTF-8"
        ) from None
    return text


def check_kind(kind: object) -> str:
    if not isinstance(kind, str) or not KIND_NAME.match(kind):
        raise InvalidJob(
            f"invalid kind {kind!r}: lower-case letters, digits, '_', '.' or '-', starting with "
            "a letter, at most 63 characters"
        )
    return kind


def check_tier(tier: object) -> str | None:
    if tier is None:
        return None
    if not isinstance(tier, str) or tier not in TIERS:
        raise InvalidJob(f"invalid tier {tier!r}: one of {', '.join(TIERS)} (or none: the kind's)")
    return tier


def check_options(options: object) -> tuple[str, tuple[str, ...]]:
    """The options as JSON text, and their names."""
    if options is None:
        return "{}", ()
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise InvalidJob(
            f"options must be a JSON object (a dict with string keys), got {_kind(options)}"
        )
    try:
        text = _ENCODER.encode(options)
    except (TypeError, ValueError) as error:
        raise InvalidJob(f"options cannot be stored as JSON: {error}") from None
    if _JSON_NUL.search(text):
        raise InvalidJob("options hold a \\u0000 character, which PostgreSQL's jsonb refuses")
    return text, tuple(sorted(options))


def prepare(
    store: object,
    products: object,
    priority: object = 0,
    kind: object = DEFAULT_KIND,
    options: object = None,
    tier: object = None,
) -> PreparedJob:
    """Check a job as the tables would, without writing anything."""
    checked_tier = check_tier(tier)
    checked_store = check_store(store)
    checked_priority = check_priority(priority)
    checked_kind = check_kind(kind)
    options_text, option_names = check_options(options)
    if isinstance(products, str | bytes | dict) or not isinstance(products, Sequence):
        raise InvalidJob(f"products must be a list of JSON objects, got {type(products).__name__}")
    if not products:
        raise InvalidJob("products is empty: a job needs at least one product")
    items = []
    for index, product in enumerate(products):
        if not isinstance(product, dict):
            raise InvalidJob(
                f"products[{index}] is {_kind(product)}, not a JSON object with the product's data"
            )
        items.append((_product_id(product, index), _payload(product, index)))
    return PreparedJob(
        checked_store,
        checked_priority,
        items,
        checked_kind,
        options_text,
        option_names,
        checked_tier,
    )


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return f"a {type(value).__name__}"


def _job_params(job: PreparedJob) -> dict[str, Any]:
    return {
        "instance_id": job.store,
        "priority": job.priority,
        "kind": job.kind,
        "options": job.options,
        "tier": job.tier,
    }


def item_tier(job: PreparedJob, row: tuple[Any, ...]) -> str:
    """The tier of the job's items, from what create_job read of its kind's registration;
    'batch' for a kind whose handler cannot batch is refused (the transaction rolls back)."""
    _id, kind_tier, batchable, auto_min_items, auto_max_priority = row
    registered = kind_tier is not None
    rule = (
        AutoRule(int(auto_min_items), int(auto_max_priority))
        if auto_min_items is not None and auto_max_priority is not None
        else None
    )
    tier = resolve(
        job.tier,
        kind_default=str(kind_tier) if registered else REALTIME,
        batchable=bool(batchable),
        rule=rule,
        count=len(job.items),
        priority=job.priority,
    )
    # A kind no worker has registered yet (today's, before the first start) is taken at its word.
    if tier == BATCH and registered and not batchable:
        raise InvalidJob(
            f"kind {job.kind} cannot run on the batch tier: its handler cannot batch "
            "(use realtime or flex)"
        )
    return tier


def check_registered(job: PreparedJob, registered: RegisteredKind | None, known: list[str]) -> None:
    """A kind some worker has registered, with options it declares. Today's kind is known
    even before any worker has started."""
    if registered is None:
        if job.kind == DEFAULT_KIND:
            return
        names = ", ".join(known) or "none yet: start a worker that serves it first"
        raise InvalidJob(f"no kind named {job.kind} (registered kinds: {names})")
    if registered.options is None:
        return
    undeclared = [name for name in job.option_names if name not in registered.options]
    if undeclared:
        declared = ", ".join(sorted(registered.options)) or "none"
        raise InvalidJob(
            f"option {undeclared[0]!r} is not one kind {job.kind} declares (it takes: {declared})"
        )


def _database_error(error: psycopg.Error) -> DatabaseError:
    from listener.db import wrap  # the worker's module: loaded only when something failed

    return wrap(error, "enqueue failed")


def enqueue(
    target: str | psycopg.Connection[Any],
    store: str,
    products: Sequence[dict[str, Any]],
    *,
    priority: int = 0,
    kind: str = DEFAULT_KIND,
    options: dict[str, Any] | None = None,
    tier: str | None = None,
) -> int:
    """Create a job with one item per product; return the job id.

    `target` is a connection string, or an open connection whose transaction the job joins.
    `kind` names the work its items need (a kind some worker registered: refused otherwise),
    `options` the job's options for it (over its store's defaults; each one its kind declares).
    `tier`: realtime, batch, flex or auto (listener.tiers); None: the kind's default. `auto`
    is resolved here, where the job's size is known (AUTO_BATCH_MIN_ITEMS, as the fleet's
    workers registered it).
    """
    job = prepare(store, products, priority, kind, options, tier)
    sql = queries("jobs")
    try:
        if isinstance(target, str):
            with psycopg.connect(target) as conn:
                return _write(conn, job, sql)
        return _write(target, job, sql)
    except psycopg.Error as error:
        raise _database_error(error) from error


def _write(conn: psycopg.Connection[Any], job: PreparedJob, sql: dict[str, str]) -> int:
    with conn.transaction():
        if job.kind != DEFAULT_KIND or job.option_names:
            registered = lookup_kind(conn, job.kind)
            check_registered(job, registered, [] if registered else known_names(conn))
        row = conn.execute(sql["create_job"], _job_params(job)).fetchone()
        assert row is not None
        job_id, tier = int(row[0]), item_tier(job, row)
        with conn.cursor().copy(sql["copy_items"]) as copy:
            for product_id, payload in job.items:
                copy.write_row(
                    (job_id, job.store, product_id, payload, job.priority, job.kind, tier)
                )
    return job_id


async def enqueue_async(
    target: str | psycopg.AsyncConnection[Any],
    store: str,
    products: Sequence[dict[str, Any]],
    *,
    priority: int = 0,
    kind: str = DEFAULT_KIND,
    options: dict[str, Any] | None = None,
    tier: str | None = None,
) -> int:
    """`enqueue` for asyncio and trio apps (psycopg's async connection)."""
    job = prepare(store, products, priority, kind, options, tier)
    sql = queries("jobs")
    try:
        if isinstance(target, str):
            async with await psycopg.AsyncConnection.connect(target) as conn:
                return await _write_async(conn, job, sql)
        return await _write_async(target, job, sql)
    except psycopg.Error as error:
        raise _database_error(error) from error


async def _write_async(
    conn: psycopg.AsyncConnection[Any], job: PreparedJob, sql: dict[str, str]
) -> int:
    async with conn.transaction():
        if job.kind != DEFAULT_KIND or job.option_names:
            registered = await lookup_kind_async(conn, job.kind)
            known = [] if registered else await known_names_async(conn)
            check_registered(job, registered, known)
        cursor = await conn.execute(sql["create_job"], _job_params(job))
        row = await cursor.fetchone()
        assert row is not None
        job_id, tier = int(row[0]), item_tier(job, row)
        async with conn.cursor().copy(sql["copy_items"]) as copy:
            for product_id, payload in job.items:
                await copy.write_row(
                    (job_id, job.store, product_id, payload, job.priority, job.kind, tier)
                )
    return job_id
