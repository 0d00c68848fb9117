"""The claim's SQL against a real backlog: the plans that keep its cost off the backlog's size,
and its fairness rules (per-store quota, oldest first, no double claim)."""

from __future__ import annotations

import json
import threading
from typing import Any

import psycopg
import pytest

from listener.items import split_quota
from listener.promoter import PROMOTE_LOCK_KEY
from listener.sqlfiles import queries
from tests.support import heard_so_far, insert_backlog

KINDS = {"kinds": ["product_description"]}


def _load(conn: psycopg.Connection[Any], stores: int, per_store: int) -> None:
    insert_backlog(conn, stores, per_store)
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
                "announce": False,
                "kinds": ["product_description"],
                "lane": "openai",
            },
        )
    assert "Seq Scan" not in plan and "Bitmap" not in plan and '"Sort"' not in plan
    assert '"Index Name": "idx_job_items_pending"' in plan
    assert '"Index Name": "job_items_pkey"' in plan


def test_finding_the_stores_with_work_is_a_loose_index_scan(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        _load(conn, stores=1000, per_store=100)
        plan = _plan(conn, queries("items")["ready_stores"], KINDS)
        stores = conn.execute(queries("items")["ready_stores"], KINDS).fetchall()
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
            "announce": False,
            "kinds": ["product_description"],
            "lane": "openai",
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


def _claim_params(stores: list[str], limits: list[int], worker: str = "w") -> dict[str, Any]:
    return {
        "stores": stores,
        "limits": limits,
        "worker_id": worker,
        "lease_seconds": 60,
        "max_payload_bytes": 65_536,
        "announce": False,
        "kinds": ["product_description"],
        "lane": "openai",
    }


def _claim_buffers(conn: psycopg.Connection[Any], params: dict[str, Any]) -> tuple[int, int]:
    """(items claimed, shared buffers the claim touched), rolled back."""
    with conn.transaction(force_rollback=True):
        row = conn.execute(
            b"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queries("items")["claim"].encode(),
            params,
        ).fetchone()
    assert row is not None
    plan = row[0][0]["Plan"]
    return int(plan["Actual Rows"]), int(plan["Shared Hit Blocks"] + plan["Shared Read Blocks"])


def test_items_in_backoff_at_the_head_of_a_store_are_not_read_by_the_claim(
    database_url: str,
) -> None:
    # Issue 11, defect 5: the oldest 5,000 items of a store wait out a retry's backoff. The
    # claim's index used to end in id, so each claim read past all 5,000 (and their heap rows)
    # to reach the first due item; now due items come first in the store's range.
    with psycopg.connect(database_url, autocommit=True) as conn:
        _load(conn, stores=2, per_store=10_000)
        conn.execute(
            "UPDATE job_items SET run_after = now() + interval '1 hour'"
            " WHERE instance_id = 'store-1' AND id IN ("
            "   SELECT id FROM job_items WHERE instance_id = 'store-1' ORDER BY id LIMIT 5000)"
        )
        conn.execute("VACUUM ANALYZE job_items")
        half_in_backoff = _claim_buffers(conn, _claim_params(["store-1"], [1]))
        none_in_backoff = _claim_buffers(conn, _claim_params(["store-2"], [1]))
    assert half_in_backoff[0] == none_in_backoff[0] == 1
    # The same few pages either way (the old index read about 5,000 more).
    assert half_in_backoff[1] <= none_in_backoff[1] + 5, (half_in_backoff, none_in_backoff)


def test_a_store_s_higher_priority_item_is_its_next_whatever_its_backlog(
    database_url: str,
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        _load(conn, stores=3, per_store=2_000)
        job = conn.execute(
            "INSERT INTO jobs (instance_id, priority) VALUES ('store-2', 10) RETURNING id"
        ).fetchone()
        assert job is not None
        # The producer leaves the item's priority out: it takes its job's.
        conn.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id)"
            " VALUES (%s, 'store-2', 'click')",
            job,
        )
        conn.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id, priority)"
            " VALUES (%s, 'store-2', 'later', -5)",
            job,
        )
        conn.execute("ANALYZE job_items")
        params = _claim_params(["store-1", "store-2", "store-3"], [1, 1, 1])
        plan = _plan(conn, queries("items")["claim"], params)
        rows = conn.execute(queries("items")["claim"], params).fetchall()
        line = conn.execute(
            "SELECT product_id FROM job_items WHERE instance_id = 'store-2' AND status = 'PENDING'"
            " ORDER BY priority DESC, run_after, id"
        ).fetchall()
    claimed = {row[2]: row[3] for row in rows}
    # Priority orders the store's OWN line: store-2's click goes first, the others' heads
    # (and their share of the claim) are unchanged.
    assert claimed == {"store-1": "p1", "store-2": "click", "store-3": "p1"}
    assert len(line) == 2001 and line[-1] == ("later",)  # -5: behind every item at 0
    assert '"Index Name": "idx_job_items_pending"' in plan and '"Sort"' not in plan


def test_the_rebuild_finds_stores_with_work_and_when_their_first_item_is_due(
    database_url: str,
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        _load(conn, stores=4, per_store=10)
        # store-2: every item waits out a retry's backoff (flagged, as the outcome leaves them).
        conn.execute(
            "UPDATE job_items SET run_after = now() + interval '30 seconds', in_backoff = true"
            " WHERE instance_id = 'store-2'"
        )
        # store-3 and store-4: dated later by an operator's UPDATE, not flagged.
        conn.execute(
            "UPDATE job_items SET priority = 5, run_after = now() + interval '60 seconds'"
            " WHERE instance_id = 'store-3' AND product_id = 'p1'"
        )
        conn.execute(
            "UPDATE job_items SET run_after = now() + interval '45 seconds'"
            " WHERE instance_id = 'store-4'"
        )
        rows = dict(conn.execute(queries("items")["ready_stores"], KINDS).fetchall())
        promotion = conn.execute(
            queries("backoff")["promote_due"], {"key": PROMOTE_LOCK_KEY, "batch": 100}
        ).fetchone()
    assert rows.keys() == {"store-1", "store-3", "store-4"}
    assert rows["store-1"] == 0 and rows["store-3"] == 0  # store-3's other items are due
    assert 40 < rows["store-4"] <= 45  # the rebuild wakes it then
    # store-2's items are out of the scan: the promote step knows when the first is due (and
    # announces the store then); nothing is due yet.
    assert promotion is not None and promotion[:2] == (True, 0)
    assert 25 < promotion[2] <= 30


def test_only_due_items_announce_their_store(database_url: str) -> None:
    with (
        psycopg.connect(database_url, autocommit=True) as listener,
        psycopg.connect(database_url, autocommit=True) as conn,
    ):
        _load(conn, stores=2, per_store=3)
        conn.execute("UPDATE job_items SET status = 'PROCESSING'")
        # Claimed, the stores are drained: a claimer retires them, so they are announced again.
        retired = conn.execute(
            queries("items")["retire_drained"],
            {"stores": ["store-1", "store-2"], "kinds": KINDS["kinds"]},
        ).fetchall()
        assert sorted(retired) == [("store-1", "retired"), ("store-2", "retired")]
        listener.execute("LISTEN job_items_ready")
        # A retry waiting out its backoff: nobody is told (the promote step does, when due).
        conn.execute(
            "UPDATE job_items SET status = 'PENDING', run_after = now() + interval '5 seconds'"
            " WHERE instance_id = 'store-1'"
        )
        # A release (or a reaped lease): due now, every process hears of it.
        conn.execute("UPDATE job_items SET status = 'PENDING' WHERE instance_id = 'store-2'")
        heard = heard_so_far(listener, conn, "job_items_ready")
    assert heard == ["store-2"]


def _held_back(rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    return {row[2]: row[7] for row in rows if row[0] is None}


def test_a_paused_store_gets_nothing_and_is_named_as_held_back(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        _load(conn, stores=2, per_store=5)
        conn.execute("INSERT INTO stores (instance_id, paused) VALUES ('store-1', true)")
        rows = conn.execute(
            queries("items")["claim"], _claim_params(["store-1", "store-2"], [3, 3])
        ).fetchall()
    items = [row for row in rows if row[0] is not None]
    assert {row[2] for row in items} == {"store-2"} and len(items) == 3
    assert _held_back(rows) == {"store-1": None}


def test_max_in_flight_holds_across_concurrent_claims(database_url: str) -> None:
    # Two claims of one store at once, from two sessions: the second waits for the first's
    # commit on the store's row, then counts its items. Together: never more than the cap.
    claim = queries("items")["claim"]
    with (
        psycopg.connect(database_url, autocommit=True) as setup,
        psycopg.connect(database_url) as first,
        psycopg.connect(database_url) as second,
    ):
        _load(setup, stores=1, per_store=20)
        setup.execute("INSERT INTO stores (instance_id, max_in_flight) VALUES ('store-1', 3)")
        got_first = first.execute(claim, _claim_params(["store-1"], [2], "w1")).fetchall()
        results: list[list[tuple[Any, ...]]] = []
        waiting = threading.Thread(
            target=lambda: results.append(
                second.execute(claim, _claim_params(["store-1"], [5], "w2")).fetchall()
            )
        )
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive()  # blocked on store-1's row while the first claim is open
        first.commit()
        waiting.join(10)
        second.commit()
        processing = setup.execute(
            "SELECT count(*) FROM job_items WHERE status = 'PROCESSING'"
        ).fetchone()
    assert len([r for r in got_first if r[0] is not None]) == 2
    assert len([r for r in results[0] if r[0] is not None]) == 1
    assert _held_back(results[0]) == {"store-1": None}
    assert processing == (3,)


def test_rpm_limit_spaces_a_store_s_items_and_says_when_the_next_is_allowed(
    database_url: str,
) -> None:
    claim = queries("items")["claim"]
    with psycopg.connect(database_url, autocommit=True) as conn:
        _load(conn, stores=1, per_store=20)
        conn.execute("INSERT INTO stores (instance_id, rpm_limit) VALUES ('store-1', 60)")
        first = conn.execute(claim, _claim_params(["store-1"], [5])).fetchall()
        second = conn.execute(claim, _claim_params(["store-1"], [5])).fetchall()
    # At 60 a minute: one item now, the next (60 s + 0.5 s tolerance) / 60 later.
    assert len([r for r in first if r[0] is not None]) == 1
    assert [r for r in second if r[0] is not None] == []
    retry_in = _held_back(second)["store-1"]
    assert 0.9 < retry_in <= 60.5 / 60


def test_a_claim_under_a_budget_tells_the_fleet_which_stores_it_served(
    database_url: str,
) -> None:
    with (
        psycopg.connect(database_url, autocommit=True) as listener,
        psycopg.connect(database_url, autocommit=True) as conn,
    ):
        _load(conn, stores=2, per_store=3)
        listener.execute("LISTEN stores_served")
        params = _claim_params(["store-1", "store-2"], [2, 1], "w1")
        conn.execute(queries("items")["claim"], params).fetchall()  # without: silent
        conn.execute(queries("items")["claim"], {**params, "announce": True}).fetchall()
        heard = sorted(heard_so_far(listener, conn, "stores_served"))
    assert heard == ["w1\x1fstore-1\x1f1\x1fopenai", "w1\x1fstore-2\x1f1\x1fopenai"]


def _with_higher_priority_backoff(
    conn: psycopg.Connection[Any], store: str, in_backoff: int, due: int
) -> None:
    """`store`: `in_backoff` items at priority 10 waiting out a retry's backoff (an hour), then
    `due` items at priority 0, due now."""
    job = conn.execute(
        "INSERT INTO jobs (instance_id) VALUES (%s) RETURNING id", (store,)
    ).fetchone()
    assert job is not None
    conn.execute(
        "INSERT INTO job_items (job_id, instance_id, product_id, priority, payload)"
        " SELECT %s, %s, CASE WHEN n <= %s THEN 'backoff-' ELSE 'due-' END || n,"
        "   CASE WHEN n <= %s THEN 10 ELSE 0 END, '{}'::jsonb"
        " FROM generate_series(1, %s) n",
        (job[0], store, in_backoff, in_backoff, in_backoff + due),
    )
    # As a retry outcome leaves them: PENDING, due in an hour, in backoff.
    conn.execute(
        "UPDATE job_items SET run_after = now() + interval '1 hour', in_backoff = true"
        " WHERE instance_id = %s AND product_id LIKE 'backoff-%%'",
        (store,),
    )


def test_higher_priority_items_in_backoff_are_not_read_by_the_claim(database_url: str) -> None:
    # Issue 25, weakness 5: the pending index orders priority before run_after, so a store's
    # higher-priority items in backoff sat before its due ones, and each claim read past all
    # of them (9.9 ms and 496 buffers at 100,000). Now they are out of the claim's range.
    with psycopg.connect(database_url, autocommit=True) as conn:
        _with_higher_priority_backoff(conn, "store-few", in_backoff=2_000, due=50)
        _with_higher_priority_backoff(conn, "store-many", in_backoff=20_000, due=50)
        conn.execute("VACUUM ANALYZE job_items")
        few = _claim_buffers(conn, _claim_params(["store-few"], [5]))
        many = _claim_buffers(conn, _claim_params(["store-many"], [5]))
        params = _claim_params(["store-many"], [5])
        with conn.transaction(force_rollback=True):
            taken = conn.execute(queries("items")["claim"], params).fetchall()
        plan = _plan(conn, queries("items")["claim"], params)
    # The due ones, in their order, nothing before its run_after.
    assert [row[3] for row in taken] == [f"due-{n}" for n in range(20_001, 20_006)]
    assert few[0] == many[0] == 5
    # Ten times as many in backoff, the same few pages (reading past them cost hundreds more).
    assert many[1] <= few[1] + 3, (few, many)
    assert '"Index Name": "idx_job_items_pending"' in plan and '"Sort"' not in plan
