"""A flood of notifications: 20,000 stores at once, then the same stores announced again and
again. The ring holds each store once whatever the number of notifications, and serves each.
Twenty thousand, not the hundred thousand it once was: the same assertions hold at either size,
and the larger took a minute of the suite on a loaded 2-core machine.

The handler here answers at once, after a gate opens: this test is about the listener, the
ring and the claims under a flood, not about OpenAI (the other tests use the real client).
"""

from __future__ import annotations

import resource
from collections import Counter

import anyio
import pytest

from listener.handler import DEFAULT_KIND, App, Item, Kind, Result
from tests.support import (
    make_settings,
    query,
    running_worker,
    wait_for_counts,
    wait_until,
)

pytestmark = pytest.mark.anyio

STORES = 20_000


class GatedHandler(App):
    """Holds every item until `gate` is set, then answers at once; notes each store served."""

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.served: Counter[str] = Counter()
        super().__init__([Kind(DEFAULT_KIND, self.handle)])

    async def handle(self, item: Item) -> Result:
        await self.gate.wait()
        self.served[item.store] += 1
        return Result({"text": "ok"}, cost=1)


def ring_entries(ring: object) -> int:
    """Entries the ring's queues hold, tombstones included (what its memory grows with)."""
    return ring.entries()  # type: ignore[attr-defined]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def test_twenty_thousand_stores_at_once_keep_the_ring_bounded_and_each_is_served(
    database_url: str,
) -> None:
    handler = GatedHandler()
    settings = make_settings(
        "http://127.0.0.1:9/v1", worker_concurrency=64, claim_batch_size=500, db_pool_max=4
    )
    async with running_worker(database_url, settings, handler) as worker:
        ring = worker.dispatcher.ring
        rss_before = peak_rss_mib()
        await query(
            database_url,
            "INSERT INTO jobs (instance_id) SELECT 'flood-' || n FROM generate_series(1, %s) n",
            (STORES,),
        )
        # One statement: one notification per store, 20,000 of them in one transaction.
        await query(
            database_url,
            "INSERT INTO job_items (job_id, instance_id, product_id, payload)"
            " SELECT id, instance_id, 'p1', '{\"name\": \"Flood\"}' FROM jobs",
        )
        await wait_until(lambda: worker.listener.notifications >= STORES, deadline=60)
        assert len(ring) <= STORES
        # Every store announced three more times, all at once: nothing new to hold. (One
        # transaction each: Postgres folds identical notifications within a transaction.)
        for _ in range(3):
            await query(
                database_url,
                "SELECT pg_notify('job_items_ready', 'flood-' || n) FROM generate_series(1, %s) n",
                (STORES,),
            )
        await wait_until(lambda: worker.listener.notifications >= 4 * STORES, deadline=60)
        held = len(worker.held)
        assert held <= settings.worker_concurrency
        # Every store with work is in the ring, once: only those just claimed may have left.
        assert STORES - held <= len(ring) <= STORES
        assert ring_entries(ring) <= 2 * len(ring) + 1
        rss_growth = peak_rss_mib() - rss_before
        handler.gate.set()
        # A bound against a hang, not a speed target: generous for a machine shared with others.
        await wait_for_counts(
            database_url, lambda c: c == {"COMPLETED": STORES}, deadline=120, every=1.0
        )
        assert not len(ring) or all(store.startswith("flood-") for store in ring)
    assert len(handler.served) == STORES
    assert set(handler.served.values()) == {1}
    # 20,000 store ids and their items in flight cost a few MiB (100,000: under 30), not one
    # copy per message.
    assert rss_growth < 50, f"peak RSS grew {rss_growth:.0f} MiB"
