"""The completer: the one writer of item outcomes, in batches.

Workers hand their outcome over and move on; whatever has piled up while the previous batch was
being written goes out in the next statement, so a busy process writes many items per round
trip and a quiet one writes each at once.

Under a budget (`hold_seconds` > 0) items start one at a time, a slot apart, and each would cost
its own round trip and commit: the outcomes wait up to `hold_seconds` for the next claim, which
writes them in its own transaction (`take`, then `written` or `give_back`), and are written alone
only when no claim comes.

An outcome PostgreSQL refuses to store (`OutcomeRefused`: its data, not the database's state)
would fail its batch at every retry, and every later outcome behind it: the batch is split in
halves until the one at fault is alone, every other outcome is written, and that item ends
FAILED with the reason. Outcomes a claim could not write go back to this completer alone.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from functools import partial
from typing import TypeVar

import anyio
from psycopg_pool import AsyncConnectionPool

from listener import items as items_db
from listener.backoff import Backoff
from listener.errors import DatabaseError, OutcomeRefused
from listener.items import Outcome

logger = logging.getLogger(__name__)

MAX_BATCH = 500

T = TypeVar("T")


class Completer:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        worker_id: str,
        on_written: Callable[[list[Outcome], list[Outcome]], None],
        rng: random.Random,
        hold_seconds: float = 0.0,
        still_held: Callable[[list[Outcome]], set[int]] = lambda _batch: set(),
    ) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.on_written = on_written
        self.hold_seconds = hold_seconds
        # The jobs of a batch this worker still holds other items of: their items are open, so
        # the batch need not ask whether they are finished (the batch that writes the last one
        # of them asks). Only where this completer is the worker's one writer of outcomes.
        self.still_held = still_held
        self.backoff = Backoff(base=0.2, cap=10.0, rng=rng)
        self._queue: deque[Outcome] = deque()
        # Given back by a claim: written here, at once, and never handed to a claim again (one
        # PostgreSQL refuses would fail each claim that took it, and lose its limiter slots).
        self._returned: deque[Outcome] = deque()
        self._arrived = anyio.Event()
        self._taken = anyio.Event()
        self._closed = False
        self._give_up_at = math.inf
        self.batches_written = 0  # by this completer itself
        self.outcomes_taken = 0  # by claims, to write in their transactions

    def emit(self, outcome: Outcome) -> None:
        """Never blocks: a worker finishing its item must not wait on the database."""
        if self._closed:
            # Only past `close` (a claim that outlived its give-up): like the outcomes given up
            # on there, this item is left to its lease, and the worker still exits cleanly.
            logger.error(
                "[Worker] item %d came back after the outcomes were closed; its lease will "
                "expire and the item will be tried again",
                outcome.item_id,
            )
            return
        self._queue.append(outcome)
        self._arrived.set()

    def waiting(self) -> int:
        """Outcomes handed over and not yet being written."""
        return len(self._queue) + len(self._returned)

    def take(self) -> list[Outcome]:
        """The outcomes waiting, for a claim to write in its transaction; the claimer then calls
        `written` (it committed) or `give_back` (it failed). Nothing once closed: the last
        outcomes are written here."""
        if self._closed or not self._queue:
            return []
        batch = self._pop()
        self.outcomes_taken += len(batch)
        self._taken.set()
        return batch

    def written(
        self,
        batch: list[Outcome],
        written: Iterable[int] | None,
        deferred: Iterable[int] = (),
    ) -> None:
        """A batch is committed; `written`: the ids it wrote; `deferred`: the ids a claim left
        alone because another transaction (a cancel) held their job, written here instead; the
        others had lost their lease. None: a claim's transaction refused them and committed
        without them (`items.claim`): they are all written here instead."""
        if written is None:
            self.give_back(batch)
            return
        ids, later = set(written), set(deferred)
        if later:
            self.give_back([outcome for outcome in batch if outcome.item_id in later])
        superseded = [o for o in batch if o.item_id not in ids and o.item_id not in later]
        if superseded:
            logger.warning(
                "[Worker] %d outcome(s) not written: their leases had expired and the items "
                "were taken back (this worker was frozen or cut off for too long)",
                len(superseded),
            )
        self.on_written([o for o in batch if o.item_id in ids], superseded)

    def give_back(self, batch: list[Outcome]) -> None:
        """A claim could not write the batch it took: it is written here instead."""
        self._returned.extend(batch)
        self._arrived.set()
        self._taken.set()

    def close(self, give_up_after: float) -> None:
        """No more outcomes: `run` writes what is left, then returns.

        If the database stays unreachable for `give_up_after` seconds, the rest is left to the
        leases: the process must exit (the platform kills it soon after SIGTERM anyway), and the
        reaper returns those items to PENDING once their leases expire.
        """
        self._give_up_at = anyio.current_time() + give_up_after
        self._closed = True
        self._arrived.set()
        self._taken.set()

    async def run(self, done: anyio.Event) -> None:
        # Shielded: outcomes are written even while the process is being cancelled.
        with anyio.CancelScope(shield=True):
            while self._queue or self._returned or not self._closed:
                if self._returned:
                    await self._write(self._pop(self._returned))
                    continue
                if not self._queue:
                    self._arrived = anyio.Event()
                    await self._arrived.wait()
                    continue
                if self.hold_seconds and not self._closed:
                    self._taken = anyio.Event()
                    with anyio.move_on_after(self.hold_seconds):
                        await self._taken.wait()
                    if self._returned or not self._queue:
                        continue  # a claim gave some back, or took them
                await self._write(self._pop())
        done.set()

    def _pop(self, queue: deque[Outcome] | None = None) -> list[Outcome]:
        queue = self._queue if queue is None else queue
        count = min(len(queue), MAX_BATCH)
        return [queue.popleft() for _ in range(count)]

    async def _write(self, batch: list[Outcome]) -> None:
        # Until the database takes them: the items stay PROCESSING (leased) meanwhile, and an
        # outcome lands only while this worker still holds its item. The jobs these outcomes
        # finish end in the same transaction. A refused batch is split in halves (a stack, first
        # half first): one outcome at fault among n costs about 2 log2(n) statements more.
        parts = [batch]
        while parts:
            part = parts.pop()
            try:
                written = await self._retrying(
                    partial(self._finish, part),
                    f"{len(part)} outcome(s)",
                    "their leases will expire and the items will be tried again",
                )
            except OutcomeRefused as error:
                if len(part) > 1:
                    logger.debug("%s; splitting %d outcome(s)", error, len(part))
                    middle = len(part) // 2
                    parts += [part[middle:], part[:middle]]
                else:
                    await self._fail_unstorable(part[0], error)
                continue
            if written is not None:
                logger.debug("completer wrote %d outcome(s) alone", len(part))
                self.batches_written += 1
                self.written(part, written)

    async def _finish(self, batch: list[Outcome]) -> set[int]:
        # Asked at each attempt: a retry comes later, when this worker may hold other items.
        return await items_db.finish(self.pool, self.worker_id, batch, self.still_held(batch))

    async def _fail_unstorable(self, outcome: Outcome, error: OutcomeRefused) -> None:
        """The one outcome of a refused batch: its item ends FAILED, saying why."""
        failure = replace(
            outcome,
            status="FAILED",
            result=None,
            error=f"the {outcome.status} outcome could not be stored: {error.reason}",
            delay=0.0,
            refund=False,
        )
        logger.warning(
            "[Worker] item %d: PostgreSQL refused its outcome (%s); it ends FAILED",
            outcome.item_id,
            error.reason,
        )
        try:
            written = await self._retrying(
                partial(self._finish, [failure]),
                "1 outcome",
                "its lease will expire and the item will be tried again",
            )
        except OutcomeRefused as again:
            # Not even its failure can be stored (a constraint of the deployment's own?): the
            # item is let go, its lease expires, and the reaper ends it after MAX_ATTEMPTS.
            logger.error(
                "[Worker] item %d: its failure was refused too (%s); its lease will expire",
                outcome.item_id,
                again.reason,
            )
            self.written([failure], [])
            return
        if written is not None:
            self.batches_written += 1
            self.written([failure], written)

    async def _retrying(
        self, write: Callable[[], Awaitable[T]], what: str, otherwise: str
    ) -> T | None:
        while True:
            try:
                done = await write()
                break
            except DatabaseError as error:
                if isinstance(error, OutcomeRefused):
                    raise  # the same batch would be refused again: the caller splits it
                if anyio.current_time() >= self._give_up_at:
                    logger.error(
                        "[Worker] giving up on writing %s at exit (%s); %s", what, error, otherwise
                    )
                    return None
                delay = self.backoff.next()
                logger.warning(
                    "[Worker] writing %s failed, retrying in %.1fs: %s", what, delay, error
                )
                await anyio.sleep(delay)
        self.backoff.reset()
        return done
