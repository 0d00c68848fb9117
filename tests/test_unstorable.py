"""Outcomes PostgreSQL cannot store: cleaned where they can be, failed one item at a time where
they cannot, and never a batch retried for ever behind one of them."""

from __future__ import annotations

import dataclasses
from random import Random
from typing import Any

import anyio
import pytest

from listener import items as items_db
from listener.complete import Completer
from listener.db import open_pool
from listener.handler import Handler, Item, Result
from listener.items import ClaimedItem, Outcome
from listener.storable import CLEANED_KEY, Cleaning, clean_value, storable
from listener.stub.server import StubConfig, run_stub
from tests.support import (
    SLACK,
    RecordingGenerator,
    insert_job,
    make_settings,
    query,
    running_worker,
    wait_for_counts,
)

pytestmark = pytest.mark.anyio

NAN = float("nan")


def test_nul_and_unpaired_surrogates_are_cleaned_and_counted() -> None:
    cleaning = Cleaning()
    value = {"te\x00xt": ["a\x00b\x00", "c\ud800d"], "pair": "\ud83d\ude00", "n": 1}
    assert clean_value(value, cleaning) == {"text": ["ab", "c\ufffdd"], "pair": "😀", "n": 1}
    assert cleaning.note() == {"nul_removed": 3, "surrogates_replaced": 1}


def test_an_outcome_with_nothing_to_clean_is_left_as_it_is() -> None:
    outcome = Outcome(1, "COMPLETED", result={"text": "plain", "é": "ünïcode"})
    assert storable(outcome) is outcome


def test_a_cleaned_error_text_says_so() -> None:
    cleaned = storable(Outcome(1, "FAILED", error="bad\x00 answer \udcff"))
    assert cleaned.error == (
        "bad answer \ufffd [cleaned for storage: 1 NUL character(s) removed; "
        "1 unpaired surrogate(s) replaced by U+FFFD]"
    )


async def _claimed(database_url: str, count: int) -> tuple[Any, list[ClaimedItem]]:
    await insert_job(database_url, "store-u", count)
    pool = await open_pool(database_url, make_settings("http://127.0.0.1:9/v1"))
    result = await items_db.claim(pool, "w1", ["store-u"], [count], 60.0, 65_536)
    assert len(result.items) == count
    return pool, result.items


async def _rows(database_url: str) -> dict[int, tuple[Any, ...]]:
    rows = await query(database_url, "SELECT id, status, result, error FROM job_items")
    return {int(r[0]): tuple(r[1:]) for r in rows}


async def test_a_batch_of_outcomes_lands_field_by_field_as_one_json_document(
    database_url: str,
) -> None:
    # finish_items reads the batch as one JSON document: each field of each outcome lands,
    # NULL where Python had None, a backslash-u text as written (a hint to look, not a NUL),
    # a NUL cleaned, a quote and a non-ASCII letter as they are.
    pool, claimed = await _claimed(database_url, 4)
    done, looks_escaped, nul, retried = claimed
    try:
        written = await items_db.finish(
            pool,
            "w1",
            [
                Outcome.completed(done, {"text": 'a "quoted" é', "n": 1.5, "none": None}),
                Outcome.completed(looks_escaped, {"text": "C:\\u0000 and \\ud800"}),
                Outcome.completed(nul, {"text": "a\x00b"}),
                Outcome.retry(retried, 'it said "no" \u00e9', delay=0.0),
            ],
        )
    finally:
        await pool.close()
    assert written == {item.id for item in claimed}
    rows = await _rows(database_url)
    assert rows[done.id] == ("COMPLETED", {"text": 'a "quoted" é', "n": 1.5, "none": None}, None)
    assert rows[looks_escaped.id] == ("COMPLETED", {"text": "C:\\u0000 and \\ud800"}, None)
    assert rows[nul.id][:2] == (
        "COMPLETED",
        {"text": "ab", CLEANED_KEY: {"nul_removed": 1, "surrogates_replaced": 0}},
    )
    assert rows[retried.id] == ("PENDING", None, 'it said "no" é')
    attempts = await query(
        database_url, "SELECT attempts FROM job_items WHERE id = %s", [retried.id]
    )
    assert attempts == [(1,)]  # a retry keeps its attempt (a release would give it back)


async def test_one_poisoned_outcome_fails_alone_and_the_completer_keeps_going(
    database_url: str,
) -> None:
    pool, items = await _claimed(database_url, 7)
    written: list[Outcome] = []
    batch_done = anyio.Event()

    def on_written(batch: list[Outcome], _superseded: list[Outcome]) -> None:
        written.extend(batch)
        if len(written) >= 6:
            batch_done.set()

    try:
        completer = Completer(pool, "w1", on_written, Random(1))
        done = anyio.Event()
        *first, last = items
        poisoned = first[3]
        async with anyio.create_task_group() as tg:
            # One batch: every outcome is queued before the completer first runs.
            for item in first:
                if item is poisoned:
                    # jsonb has no NaN: PostgreSQL refuses the value (SQLSTATE 22P02).
                    completer.emit(Outcome.completed(item, {"text": "x", "score": NAN}))
                elif item is first[1]:
                    completer.emit(Outcome.completed(item, {"text": "nul\x00 here"}))
                elif item is first[2]:
                    completer.emit(Outcome.retry(item, "broken \ud800 answer", 60.0))
                else:
                    completer.emit(Outcome.completed(item, {"text": f"ok {item.id}"}))
            tg.start_soon(completer.run, done)
            # A bound against the old behaviour (the batch retried for ever), not a speed
            # target; the completer is shielded: only its close ends a retry loop.
            with anyio.move_on_after(10 * SLACK):
                await batch_done.wait()
            if not batch_done.is_set():
                completer.close(give_up_after=0.0)
                pytest.fail("the completer is stuck retrying the refused batch")
            # And the completer goes on with the next outcomes.
            completer.emit(Outcome.completed(last, {"text": "after"}))
            completer.close(give_up_after=5.0)
    finally:
        await pool.close()
    rows = await _rows(database_url)
    status, result, error = rows[poisoned.id]
    assert status == "FAILED"
    assert result is None
    assert error == (
        "the COMPLETED outcome could not be stored: invalid input syntax for type json"
    )
    assert rows[first[1].id][:2] == (
        "COMPLETED",
        {"text": "nul here", CLEANED_KEY: {"nul_removed": 1, "surrogates_replaced": 0}},
    )
    status, _result, error = rows[first[2].id]
    assert status == "PENDING"
    assert error.startswith("broken \ufffd answer [cleaned for storage: ")
    for item in (first[0], first[4], first[5]):
        assert rows[item.id][:2] == ("COMPLETED", {"text": f"ok {item.id}"})
    assert rows[last.id][:2] == ("COMPLETED", {"text": "after"})
    # The worker hears of the failure as what was written.
    assert [o.status for o in written if o.item_id == poisoned.id] == ["FAILED"]
    jobs = await query(database_url, "SELECT status FROM jobs")
    assert jobs == [("PROCESSING",)]  # first[2] is PENDING again


async def test_a_claim_whose_outcomes_are_refused_still_claims_and_gives_them_back(
    database_url: str,
) -> None:
    pool, items = await _claimed(database_url, 2)
    await insert_job(database_url, "store-next", 1)
    try:
        # Held for a claim for ten minutes: only a give-back makes it write now.
        completer = Completer(pool, "w1", lambda _w, _s: None, Random(1), hold_seconds=600)
        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.run, done)
            try:
                completer.emit(Outcome.completed(items[0], {"text": "ok"}))
                completer.emit(Outcome.completed(items[1], {"score": NAN}))
                taken = completer.take()
                assert len(taken) == 2
                result = await items_db.claim(
                    pool, "w1", ["store-next"], [1], 60.0, 65_536, outcomes=taken
                )
                # The claim's items are not lost with its outcomes: its workers keep their
                # limiter slots.
                assert [item.instance_id for item in result.items] == ["store-next"]
                assert result.written is None
                completer.written(taken, result.written)  # as the claimer does
                # Written by the completer alone from now on, never taken by a claim again.
                assert completer.take() == []
                await wait_for_counts(database_url, lambda c: c.get("FAILED") == 1)
            finally:
                completer.close(give_up_after=5.0)  # the completer is shielded
    finally:
        await pool.close()
    rows = await _rows(database_url)
    assert rows[items[0].id][:2] == ("COMPLETED", {"text": "ok"})
    assert rows[items[1].id][0] == "FAILED"


class NulAnswers(RecordingGenerator):
    """The real OpenAI kinds against the stub; the model's answer then holds a NUL and a lone
    surrogate, as a real model's output may."""

    async def call(self, handler: Handler, item: Item) -> Any:
        answer: Result = await handler(item)
        value = {**answer.value, "text": f"{answer.value['text']}\x00\udc80"}
        return dataclasses.replace(answer, value=value)


async def test_a_model_answer_holding_nul_lands_completed_and_says_it_was_cleaned(
    database_url: str,
) -> None:
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url, worker_concurrency=2)
        async with running_worker(database_url, settings, NulAnswers(settings)):
            await insert_job(database_url, "store-nul", 3)
            await wait_for_counts(database_url, lambda c: c == {"COMPLETED": 3})
    for (result,) in await query(database_url, "SELECT result FROM job_items"):
        assert result["text"].endswith("it.\ufffd")
        assert result[CLEANED_KEY] == {"nul_removed": 1, "surrogates_replaced": 1}
    assert await query(database_url, "SELECT status FROM jobs") == [("COMPLETED",)]


async def test_a_late_outcome_of_an_old_claim_keeps_the_new_claims_lease_renewed(
    database_url: str,
) -> None:
    # A frozen worker's lease expired, the item was reaped and this same worker claimed it
    # again (attempt 2); then the first claim's outcome comes back, refused as superseded. The
    # second claim must still be held, so the heartbeat goes on renewing its lease.
    from listener.assembly import open_worker

    settings = make_settings("http://127.0.0.1:9/v1")
    async with open_worker(settings, database_url) as worker:
        first = ClaimedItem(5, 1, "store-f", "p1", "{}", 2, attempts=1)
        again = ClaimedItem(5, 1, "store-f", "p1", "{}", 2, attempts=2)
        worker._on_claimed([first])
        worker._on_claimed([again])
        worker._on_written([], [Outcome.completed(first, {"text": "late"})])
        assert [item_id for item_id, _attempt in worker.held] == [5]
        worker._on_written([Outcome.completed(again, {"text": "ok"})], [])
        assert not worker.held


async def test_an_item_the_reaper_fails_frees_its_store_s_room_and_says_so(
    database_url: str,
) -> None:
    # A store at its max_in_flight of 1: its worker died holding the item, on its last attempt.
    # The reaper ends it FAILED: the store has room again, and every process must hear of it
    # (no trigger announces an item that ends; only one back to PENDING).
    import psycopg

    from tests.support import heard_so_far

    await query(database_url, "INSERT INTO stores (instance_id, max_in_flight) VALUES ('s-cap', 1)")
    await insert_job(database_url, "s-cap", 2)
    pool = await open_pool(database_url, make_settings("http://127.0.0.1:9/v1"))
    try:
        claimed = await items_db.claim(pool, "dead", ["s-cap"], [2], 60.0, 65_536)
        assert len(claimed.items) == 1  # the cap
        await query(
            database_url,
            "UPDATE job_items SET lease_expires_at = now() - interval '1 s'"
            " WHERE status = 'PROCESSING'",
        )
        with (
            psycopg.connect(database_url, autocommit=True) as listener,
            psycopg.connect(database_url, autocommit=True) as conn,
        ):
            listener.execute("LISTEN job_items_ready")
            heard_so_far(listener, conn, "job_items_ready")
            reaped = await items_db.reap_expired(pool, max_attempts=1)
            assert [status for _id, _store, status in reaped] == ["FAILED"]
            assert heard_so_far(listener, conn, "job_items_ready") == ["s-cap"]
    finally:
        await pool.close()
