"""The producer API (`from listener import enqueue`) and `listener enqueue --file`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

import listener
from listener import InvalidJob, enqueue, enqueue_async
from tests.support import (
    ROOT,
    query,
    query_blocking,
    run_listener,
)

pytestmark = pytest.mark.anyio


def counts(conninfo: str) -> tuple[int, int]:
    ((jobs, items),) = query_blocking(
        conninfo, "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM job_items)"
    )
    return jobs, items


def test_a_10000_product_job_in_one_call_and_one_notification(database_url: str) -> None:
    products = [
        {"id": f"sku-{n}", "name": f"Product {n}", "tab\there": "a\\b\n"} for n in range(10_000)
    ]
    with psycopg.connect(database_url, autocommit=True) as listen:
        listen.execute("LISTEN job_items_ready")
        job_id = enqueue(database_url, "store-big", products, priority=5)
        notes = list(listen.notifies(timeout=1.0, stop_after=2))
    assert [n.payload for n in notes] == ["store-big"]  # one for the whole job
    assert counts(database_url) == (1, 10_000)
    rows = query_blocking(
        database_url,
        "SELECT product_id, payload, instance_id, status FROM job_items WHERE job_id = %s"
        " ORDER BY id LIMIT 2",
        (job_id,),
    )
    assert rows == [
        ("sku-0", products[0], "store-big", "PENDING"),
        ("sku-1", products[1], "store-big", "PENDING"),
    ]


def test_product_ids_come_from_id_or_product_id_or_the_position(database_url: str) -> None:
    job_id = enqueue(
        database_url, "s", [{"id": 7, "name": "a"}, {"product_id": "x", "name": "b"}, {"name": "c"}]
    )
    ids = query_blocking(
        database_url, "SELECT product_id FROM job_items WHERE job_id = %s ORDER BY id", (job_id,)
    )
    assert ids == [("7",), ("x",), ("product-3",)]


def test_the_job_joins_the_callers_transaction(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT 1")  # the app's own work opened a transaction
        enqueue(conn, "store-tx", [{"name": "a"}])
        assert counts(database_url) == (0, 0)  # not committed yet
        conn.rollback()
    assert counts(database_url) == (0, 0)
    with (
        psycopg.connect(database_url) as conn,
        pytest.raises(ZeroDivisionError),
        conn.transaction(),
    ):
        enqueue(conn, "store-tx", [{"name": "a"}])
        _ = 1 / 0  # the app fails after enqueueing: the job goes with its transaction
    assert counts(database_url) == (0, 0)
    with psycopg.connect(database_url) as conn:
        job_id = enqueue(conn, "store-tx", [{"name": "a"}])
    assert query_blocking(database_url, "SELECT id FROM jobs") == [(job_id,)]


async def test_enqueue_async(database_url: str) -> None:
    job_id = await enqueue_async(database_url, "store-async", [{"name": "a"}, {"name": "b"}])
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        second = await enqueue_async(conn, "store-async", [{"name": "c"}])
    assert second > job_id
    assert counts(database_url) == (2, 3)


# The producer writes each item's priority and kind itself, so the fill trigger's WHEN clause
# skips it (a lookup of the job per row otherwise): with the trigger off, the NOT NULL columns
# still get the job's values, where a COPY without them fails.
FILLED = """SELECT i.job_id, i.priority, i.kind FROM job_items i ORDER BY i.id"""
NO_FILL = "ALTER TABLE job_items DISABLE TRIGGER job_items_fill_priority"


def test_items_carry_their_jobs_priority_and_kind_without_the_fill_trigger(
    database_url: str,
) -> None:
    query_blocking(database_url, NO_FILL)
    job_id = enqueue(database_url, "store-filled", [{"name": "a"}, {"name": "b"}], priority=7)
    assert query_blocking(database_url, FILLED) == [
        (job_id, 7, "product_description"),
        (job_id, 7, "product_description"),
    ]


async def test_enqueue_async_gives_priority_and_kind_without_the_fill_trigger(
    database_url: str,
) -> None:
    await query(database_url, NO_FILL)
    job_id = await enqueue_async(database_url, "store-filled", [{"name": "c"}], priority=-3)
    assert await query(database_url, FILLED) == [(job_id, -3, "product_description")]


BAD_JOBS: list[tuple[str, Any, Any, dict[str, Any], str]] = [
    ("not-an-object", "s", [{"name": "a"}, {"name": "b"}, [1, 2]], {}, "products[2] is an array"),
    ("a-number", "s", [{"name": "a"}, 42], {}, "products[1] is a number"),
    ("null", "s", [None], {}, "products[0] is null"),
    ("empty", "s", [], {}, "products is empty"),
    ("not-a-list", "s", {"name": "a"}, {}, "products must be a list of JSON objects, got dict"),
    (
        "long-product-id",
        "s",
        [{"name": "a"}, {"id": "p" * 1025, "name": "b"}],
        {},
        "products[1]: the product id is 1025 bytes, over the limit of 1024",
    ),
    ("nested-product-id", "s", [{"id": {"a": 1}, "name": "a"}], {}, "products[0]: the product id"),
    ("nul", "s", [{"name": "a"}, {"name": "a\x00b"}], {}, "products[1] holds a NUL character"),
    ("surrogate", "s", [{"name": "\ud800"}], {}, "products[0] holds a lone surrogate"),
    ("nan", "s", [{"name": "a", "price": float("nan")}], {}, "products[0] cannot be written"),
    ("not-json", "s", [{"name": object()}], {}, "products[0] cannot be written as JSON"),
    ("blank-store", "  ", [{"name": "a"}], {}, "the store id is empty or blank"),
    ("long-store", "s" * 256, [{"name": "a"}], {}, "the store id is 256 bytes"),
    ("newline-store", "s\nx", [{"name": "a"}], {}, "the store id holds a control character"),
    ("priority", "s", [{"name": "a"}], {"priority": 101}, "priority 101 is outside -100..100"),
    ("priority-type", "s", [{"name": "a"}], {"priority": "high"}, "priority must be an integer"),
]


@pytest.mark.parametrize(
    ("store", "products", "options", "message"),
    [case[1:] for case in BAD_JOBS],
    ids=[case[0] for case in BAD_JOBS],
)
def test_bad_input_is_refused_before_anything_is_written(
    database_url: str, store: Any, products: Any, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidJob) as raised:
        enqueue(database_url, store, products, **options)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)
    assert counts(database_url) == (0, 0)


def test_a_literal_backslash_u0000_is_data_not_a_nul(database_url: str) -> None:
    enqueue(database_url, "s", [{"name": "C:\\u0000 is a path"}])
    assert query_blocking(database_url, "SELECT payload->>'name' FROM job_items") == [
        ("C:\\u0000 is a path",)
    ]


def test_the_command_names_the_first_bad_entry_in_one_line(
    database_url: str, tmp_path: Path
) -> None:
    products = tmp_path / "products.json"
    products.write_text(json.dumps([{"name": "ok"}, "oops", 3]), encoding="utf-8")
    result = run_listener(
        "enqueue", "--store", "s", "--file", str(products), DATABASE_URL=database_url
    )
    assert result.returncode == 1
    assert result.stderr == (
        "listener: products[1] is a string, not a JSON object with the product's data\n"
    )
    assert counts(database_url) == (0, 0)
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"id": "a", "name": "A"}]), encoding="utf-8")
    result = run_listener(
        "enqueue", "--store", "s", "--file", str(good), "--priority", "3", DATABASE_URL=database_url
    )
    assert result.returncode == 0, result.stderr
    assert counts(database_url) == (1, 1)


def test_importing_the_package_loads_no_worker_code() -> None:
    code = (
        "import sys, listener; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('openai', 'pydantic', 'anyio', 'psycopg_pool', 'starlette', 'listener')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == str(
        [
            "listener",
            "listener.errors",
            "listener.handler",
            "listener.producer",
            "listener.registry",
            "listener.sqlfiles",
            "listener.tiers",
        ]
    )
    assert listener.__all__ == [
        "App",
        "Budget",
        "BudgetExhausted",
        "DeferItem",
        "FailItem",
        "InvalidJob",
        "Item",
        "Kind",
        "Result",
        "RetryItem",
        "StopWorker",
        "__version__",
        "enqueue",
        "enqueue_async",
    ]
