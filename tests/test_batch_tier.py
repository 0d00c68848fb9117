"""Tiers per job (issue 27, part 1): the resolved tier on each item, the `auto` rule, and the
real-time path never taking nor reading batch-tier items."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from listener import InvalidJob, enqueue
from listener.db import open_pool
from listener.errors import ConfigurationError
from listener.handler import App, Item, Kind
from listener.openai.spec import KindsFileError, parse
from listener.registry import register_kinds
from listener.settings import load_settings
from listener.sqlfiles import queries
from listener.tiers import AutoRule, resolve
from tests.support import insert_backlog, query_blocking

pytestmark = pytest.mark.anyio


async def _echo(item: Item) -> Any:
    return {"echo": item.id}


def _app(*, batch: bool, tier: str = "realtime") -> App:
    return App([Kind("product_description", _echo, budget=None, batch=batch, tier=tier)])


RULE = AutoRule(100, -10)


async def _register(database_url: str, app: App, rule: AutoRule = RULE) -> None:
    settings = load_settings(database_url=database_url)
    pool = await open_pool(database_url, settings, name="test-register")
    try:
        await register_kinds(pool, app, rule)
    finally:
        await pool.close()


def _tiers(database_url: str, job_id: int) -> list[str]:
    rows = query_blocking(
        database_url, "SELECT DISTINCT tier FROM job_items WHERE job_id = %s", (job_id,)
    )
    return sorted(str(row[0]) for row in rows)


def _plain_job(database_url: str, tier: str | None, priority: int = 0, count: int = 3) -> int:
    """What any client does: two INSERTs, every other column defaulted."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO jobs (instance_id, tier, priority) VALUES ('plain', %s, %s) RETURNING id",
            (tier, priority),
        ).fetchone()
        assert row is not None
        conn.execute(
            "INSERT INTO job_items (job_id, product_id, payload)"
            " SELECT %s, 'p' || n, '{\"name\": \"x\"}' FROM generate_series(1, %s) n",
            (row[0], count),
        )
    return int(row[0])


def _products(count: int) -> list[dict[str, Any]]:
    return [{"id": f"sku-{n}", "name": f"Product {n}"} for n in range(count)]


def test_a_plain_insert_keeps_today_s_tier(database_url: str) -> None:
    job = _plain_job(database_url, None)
    assert _tiers(database_url, job) == ["realtime"]
    assert query_blocking(database_url, "SELECT tier FROM jobs WHERE id = %s", (job,)) == [(None,)]


async def test_the_kind_s_default_tier_and_auto_by_priority_for_a_plain_insert(
    database_url: str,
) -> None:
    await _register(database_url, _app(batch=True, tier="batch"))
    assert _tiers(database_url, _plain_job(database_url, None)) == ["batch"]
    assert _tiers(database_url, _plain_job(database_url, "flex")) == ["flex"]
    # A plain INSERT cannot know the job's size: only the priority half of `auto` applies.
    assert _tiers(database_url, _plain_job(database_url, "auto", count=500)) == ["realtime"]
    assert _tiers(database_url, _plain_job(database_url, "auto", priority=-10)) == ["batch"]


async def test_a_plain_insert_of_batch_for_a_kind_that_cannot_batch_is_refused(
    database_url: str,
) -> None:
    await _register(database_url, _app(batch=False))
    with pytest.raises(psycopg.errors.CheckViolation, match="cannot run on the batch tier"):
        _plain_job(database_url, "batch")


async def test_enqueue_resolves_auto_by_size_and_priority(database_url: str) -> None:
    await _register(database_url, _app(batch=True), AutoRule(min_items=50, max_priority=-10))
    assert _tiers(database_url, enqueue(database_url, "s", _products(50), tier="auto")) == ["batch"]
    assert _tiers(database_url, enqueue(database_url, "s", _products(49), tier="auto")) == [
        "realtime"
    ]
    small_low = enqueue(database_url, "s", _products(2), tier="auto", priority=-10)
    assert _tiers(database_url, small_low) == ["batch"]
    assert _tiers(database_url, enqueue(database_url, "s", _products(2))) == ["realtime"]
    assert _tiers(database_url, enqueue(database_url, "s", _products(2), tier="batch")) == ["batch"]
    job = enqueue(database_url, "s", _products(2), tier="auto")
    assert query_blocking(database_url, "SELECT tier FROM jobs WHERE id = %s", (job,)) == [
        ("auto",)
    ]


async def test_enqueue_refuses_batch_for_a_kind_that_cannot_batch_and_writes_nothing(
    database_url: str,
) -> None:
    await _register(database_url, _app(batch=False))
    with pytest.raises(InvalidJob, match="cannot run on the batch tier"):
        enqueue(database_url, "s", _products(3), tier="batch")
    # `auto` on such a kind is simply real-time.
    big = enqueue(database_url, "s", _products(200), tier="auto")
    assert _tiers(database_url, big) == ["realtime"]
    assert query_blocking(database_url, "SELECT count(*) FROM jobs") == [(1,)]


def test_enqueue_refuses_an_unknown_tier(database_url: str) -> None:
    with pytest.raises(InvalidJob, match="invalid tier 'cheap'"):
        enqueue(database_url, "s", _products(1), tier="cheap")
    assert query_blocking(database_url, "SELECT count(*) FROM jobs") == [(0,)]


def test_auto_without_a_registered_rule_stays_real_time() -> None:
    assert resolve("auto", kind_default="realtime", batchable=True, rule=None, count=10**6,
                   priority=-100) == "realtime"  # fmt: skip
    rule = AutoRule(10, -5)
    assert rule.wants_batch(None, -5) and not rule.wants_batch(None, -4)
    assert rule.wants_batch(10, 0) and not rule.wants_batch(9, 0)


def test_a_kind_s_tier_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="tier 'cheap'"):
        Kind("k", _echo, tier="cheap")
    with pytest.raises(ConfigurationError, match="needs a handler that can batch"):
        Kind("k", _echo, tier="batch")
    with pytest.raises(KindsFileError, match="field tier"):
        parse('[k]\nsystem = "s"\ntier = "slow"\n', "kinds.toml")
    assert parse('[k]\nsystem = "s"\ntier = "auto"\n', "kinds.toml")["k"].tier == "auto"


def _claim_params(stores: list[str], limits: list[int]) -> dict[str, Any]:
    return {
        "stores": stores,
        "limits": limits,
        "worker_id": "w",
        "lease_seconds": 60,
        "max_payload_bytes": 65_536,
        "announce": False,
        "kinds": ["product_description"],
        "lane": "openai",
    }


def test_the_claim_never_takes_batch_items_nor_announces_them(database_url: str) -> None:
    batch = enqueue(database_url, "store-b", _products(5), tier="batch", priority=50)
    realtime = enqueue(database_url, "store-b", _products(2))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("LISTEN job_items_ready")
        enqueue(database_url, "store-quiet", _products(3), tier="batch")
        heard = [n.payload for n in conn.notifies(timeout=0.5, stop_after=1)]
        rows = conn.execute(queries("items")["claim"], _claim_params(["store-b"], [10])).fetchall()
        ready = conn.execute(
            queries("items")["ready_stores"], {"kinds": ["product_description"]}
        ).fetchall()
    assert heard == []  # a batch-tier job wakes no real-time claimer
    assert {row[1] for row in rows} == {realtime}  # not one of the (higher priority) batch items
    assert [row[0] for row in ready] == []  # store-b's real-time items are claimed now
    pending = query_blocking(
        database_url, "SELECT count(*) FROM job_items WHERE job_id = %s AND status = 'PENDING'",
        (batch,),
    )  # fmt: skip
    assert pending == [(5,)]


def _claim_buffers(conn: psycopg.Connection[Any], params: dict[str, Any]) -> tuple[int, int]:
    with conn.transaction(force_rollback=True):
        row = conn.execute(
            b"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queries("items")["claim"].encode(),
            params,
        ).fetchone()
    assert row is not None
    plan = row[0][0]["Plan"]
    return int(plan["Actual Rows"]), int(plan["Shared Hit Blocks"] + plan["Shared Read Blocks"])


def test_the_claim_does_not_read_past_a_store_s_batch_items(database_url: str) -> None:
    """A store's 5,000 batch-tier items at the head of its line (higher priority) cost the
    real-time claim nothing: they are not in idx_job_items_pending. Failed before (the claim
    took them)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        insert_backlog(conn, 2, 10_000)
        conn.execute(
            "UPDATE job_items SET tier = 'batch', priority = 10 WHERE instance_id = 'store-1'"
            " AND id IN (SELECT id FROM job_items WHERE instance_id = 'store-1'"
            " ORDER BY id LIMIT 5000)"
        )
        conn.execute("VACUUM ANALYZE job_items")
        with_batch = _claim_buffers(conn, _claim_params(["store-1"], [1]))
        without = _claim_buffers(conn, _claim_params(["store-2"], [1]))
        plan = conn.execute(
            b"EXPLAIN (FORMAT JSON) " + queries("items")["claim"].encode(),
            _claim_params([f"store-{n}" for n in range(1, 3)], [5, 5]),
        ).fetchone()
    assert with_batch[0] == without[0] == 1
    assert with_batch[1] <= without[1] + 5, (with_batch, without)
    assert plan is not None and '"Index Name": "idx_job_items_pending"' in json.dumps(plan[0])


def test_items_in_a_batch_take_no_room_under_a_store_s_max_in_flight(database_url: str) -> None:
    """A store capped at 1 item in flight, with 3 in an OpenAI batch, still gets its real-time
    item: batch items hold no real-time slot (listener_claim_allowance). Failed before (0)."""
    enqueue(database_url, "capped", _products(3), tier="batch")
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO openai_batches (kind, model) VALUES ('product_description', 'm')"
            " RETURNING id"
        ).fetchone()
        assert row is not None
        conn.execute(
            "UPDATE job_items SET status = 'PROCESSING', openai_batch_id = %s,"
            " claimed_by = 'batch:' || %s",
            (row[0], row[0]),
        )
        conn.execute("INSERT INTO stores (instance_id, max_in_flight) VALUES ('capped', 1)")
        realtime = enqueue(conn, "capped", _products(1))
        rows = conn.execute(queries("items")["claim"], _claim_params(["capped"], [1])).fetchall()
    assert [r[1] for r in rows if r[0] is not None] == [realtime]
