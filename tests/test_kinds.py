"""Job kinds: the OpenAI kinds through one budget, structured outputs, a user's app loaded with
`--app`, a process limited to some kinds, and every bad input a kind can meet."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from listener import InvalidJob, enqueue
from listener.assembly import served_app
from listener.handler import App
from listener.stub.server import StubConfig, run_stub
from listener.stub.text import INVALID_MARKER, REFUSE_MARKER
from tests.apps.alt_text import app as alt_text_app
from tests.support import (
    communicate,
    make_settings,
    query,
    run_listener,
    running_worker,
    spawn_worker,
    wait_until,
)

pytestmark = pytest.mark.anyio


async def items_of(conninfo: str, job_id: int) -> dict[str, tuple[Any, ...]]:
    rows = await query(
        conninfo,
        "SELECT product_id, status, kind, result, error, attempts FROM job_items"
        " WHERE job_id = %s ORDER BY id",
        (job_id,),
    )
    return {row[0]: row[1:] for row in rows}


async def job_done(conninfo: str, job_id: int) -> bool:
    rows = await query(
        conninfo, "SELECT completed_at IS NOT NULL FROM jobs WHERE id = %s", (job_id,)
    )
    return bool(rows and rows[0][0])


def products(names: list[str], **extra: Any) -> list[dict[str, Any]]:
    return [
        {"id": f"p{n}", "name": name, "description": "Hand-thrown stoneware.", **extra}
        for n, name in enumerate(names)
    ]


async def test_three_kinds_through_one_budget_each_with_its_own_output(database_url: str) -> None:
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url, rate_limit_rpm=6000, worker_concurrency=4)
        async with running_worker(database_url, settings) as worker:
            assert worker.kinds == ["product_description", "seo_meta", "translation"]
            assert len(worker.lanes) == 1  # one budget: one ring for the three kinds
            description = enqueue(database_url, "store-k", products(["Blue Mug", "Red Bowl"]))
            seo = enqueue(
                database_url,
                "store-k",
                products(["Green Vase"]),
                kind="seo_meta",
                options={"keywords": "gift"},
            )
            translation = enqueue(
                database_url,
                "store-t",
                products(["Yellow Cup"]),
                kind="translation",
                options={"language": "French"},
            )
            for job in (description, seo, translation):
                await wait_until(lambda job=job: job_done(database_url, job))
    for status, kind, result, _error, _attempts in (
        await items_of(database_url, description)
    ).values():
        assert (status, kind) == ("COMPLETED", "product_description")
        assert isinstance(result["text"], str) and result["text"]
    [(status, kind, result, _error, _attempts)] = (await items_of(database_url, seo)).values()
    assert (status, kind) == ("COMPLETED", "seo_meta")
    assert set(result["output"]) == {"title", "meta_description"}
    assert len(result["output"]["title"]) <= 60 and len(result["output"]["meta_description"]) <= 160
    [(status, kind, result, _error, _attempts)] = (
        await items_of(database_url, translation)
    ).values()
    assert (status, kind) == ("COMPLETED", "translation")
    assert set(result["output"]) == {"name", "description"}
    # Every call went through the shared budget's row.
    assert await query(
        database_url, "SELECT count(*) FROM rate_limiters WHERE name = 'openai'"
    ) == [(1,)]
    # The kinds the worker served are registered for producers.
    registered = await query(
        database_url, "SELECT name, required_options FROM job_kinds ORDER BY 1"
    )
    assert registered == [
        ("product_description", []),
        ("seo_meta", []),
        ("translation", ["language"]),
    ]


async def test_a_structured_answer_that_does_not_fit_or_is_refused_is_tried_once_more_then_fails(
    database_url: str,
) -> None:
    names = ["Fine Lamp", f"Odd Lamp {INVALID_MARKER}", f"Sad Lamp {REFUSE_MARKER}"]
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url, max_attempts=5)
        async with running_worker(database_url, settings):
            job = enqueue(database_url, "store-s", products(names), kind="seo_meta")
            await wait_until(lambda: job_done(database_url, job))
        # Two calls for each bad answer, one for the good one: no more.
        assert stub.state.completed_total == 5
    items = await items_of(database_url, job)
    assert items["p0"][0] == "COMPLETED"
    status, _kind, result, error, attempts = items["p1"]
    assert (status, attempts, result) == ("FAILED", 2, None)
    assert "does not fit the schema" in error
    status, _kind, result, error, attempts = items["p2"]
    assert (status, attempts) == ("FAILED", 2)
    assert error.startswith("the model refused: ")


async def test_a_template_naming_a_field_the_payload_lacks_fails_that_item_naming_it(
    database_url: str,
) -> None:
    async with run_stub(StubConfig()) as stub:
        async with running_worker(database_url, make_settings(stub.base_url)):
            job = enqueue(
                database_url,
                "store-m",
                [
                    {"id": "whole", "name": "Mug", "description": "Big."},
                    {"id": "bare", "name": "Cup"},
                ],
                kind="translation",
                options={"language": "German"},
            )
            await wait_until(lambda: job_done(database_url, job))
        assert stub.state.requests_total == 1  # the bare item never reached the API
    items = await items_of(database_url, job)
    assert items["whole"][0] == "COMPLETED"
    assert items["bare"][0] == "FAILED"
    assert items["bare"][3] == "the template names field 'description', which the item lacks"


async def test_store_options_are_defaults_under_the_job_s_own(database_url: str) -> None:
    seen: list[dict[str, Any]] = []
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url)
        app = served_app(settings).observed(lambda item: seen.append(dict(item.options)))
        await query(
            database_url,
            "INSERT INTO stores (instance_id, options) VALUES ('store-o', %s)",
            (json.dumps({"brand_voice": "warm", "language": "Spanish"}),),
        )
        async with running_worker(database_url, settings, app):
            job = enqueue(
                database_url, "store-o", products(["Jug"]), options={"language": "Italian"}
            )
            await wait_until(lambda: job_done(database_url, job))
    assert seen == [{"brand_voice": "warm", "language": "Italian"}]


async def test_a_user_app_and_a_plain_sql_job_of_another_kind_share_one_fleet(
    database_url: str,
) -> None:
    """The README's two halves: a Python app's own kind (loaded with --app) and an OpenAI kind a
    Node app enqueues with plain SQL, served by the same worker process under one budget."""
    async with run_stub(StubConfig()) as stub:
        proc = spawn_worker(
            database_url,
            stub.base_url,
            RATE_LIMIT_RPM="6000",
            WORKER_APP="tests.apps.alt_text:app",
        )
        try:
            await wait_until(
                lambda: query(database_url, "SELECT 1 FROM job_kinds WHERE name = 'alt_text'")
            )
            python_job = enqueue(
                database_url,
                "store-py",
                [
                    {"id": "a", "name": "Mug", "image_url": "https://img/mug.jpg"},
                    {"id": "b", "name": "Cup", "image_url": "https://img/flaky.jpg"},
                    {"id": "c", "name": "Bowl"},
                ],
                kind="alt_text",
                options={"language": "fr"},
            )
            [(sql_job,)] = await query(
                database_url,
                "INSERT INTO jobs (instance_id, kind, options) VALUES"
                " ('store-node', 'seo_meta', '{\"keywords\": \"tea\"}') RETURNING id",
            )
            await query(
                database_url,
                "INSERT INTO job_items (job_id, instance_id, product_id, payload) VALUES"
                " (%s, 'store-node', 'n1', '{\"name\": \"Teapot\"}')",
                (sql_job,),
            )
            for job in (python_job, sql_job):
                await wait_until(lambda job=job: job_done(database_url, job))
        finally:
            proc.terminate()
            await communicate(proc, 30)
    items = await items_of(database_url, python_job)
    assert items["a"][:2] == ("COMPLETED", "alt_text")
    assert items["a"][2] == {"alt": "[fr] a photo of Mug"}
    assert items["b"][0] == "COMPLETED" and items["b"][4] == 2  # retried once, then done
    assert items["c"][0] == "FAILED" and items["c"][3] == "payload has no image_url"
    [(status, kind, result, _error, _attempts)] = (await items_of(database_url, sql_job)).values()
    assert (status, kind) == ("COMPLETED", "seo_meta")
    assert "title" in result["output"]
    # alt_text calls no metered API: only the SQL job's one request went through the stub.
    assert stub.state.requests_total == 1


async def test_a_process_limited_to_one_kind_spends_no_slot_on_stores_without_it(
    database_url: str,
) -> None:
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url, rate_limit_rpm=600, worker_kinds="seo_meta")
        async with running_worker(database_url, settings) as worker:
            assert worker.kinds == ["seo_meta"]
            # A slot is spent on a claim, and a claim serves the stores it takes from the ring.
            ring = worker.dispatcher.ring
            taken: list[str] = []
            take = ring.take

            def noting(count: int) -> list[str]:
                stores = take(count)
                taken.extend(stores)
                return stores

            ring.take = noting  # type: ignore[method-assign]
            others = enqueue(database_url, "store-desc", products(["A", "B", "C"]))
            ours = enqueue(database_url, "store-seo", products(["D"]), kind="seo_meta")
            await wait_until(lambda: job_done(database_url, ours))
            # Its listener heard the other store's notification and ignored it.
            assert "store-desc" not in ring
        assert taken and set(taken) == {"store-seo"}
        assert stub.state.requests_total == 1
    statuses = {row[0] for row in (await items_of(database_url, others)).values()}
    assert statuses == {"PENDING"}  # no process serves them here: they wait, nothing is lost


async def test_a_raw_insert_of_a_kind_nobody_serves_stays_pending_and_doctor_names_it(
    database_url: str,
) -> None:
    async with (
        run_stub(StubConfig()) as stub,
        running_worker(database_url, make_settings(stub.base_url)),
    ):
        [(job,)] = await query(
            database_url,
            "INSERT INTO jobs (instance_id, kind) VALUES ('store-x', 'alt_text') RETURNING id",
        )
        await query(
            database_url,
            "INSERT INTO job_items (job_id, instance_id, product_id, payload)"
            " VALUES (%s, 'store-x', 'x1', '{}')",
            (job,),
        )
        done = enqueue(database_url, "store-y", products(["Mug"]))
        await wait_until(lambda: job_done(database_url, done))
        assert (await items_of(database_url, job))["x1"][:2] == ("PENDING", "alt_text")
        doctor = await anyio.to_thread.run_sync(
            lambda: run_listener("doctor", "--no-schema-diff", DATABASE_URL=database_url)
        )
    assert "no live worker serves kind alt_text" in doctor.stdout, doctor.stdout


def test_the_producer_refuses_an_unknown_kind_and_an_undeclared_option(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO job_kinds (name, options) VALUES ('seo_meta', ARRAY['keywords'])")
    with pytest.raises(InvalidJob, match=r"no kind named alt_text \(registered kinds: seo_meta\)"):
        enqueue(database_url, "store-p", products(["Mug"]), kind="alt_text")
    with pytest.raises(InvalidJob, match=r"option 'tone' is not one kind seo_meta declares"):
        enqueue(database_url, "store-p", products(["Mug"]), kind="seo_meta", options={"tone": "x"})
    with pytest.raises(InvalidJob, match="invalid kind 'Bad Kind'"):
        enqueue(database_url, "store-p", products(["Mug"]), kind="Bad Kind")
    with pytest.raises(InvalidJob, match="options must be a JSON object"):
        enqueue(database_url, "store-p", products(["Mug"]), options=["x"])  # type: ignore[arg-type]
    # Nothing was written; today's kind needs no registration.
    assert enqueue(database_url, "store-p", products(["Mug"])) > 0
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (1,)


def _worker_refuses(database_url: str, *args: str, **env: str) -> str:
    run: subprocess.CompletedProcess[str] = run_listener(
        "worker",
        *args,
        DATABASE_URL=database_url,
        OPENAI_API_KEY="sk-test",
        OPENAI_BASE_URL="http://127.0.0.1:9/v1",
        **env,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("kinds_file", "expected"),
    [
        (
            "[seo]\nsystem = 'x'\nuser = \n",
            "kinds file {path}: Invalid value (at line 3, column 8)",
        ),
        (
            "[seo]\nsystem = 'x'\nschema = { type = 'object', required = 'title' }\n",
            "kinds file {path}: kind seo: field schema: not a valid JSON Schema at required:",
        ),
        ("[seo]\nsystem = 'x'\nuser = '{{ payload.name'\n", "kind seo: field user: template error"),
        ("[seo]\nsystem = 'x'\nmodle = 'gpt'\n", "kind seo: field modle: unknown"),
        ("[seo]\nuser = 'x'\n", "kind seo: field system: missing"),
    ],
)
def test_a_bad_kinds_file_is_one_line_naming_the_file_the_kind_and_the_field(
    database_url: str, tmp_path: Path, kinds_file: str, expected: str
) -> None:
    path = tmp_path / "kinds.toml"
    path.write_text(kinds_file)
    line = _worker_refuses(database_url, OPENAI_KINDS_FILE=str(path))
    assert expected.format(path=path) in line


def test_a_bad_app_or_budget_is_one_line(database_url: str) -> None:
    assert "cannot import tests.apps.nowhere: ModuleNotFoundError" in _worker_refuses(
        database_url, "--app", "tests.apps.nowhere:app"
    )
    assert "has no attribute missing" in _worker_refuses(
        database_url, "--app", "tests.apps.alt_text:missing"
    )
    assert "draws from budget 'nowhere', which the app does not declare" in _worker_refuses(
        database_url, "--app", "tests.apps.alt_text:broken"
    )
    assert "WORKER_KINDS: no kind named alt_txt" in _worker_refuses(
        database_url, "--app", "tests.apps.alt_text:app", "--kinds", "alt_txt"
    )


def test_the_app_s_kinds_join_the_openai_ones() -> None:
    settings = make_settings("http://127.0.0.1:9/v1")
    app: App = served_app(settings, alt_text_app)
    assert app.names == ["alt_text", "product_description", "seo_meta", "thumbnail", "translation"]
    assert app["alt_text"].budget is None and app["thumbnail"].budget == "images"
