"""The claim's SQL against a real backlog: the plans that keep its cost off the backlog's size,
and its fairness rules (per-store quota, oldest first, no double claim)."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from listener.items import split_quota
from listener.sqlfiles import queries


def _load(conn: psycopg.Connection[Any], stores: int, per_store: int) -> None:
    conn.execute(
        "INSERT INTO jobs (instance_id) SELECT 'store-' || n FROM generate_series(1, %s) n",
        (stores,),
    )
    conn.execute(
        "INSERT INTO job_items (job_id, instance_id, product_id, payload)"
        " SELECT j.id, j.instance_id, 'p' || n, '{}'::jsonb"
        " FROM jobs j CROSS JOIN generate_series(1, %s) n",
        (per_store,),
    )
    conn.execute("ANALYZE job_items")


def _plan(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any]) -> str:
    row = conn.execute(b"EXPLAIN (FORMAT JSON) " + sql.encode(), params).fetchone()
    assert row is not None
    return json.dumps(row[0])


@pytest.mark.parametrize(("stores", "quota"), [(100, 1), (10, 10), (5, 20)])
def test_the_claim_reads_index_heads_only_at_100k_rows(
    database_url: str, stores: int, quota: int
) -> None:
    with psycopg.connect(database_url) as conn:
        _load(conn, stores=1000, per_store=100)
        plan = _plan(
            conn,
            queries("items")["claim"],
            {
                "stores": [f"store-{n}" for n in range(1, stores + 1)],
                "limits": [quota] * stores,
                "worker_id": "w",
                "lease_seconds": 60,
                "max_payload_bytes": 65_536,
            },
        )
    assert "Seq Scan" not in plan and "Bitmap" not in plan and '"Sort"' not in plan
    assert '"Index Name": "idx_job_items_pending"' in plan
    assert '"Index Name": "job_items_pkey"' in plan


def test_finding_the_stores_with_work_is_a_loose_index_scan(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        _load(conn, stores=1000, per_store=100)
        plan = _plan(conn, queries("items")["ready_stores"], {})
        stores = conn.execute(queries("items")["ready_stores"]).fetchall()
    assert "Seq Scan" not in plan
    assert '"Index Name": "idx_job_items_pending"' in plan
    assert len(stores) == 1000


def test_a_claim_takes_each_store_s_oldest_items_up_to_its_quota(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        _load(conn, stores=3, per_store=5)
        claim = queries("items")["claim"]
        params = {
            "stores": ["store-1", "store-2", "store-3"],
            "limits": [2, 2, 10],
            "worker_id": "w1",
            "lease_seconds": 60,
            "max_payload_bytes": 65_536,
        }
        first = conn.execute(claim, params).fetchall()
        second = conn.execute(claim, {**params, "worker_id": "w2"}).fetchall()
        rows = conn.execute(
            "SELECT instance_id, product_id, status, claimed_by, attempts,"
            " lease_expires_at > now() FROM job_items WHERE status = 'PROCESSING'"
            " ORDER BY instance_id, id"
        ).fetchall()
    per_store = {s: [r[1] for r in rows if r[0] == s and r[3] == "w1"] for s in params["stores"]}
    assert per_store == {
        "store-1": ["p1", "p2"],
        "store-2": ["p1", "p2"],
        "store-3": ["p1", "p2", "p3", "p4", "p5"],
    }
    assert len(first) == 9 and len(second) == 4  # what was left: nobody's item twice
    assert all(r[4] == 1 and r[5] for r in rows)


def test_split_quota_shares_the_wanted_items_evenly_within_the_cap() -> None:
    assert split_quota(["a", "b", "c"], 7, 20) == [3, 2, 2]
    assert split_quota(["a", "b"], 100, 20) == [20, 20]
    assert split_quota(["a"], 1, 20) == [1]
    assert split_quota([], 5, 20) == []
