"""Bad and hostile input: each bad item ends FAILED with its reason or is refused at insert by a
named constraint; hostile strings are stored and processed as data; the worker goes on."""

from __future__ import annotations

import json
from itertools import zip_longest
from pathlib import Path

import psycopg
import pytest

from listener.stub.server import StubConfig, run_stub
from tests.support import (
    insert_job,
    make_settings,
    query,
    run_listener,
    running_worker,
    status_counts,
    wait_until,
)

pytestmark = pytest.mark.anyio

# product_id: (payload as an SQL expression, what its error says). None of them reaches OpenAI.
BAD_PAYLOADS = {
    "null": ("NULL", "payload is missing (NULL)"),
    "json-null": ("'null'::jsonb", "got null"),
    "array": ("'[1, 2]'::jsonb", "got an array"),
    "number": ("'42'::jsonb", "got a number"),
    "text": ("'\"just some text\"'::jsonb", "got a string"),
    "no-name": ("'{\"price\": 3}'::jsonb", "payload has no product 'name'"),
    "huge": (
        "jsonb_build_object('name', 'Huge', 'blob', repeat('x', 10 * 1024 * 1024))",
        "payload is 10,485,788 bytes, over the limit of 65,536 (MAX_PAYLOAD_BYTES)",
    ),
    "deep": (
        "('{\"name\": \"Deep\", \"a\": ' || repeat('[', 5000) || repeat(']', 5000) || '}')::jsonb",
        "payload is nested too deeply to read",
    ),
}

# Names a product may really have, and strings meant to break a query or a template: all data.
ODD_NAMES = [
    "Thé vert \U0001f375 \u6f22\u5b57",
    "\u202eevil right-to-left\u202c",
    "zero\u200dwidth\u200bjoiner e\u0301",
    "'; DROP TABLE jobs; --",
    "Robert'); DELETE FROM job_items; --",
    "%(ids)s %s {0} $1 \\x00 \\u0000",
    "x" * 20_000,
]
HOSTILE = "'; DROP TABLE jobs; --[/red] [bold]"


def insert_items(conninfo: str, store: str, rows: list[tuple[str, str, tuple[str, ...]]]) -> None:
    """One job of (product_id, payload as SQL, its parameters) items, as any client would."""
    with psycopg.connect(conninfo) as conn:
        job = conn.execute(
            "INSERT INTO jobs (instance_id) VALUES (%s) RETURNING id", (store,)
        ).fetchone()
        assert job is not None
        for product_id, expression, params in rows:
            conn.execute(
                # The test's own SQL expressions; the values still travel as parameters.
                "INSERT INTO job_items (job_id, instance_id, product_id, payload)"  # noqa: S608
                f" VALUES (%s, %s, %s, {expression})",
                (job[0], store, product_id, *params),
            )


async def test_each_bad_payload_fails_alone_with_its_reason_and_the_rest_complete(
    database_url: str,
) -> None:
    good = [
        (f"good-{n}", "%s::jsonb", (json.dumps({"name": name}),))
        for n, name in enumerate(ODD_NAMES)
    ]
    bad = [(product_id, expression, ()) for product_id, (expression, _) in BAD_PAYLOADS.items()]
    # Bad and good items of one store, interleaved: a bad one must not take its batch down.
    mixed = [item for pair in zip_longest(bad, good) for item in pair if item is not None]
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url, worker_concurrency=4, max_attempts=3)
        async with running_worker(database_url, settings):
            insert_items(database_url, "store-mixed", mixed)
            insert_job(database_url, "store-fine", 5)
            total = len(BAD_PAYLOADS) + len(ODD_NAMES) + 5
            await wait_until(
                lambda: (
                    status_counts(database_url).get("COMPLETED", 0)
                    + status_counts(database_url).get("FAILED", 0)
                    == total
                ),
                deadline=60,
            )
        # The bad items never reached OpenAI: no request was spent on them.
        assert stub.state.requests_total == len(ODD_NAMES) + 5
    items = {
        row[0]: row[1:]
        for row in query(
            database_url,
            "SELECT product_id, status, attempts, error, result->>'text', payload->>'name'"
            " FROM job_items WHERE instance_id = 'store-mixed'",
        )
    }
    for product_id, (_expression, reason) in BAD_PAYLOADS.items():
        status, attempts, error, _text, _name = items[product_id]
        assert (status, attempts) == ("FAILED", 1), product_id
        assert reason in error, (product_id, error)
    for product_id, _expression, _params in good:
        status, attempts, error, text, name = items[product_id]
        assert (status, attempts, error) == ("COMPLETED", 1, None), product_id
        # The model's text is stored as the data it is: whatever it quotes comes back intact.
        assert name[:60].strip(" .!?\"'") in text, (name[:60], text[:200])
    jobs = dict(query(database_url, "SELECT instance_id, status FROM jobs"))
    assert jobs == {"store-mixed": "COMPLETED_WITH_ERRORS", "store-fine": "COMPLETED"}


@pytest.mark.parametrize(
    ("store", "product_id", "payload", "refusal"),
    [
        ("", "p1", '{"name": "x"}', "jobs_instance_id_valid"),
        ("   ", "p1", '{"name": "x"}', "jobs_instance_id_valid"),
        ("s" * 10_000, "p1", '{"name": "x"}', "jobs_instance_id_valid"),
        ("store\nERROR forged log line", "p1", '{"name": "x"}', "jobs_instance_id_valid"),
        ("store\x1b[2J", "p1", '{"name": "x"}', "jobs_instance_id_valid"),
        ("store", "p" * 10_000, '{"name": "x"}', "job_items_product_id_length"),
        ("store\x00evil", "p1", '{"name": "x"}', "NUL"),
        ("store", "p\x00", '{"name": "x"}', "NUL"),
        ("store", "p1", '{"name": "a\\u0000b"}', "unsupported Unicode escape sequence"),
        ("store", "p1", '{"name": "\\ud800"}', "Unicode low surrogate"),
        ("store", "p1", "[" * 50_000 + "]" * 50_000, "stack depth limit exceeded"),
        ("store", "p1", '{"name": ', "invalid input syntax for type json"),
    ],
)
def test_input_the_tables_cannot_hold_is_refused_at_insert_with_a_clear_error(
    database_url: str, store: str, product_id: str, payload: str, refusal: str
) -> None:
    with pytest.raises(psycopg.Error, match=refusal), psycopg.connect(database_url) as conn:
        job = conn.execute(
            "INSERT INTO jobs (instance_id) VALUES (%s) RETURNING id", (store,)
        ).fetchone()
        assert job is not None
        conn.execute(
            "INSERT INTO job_items (job_id, instance_id, product_id, payload)"
            " VALUES (%s, %s, %s, %s::jsonb)",
            (job[0], store, product_id, payload),
        )
    # Nothing half-written: the refused job's transaction rolled back as a whole.
    assert query(database_url, "SELECT count(*) FROM jobs") == [(0,)]
    assert query(database_url, "SELECT count(*) FROM job_items") == [(0,)]


def test_the_item_constraint_holds_even_when_its_job_is_fine(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("INSERT INTO jobs (instance_id) VALUES ('ok') RETURNING id").fetchone()
        assert row is not None
        conn.commit()
        with pytest.raises(psycopg.errors.CheckViolation, match="job_items_instance_id_valid"):
            conn.execute(
                "INSERT INTO job_items (job_id, instance_id, payload) VALUES (%s, '', '{}')",
                (row[0],),
            )


async def test_hostile_strings_through_the_cli_are_data(database_url: str, tmp_path: Path) -> None:
    products = tmp_path / "products.json"
    products.write_text(
        json.dumps(
            [
                {"id": HOSTILE, "name": HOSTILE, "note": "$$; SELECT pg_sleep(100); $$"},
                {"id": "p2", "name": "Robert'); DROP TABLE job_items; --"},
            ]
        ),
        encoding="utf-8",
    )
    enqueued = run_listener(
        "enqueue", "--store", HOSTILE, "--file", str(products), DATABASE_URL=database_url
    )
    assert enqueued.returncode == 0, enqueued.stderr
    async with (
        run_stub(StubConfig()) as stub,
        running_worker(database_url, make_settings(stub.base_url)),
    ):
        await wait_until(lambda: status_counts(database_url) == {"COMPLETED": 2})
    rows = query(database_url, "SELECT instance_id, product_id, payload->>'name' FROM job_items")
    assert sorted(rows) == sorted(
        [(HOSTILE, HOSTILE, HOSTILE), (HOSTILE, "p2", "Robert'); DROP TABLE job_items; --")]
    )
    assert query(database_url, "SELECT instance_id, status FROM jobs") == [(HOSTILE, "COMPLETED")]
    # The store and product ids are shown as text, not read as the terminal's markup.
    (job_id,) = query(database_url, "SELECT id FROM jobs")[0]
    status = run_listener("status", str(job_id), DATABASE_URL=database_url, COLUMNS="200")
    assert status.returncode == 0, status.stderr
    assert HOSTILE in status.stdout


def test_a_store_id_too_long_for_the_table_is_one_clear_line_from_enqueue(
    database_url: str,
) -> None:
    enqueued = run_listener(
        "enqueue", "--store", "s" * 300, "--products", "2", DATABASE_URL=database_url
    )
    assert enqueued.returncode == 1
    assert enqueued.stderr.count("\n") == 1, enqueued.stderr
    assert enqueued.stderr == (
        "listener: the store id is 300 bytes, over the limit of 255 (jobs_instance_id_valid)\n"
    )
    assert query(database_url, "SELECT count(*) FROM jobs") == [(0,)]
