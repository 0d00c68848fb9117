"""The batch path end to end (issue 27, part 2): batch-tier items through the stub's Files and
Batches API over real HTTP with the real openai client, against a real PostgreSQL. Each test
drives the runner one pass at a time and moves the stub's batch clock itself."""

from __future__ import annotations

import json
import logging
import random

import anyio
import pytest

from listener import enqueue
from listener import items as items_db
from listener.attempt import handler_item
from listener.batches.context import Context
from listener.batches.outcome import line_outcome, read_lines, write_outcomes
from listener.batches.poll import decide_all
from listener.batches.store import batch_items, open_batches
from listener.stub.server import StubConfig
from listener.stub.text import BATCH_400_MARKER, BATCH_ERROR_MARKER
from tests.batch_support import (
    DONE,
    HOUR,
    SLOW,
    batch_env,
    batch_rows,
    items_by_status,
    job_status,
    products,
)
from tests.support import make_settings, query, running_worker, wait_until

pytestmark = pytest.mark.anyio


async def test_a_batch_job_completes_through_the_batch_api_and_no_real_time_call(
    database_url: str,
) -> None:
    async with batch_env(database_url) as env:
        big = enqueue(database_url, "store-big", products(40), tier="batch")
        small = enqueue(database_url, "store-small", products(3, "Mug"), tier="batch")
        await env.run_pass()  # collect, upload, submit
        ((batch_id, state, status, _outcome, count, openai_id, _error),) = await batch_rows(
            database_url
        )
        assert (state, status, count) == ("submitted", "validating", 43)
        held = await query(
            database_url,
            "SELECT DISTINCT status, claimed_by, lease_expires_at, openai_batch_id FROM job_items",
        )
        assert held == [("PROCESSING", f"batch:{batch_id}", None, batch_id)]
        # The reaper leaves them to the batch path: they have no lease to expire.
        assert await items_db.reap_expired(env.pool, 5) == []
        await env.advance(DONE)
        await env.run_pass()  # poll: the output file written to the items
        assert env.stub.state.requests_total == 0  # not one real-time call
        batches = await env.openai_batches()
    assert [b.id for b in batches] == [openai_id]
    assert (await batch_rows(database_url))[0][1:4] == ("finished", "completed", "completed")
    assert await items_by_status(database_url, big) == {"COMPLETED": 40}
    assert await items_by_status(database_url, small) == {"COMPLETED": 3}
    assert await job_status(database_url, big) == ("COMPLETED", True)
    assert await job_status(database_url, small) == ("COMPLETED", True)
    ((result, served_tier, model, usage, attempts),) = await query(
        database_url,
        "SELECT result, served_tier, model, usage, attempts FROM job_items WHERE job_id = %s"
        " ORDER BY id LIMIT 1",
        (small,),
    )
    assert "Mug 0" in result["text"] and result["finish_reason"] == "stop"
    assert (served_tier, model, attempts) == ("batch", result["model"], 1)
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0


async def test_the_input_lines_are_the_real_time_bodies_one_per_item(database_url: str) -> None:
    async with batch_env(database_url) as env:
        job = enqueue(
            database_url, "s", products(2), kind="seo_meta", options={"keywords": "tea"},
            tier="batch",
        )  # fmt: skip
        await env.run_pass()
        ((file_id,),) = await query(database_url, "SELECT input_file_id FROM openai_batches")
        content = await env.client.files.content(file_id)
        lines = [json.loads(line) for line in content.text.splitlines()]
        async with env.pool.connection() as conn:
            (row,) = await open_batches(conn, ["submitted"])
            items = await batch_items(conn, row.id, 65_536)
        kind, handler = env.app["seo_meta"], env.runner.handlers["seo_meta"]
        expected = [handler.request(handler_item(item, kind, env.settings)) for item in items]
    assert [line["custom_id"] for line in lines] == [str(item.id) for item in items]
    assert [line["body"] for line in lines] == expected
    assert {line["url"] for line in lines} == {"/v1/chat/completions"}
    assert expected[0]["response_format"]["type"] == "json_schema"
    assert await items_by_status(database_url, job) == {"PROCESSING": 2}


async def test_stores_share_a_file_round_robin_within_the_per_store_cap(
    database_url: str,
) -> None:
    async with batch_env(database_url, batch_max_requests=30, batch_max_per_store=20) as env:
        enqueue(database_url, "import", products(100), tier="batch")
        enqueue(database_url, "little", products(5), tier="batch")
        await env.run_pass()
        taken = await query(
            database_url,
            "SELECT instance_id, openai_batch_id, count(*) FROM job_items"
            " WHERE status = 'PROCESSING' GROUP BY 1, 2 ORDER BY 2, 1",
        )
    first = {store: count for store, batch, count in taken if batch == taken[0][1]}
    assert first == {"import": 20, "little": 5}  # the cap, and the small store's 5 all in it
    assert sum(count for _s, _b, count in taken) == 105  # the rest in the next files of the pass


async def test_failed_lines_are_retried_in_a_later_batch_then_fail(database_url: str) -> None:
    async with batch_env(database_url, max_attempts=2) as env:
        flaky = enqueue(database_url, "s", products(2, marker=f" {BATCH_ERROR_MARKER}"),
                        tier="batch")  # fmt: skip
        bad = enqueue(database_url, "s", products(1, marker=f" {BATCH_400_MARKER}"), tier="batch")
        good = enqueue(database_url, "s", products(2), tier="batch")
        await env.run_pass()
        await env.advance(DONE)
        await env.run_pass()  # written; the 500s back in the queue and into a new batch
        assert await items_by_status(database_url, flaky) == {"PROCESSING": 2}
        assert await items_by_status(database_url, bad) == {"FAILED": 1}
        assert await items_by_status(database_url, good) == {"COMPLETED": 2}
        second = await query(
            database_url,
            "SELECT DISTINCT tier, openai_batch_id, attempts, error FROM job_items"
            " WHERE job_id = %s",
            (flaky,),
        )
        # A later batch of the batch tier, never the real-time budget; the failure counted.
        assert [row[:3] for row in second] == [("batch", 2, 2)]
        assert second[0][3].startswith("OpenAI error 500 in batch")
        await env.advance(DONE)
        await env.run_pass()
        assert env.stub.state.requests_total == 0
    assert await items_by_status(database_url, flaky) == {"FAILED": 2}
    errors = await query(database_url, "SELECT error, attempts FROM job_items WHERE job_id = %s",
                         (flaky,))  # fmt: skip
    assert all(e.startswith("gave up after 2 attempt(s): OpenAI error 500") for e, _a in errors)
    assert {attempts for _e, attempts in errors} == {2}
    (reason,) = await query(database_url, "SELECT error FROM job_items WHERE job_id = %s", (bad,))
    assert "request rejected in OpenAI batch" in reason[0]
    assert [row[3] for row in await batch_rows(database_url)] == ["completed", "completed"]


async def _due(conninfo: str, job: int) -> bool:
    """Every item of the job is past its backoff."""
    rows = await query(
        conninfo,
        "SELECT bool_and(run_after <= now()) FROM job_items WHERE job_id = %s", (job,)
    )  # fmt: skip
    return bool(rows[0][0])


async def test_an_expired_batch_returns_its_unfinished_items(database_url: str) -> None:
    config = StubConfig(**{**SLOW, "batch_completion_window_seconds": 3 * HOUR})
    async with batch_env(database_url, config) as env:
        job = enqueue(database_url, "s", products(20), tier="batch")
        await env.run_pass()
        await env.advance(3 * HOUR)  # validated after 1 h, half the processing done at expiry
        await env.run_pass()
        counts = await items_by_status(database_url, job)
        attempts = await query(
            database_url,
            "SELECT status, min(attempts), max(attempts) FROM job_items WHERE job_id = %s"
            " GROUP BY 1",
            (job,),
        )
    # The unfinished ten are back in the queue and in a new batch at once, their attempt given
    # back (1, not 2).
    assert counts == {"COMPLETED": 10, "PROCESSING": 10}
    assert dict((s, (lo, hi)) for s, lo, hi in attempts)["PROCESSING"] == (1, 1)
    assert (await batch_rows(database_url))[0][3] == "expired"


async def test_a_batch_refused_for_the_enqueued_token_limit_waits_and_is_retried(
    database_url: str,
) -> None:
    config = StubConfig(**{**SLOW, "batch_enqueued_token_limit": 10})
    async with batch_env(database_url, config, batch_retry_seconds=0.2) as env:
        job = enqueue(database_url, "s", products(5), tier="batch")
        await env.run_pass()
        await env.advance(HOUR)  # validation: refused
        await env.run_pass()
        assert await items_by_status(database_url, job) == {"PENDING": 5}
        ((state, outcome, error),) = await query(
            database_url, "SELECT state, outcome, last_error FROM openai_batches"
        )
        assert (state, outcome) == ("finished", "refused")
        assert "enqueued-token limit" in error
        attempts = await query(database_url, "SELECT DISTINCT attempts FROM job_items")
        assert attempts == [(0,)]
        env.stub.state.config.batch_enqueued_token_limit = 0  # room again
        await wait_until(lambda: _due(database_url, job))
        await env.run_pass()
        await env.advance(DONE)
        await env.run_pass()
    assert await items_by_status(database_url, job) == {"COMPLETED": 5}


async def test_a_settings_limit_holds_a_batch_back_until_the_enqueued_ones_end(
    database_url: str,
) -> None:
    async with batch_env(
        database_url, batch_enqueued_token_limit=1, batch_max_requests=3, batch_max_per_store=3
    ) as env:
        enqueue(database_url, "s", products(6), tier="batch")
        await env.run_pass()  # two batches collected, one submitted, one waits
        states = sorted(row[1] for row in await batch_rows(database_url))
        assert states == ["submitted", "uploaded"]
        await env.advance(DONE)
        await env.run_pass()  # the first ends, the second goes
        states = sorted(row[1] for row in await batch_rows(database_url))
        assert states == ["finished", "submitted"]
        await env.advance(DONE)
        await env.run_pass()
        assert len(await env.openai_batches()) == 2
    assert await items_by_status(database_url, 1) == {"COMPLETED": 6}


async def test_cancel_ends_its_items_at_once_and_ignores_their_late_lines(
    database_url: str,
) -> None:
    async with batch_env(database_url) as env:
        cancelled = enqueue(database_url, "a", products(3), tier="batch")
        kept = enqueue(database_url, "b", products(2), tier="batch")
        await env.run_pass()
        await query(database_url, "SELECT listener_cancel_job(%s)", (cancelled,))
        assert await items_by_status(database_url, cancelled) == {"CANCELLED": 3}
        assert await job_status(database_url, cancelled) == ("CANCELLED", True)
        await env.run_pass()  # the other job's items are still wanted: the batch goes on
        assert [b.status for b in await env.openai_batches()] == ["validating"]
        await env.advance(DONE)
        await env.run_pass()
    assert await items_by_status(database_url, cancelled) == {"CANCELLED": 3}  # lines ignored
    assert await items_by_status(database_url, kept) == {"COMPLETED": 2}


async def test_a_batch_none_of_whose_items_is_wanted_is_cancelled_at_openai(
    database_url: str,
) -> None:
    async with batch_env(database_url) as env:
        job = enqueue(database_url, "a", products(4), tier="batch")
        await env.run_pass()
        await query(database_url, "SELECT listener_cancel_job(%s)", (job,))
        await env.run_pass()
        assert [b.status for b in await env.openai_batches()] == ["cancelling"]
        await env.advance(DONE)
        await env.run_pass()
    assert (await batch_rows(database_url))[0][1:4] == ("finished", "cancelled", "cancelled")
    assert await items_by_status(database_url, job) == {"CANCELLED": 4}


async def test_a_lost_batch_returns_its_items(database_url: str) -> None:
    async with batch_env(database_url) as env:
        job = enqueue(database_url, "a", products(3), tier="batch")
        await env.run_pass()
        await query(database_url, "UPDATE openai_batches SET openai_batch_id = 'batch_gone'")
        await env.run_pass()  # lost: back in the queue, then collected into a new batch
        rows = await batch_rows(database_url)
        assert [row[3] for row in rows] == ["lost", None]
        await env.advance(DONE)
        await env.run_pass()
    assert await items_by_status(database_url, job) == {"COMPLETED": 3}
    assert await query(database_url, "SELECT DISTINCT attempts FROM job_items") == [(1,)]


async def test_a_batch_failing_validation_retries_its_items_by_the_attempt_rule(
    database_url: str,
) -> None:
    config = StubConfig(**{**SLOW, "batch_max_requests": 2})  # the file is refused as too long
    async with batch_env(database_url, config, max_attempts=2) as env:
        job = enqueue(database_url, "a", products(3), tier="batch")
        for _ in range(2):
            await env.run_pass()
            await env.advance(HOUR)
            await env.run_pass()
            await wait_until(lambda: _due(database_url, job))
    assert await items_by_status(database_url, job) == {"FAILED": 3}
    rows = await batch_rows(database_url)
    assert [row[3] for row in rows[:2]] == ["failed", "failed"]
    assert "too_many_requests" in rows[0][6]
    (error,) = (await query(database_url, "SELECT DISTINCT error FROM job_items"))[0]
    assert error.startswith("gave up after 2 attempt(s): OpenAI batch") and "validation" in error


async def test_unknown_custom_ids_and_a_truncated_output_file(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with batch_env(database_url) as env:
        job = enqueue(database_url, "a", products(3), tier="batch")
        await env.run_pass()
        await env.advance(DONE)
        (batch,) = await env.openai_batches()
        output = (await env.client.files.content(batch.output_file_id or "")).text
        lines = output.splitlines()
        # One whole line, one cut in the middle (a truncated download), one not JSON, and lines
        # naming an item of no batch of ours and a foreign id.
        truncated = "\n".join(
            [lines[0], lines[1][: len(lines[1]) // 2], "<html>", '{"custom_id": "999999"}',
             '{"custom_id": "not-ours", "response": null}']
        )  # fmt: skip
        async with env.pool.connection() as conn:
            (row,) = await open_batches(conn, ["submitted"])
            items = await batch_items(conn, row.id, 65_536)
            ctx = Context(conn, env.client, env.settings, env.app)
            kind, handler = env.app[row.kind], env.runner.handlers[row.kind]

            def decide(item: items_db.ClaimedItem, line: object) -> object:
                return line_outcome(item, line, batch=batch.id, kind=kind, handler=handler,  # type: ignore[arg-type]
                                    settings=env.settings, rng=random.Random(1))  # fmt: skip

            with caplog.at_level(logging.WARNING, "listener.batches"):
                decided = await decide_all(items, read_lines(truncated), decide, str(row.id))  # type: ignore[arg-type]
                await write_outcomes(ctx.conn, row.id, decided)  # type: ignore[arg-type]
    counts = await items_by_status(database_url, job)
    assert counts == {"COMPLETED": 1, "PENDING": 2}
    errors = await query(
        database_url, "SELECT error FROM job_items WHERE status = 'PENDING' ORDER BY id"
    )
    assert all("returned no line for it" in e for (e,) in errors)
    logged = caplog.text
    assert "2 output line(s) name no item it still holds" in logged
    assert "2 line(s) of its files could not be read" in logged


async def test_a_worker_runs_the_batch_path_on_its_timer(database_url: str) -> None:
    fast = StubConfig(
        batch_validating_seconds=0.05, batch_processing_seconds=0.1, batch_finalizing_seconds=0.05
    )
    async with batch_env(database_url, fast) as env:
        settings = make_settings(env.stub.base_url, batch_poll_seconds=0.2)
        async with running_worker(database_url, settings):
            job = enqueue(database_url, "w", products(4), tier="batch")
            await wait_until(lambda: _finished(database_url, job))
        assert env.stub.state.requests_total == 0
    assert await items_by_status(database_url, job) == {"COMPLETED": 4}


async def _finished(conninfo: str, job: int) -> bool:
    return (await job_status(conninfo, job))[1]


async def test_why_waiting_names_the_batch_its_items_are_in(database_url: str) -> None:
    from listener.http.snapshot import SharedSnapshot

    async with batch_env(database_url) as env:
        job = enqueue(database_url, "a", products(3), tier="batch")
        waiting = await SharedSnapshot(env.pool, env.settings).get()
        assert waiting is not None
        (before,) = [j for j in waiting.jobs if j.id == job]
        await env.run_pass()
        await env.advance(HOUR + 60)  # validated: in progress
        await env.run_pass()  # polled
        snapshot = await SharedSnapshot(env.pool, env.settings).get()
        (openai_batch,) = await env.openai_batches()
    assert snapshot is not None
    (row,) = [j for j in snapshot.jobs if j.id == job]
    assert any("wait to be collected into an OpenAI batch" in r for r in before.reasons)
    assert not any("next in line" in r or "turn" in r for r in before.reasons), before.reasons
    (said,) = [r for r in row.reasons if "OpenAI batch" in r]
    assert said.startswith(f"3 item(s) in OpenAI batch {openai_batch.id}, submitted ")
    assert said.endswith(" ago, in_progress"), said


async def test_status_of_a_job_names_its_batches(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from listener import show

    async with batch_env(database_url) as env:
        job = enqueue(database_url, "a", products(2), tier="batch")
        await env.run_pass()
        (openai_batch,) = await env.openai_batches()
        await anyio.to_thread.run_sync(show.status, database_url, job, 10, True)
    document = json.loads(capsys.readouterr().out)
    (hold,) = document["batches"]
    assert (hold["openai_batch_id"], hold["state"], hold["items"]) == (
        openai_batch.id,
        "submitted",
        2,
    )
