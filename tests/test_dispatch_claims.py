"""The dispatcher's claims against a real database: what a claim that came back short does to
the ring when a notification arrived while it was on its way."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from psycopg_pool import AsyncConnectionPool

from listener.items import ClaimedItem
from tests.support import insert_job, new_dispatcher

pytestmark = pytest.mark.anyio


async def test_a_store_notified_while_its_claim_was_on_its_way_stays_in_the_ring(
    database_url: str,
) -> None:
    # The claim's snapshot may predate an item whose notification arrives before the claim
    # returns. Dropping the store for coming back short would strand that item until the next
    # sweep (30 s): a notification already spent does not come again.
    await insert_job(database_url, "store-a", 1)
    async with AsyncConnectionPool(database_url, min_size=1, max_size=2) as pool:
        dispatcher = new_dispatcher(pool)
        dispatcher.notify("store-a")
        got: list[ClaimedItem | None] = []

        async def ask() -> None:
            got.append(await dispatcher.next_item())

        async def notify_during_the_claim() -> None:
            while dispatcher.claims == 0 and dispatcher._claim_settled.is_set():
                await anyio.lowlevel.checkpoint()
            assert dispatcher.claims == 0, "the claim ended before the notification came"
            dispatcher.notify("store-a")

        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatcher.run_claimer)
            async with anyio.create_task_group() as asking:
                asking.start_soon(notify_during_the_claim)
                asking.start_soon(ask)
                asking.start_soon(ask)  # two workers, one item: the claim comes back short
            tg.cancel_scope.cancel()
    # The store stayed in the ring, so the worker left without an item looked again (here
    # nothing new had been committed after all: that second claim came back empty and dropped it).
    assert sorted(item is not None for item in got) == [False, True]
    assert dispatcher.claims == 2
    assert "store-a" not in dispatcher.ring


@pytest.mark.parametrize("count", ["²", "٣", "1²"])
def test_a_served_notification_with_other_digits_is_ignored(count: str) -> None:
    # "²".isdigit() is true and int("²") raises: the listener's callback must not fail on it.
    dispatcher = new_dispatcher(None)
    dispatcher.notify("store-a")
    dispatcher.served_elsewhere(f"other\x1fstore-a\x1f{count}")
    assert list(dispatcher.ring) == ["store-a"]
