"""Collect due batch-tier items into batches of ours: one kind (so one model) a batch, stores
taken round robin with at most BATCH_MAX_PER_STORE items of one store in a file, so one store's
100,000-product import cannot fill it while another store's 500 wait.

The items are taken (PROCESSING, `claimed_by = 'batch:<id>'`, no lease) in the transaction that
creates our batch row: a crash before its commit leaves them PENDING, after it leaves a batch
that the next step uploads. Nothing else is kept: the input file is built again from the items.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from listener.batches.store import Connection, collect, due_by_store

logger = logging.getLogger("listener.batches")


def fair_shares(due: Sequence[int], total: int, cap: int) -> list[int]:
    """Max-min fair shares of `total` between stores that have `due` items each, at most `cap`
    each: every store gets as many as the smallest of them wants, then the rest is shared
    among the others alike (round robin, one item per store per turn)."""
    shares = [0] * len(due)
    wants = [min(d, cap) for d in due]
    left = total
    open_ = [i for i, want in enumerate(wants) if want > 0]
    while left > 0 and open_:
        turn = max(1, left // len(open_))
        for i in list(open_):
            give = min(turn, wants[i] - shares[i], left)
            shares[i] += give
            left -= give
            if shares[i] >= wants[i]:
                open_.remove(i)
            if left == 0:
                break
    return shares


async def collect_kind(
    conn: Connection, kind: str, model: str, max_requests: int, max_per_store: int
) -> tuple[int, int] | None:
    """One new batch of `kind`'s due items: (our batch id, items), or None when none is due."""
    due = await due_by_store(conn, kind, max_per_store)
    if not due:
        return None
    shares = fair_shares([count for _store, count in due], max_requests, max_per_store)
    stores = [store for (store, _count), share in zip(due, shares, strict=True) if share]
    limits = [share for share in shares if share]
    taken = await collect(conn, kind, model, stores, limits)
    if taken is not None:
        logger.info(
            "[Batch] collected %d %s item(s) from %d store(s) into batch %d",
            taken[1],
            kind,
            len(stores),
            taken[0],
        )
    return taken
