"""The completer: the one writer of item outcomes, in batches.

Workers hand their outcome over and move on; whatever has piled up while the previous batch was
being written goes out in the next statement, so a busy process writes many items per round
trip and a quiet one writes each at once.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from psycopg_pool import AsyncConnectionPool

from listener import items as items_db
from listener.backoff import Backoff
from listener.errors import DatabaseError
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
    ) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.on_written = on_written
        self.backoff = Backoff(base=0.2, cap=10.0, rng=rng)
        self._send, self._receive = anyio.create_memory_object_stream[Outcome](math.inf)
        self._give_up_at = math.inf

    def emit(self, outcome: Outcome) -> None:
        """Never blocks: a worker finishing its item must not wait on the database."""
        try:
            self._send.send_nowait(outcome)
        except anyio.ClosedResourceError:
            # Only past `close`'s give-up (a claim that outlived it): like the outcomes given
            # up on there, this item is left to its lease, and the worker still exits cleanly.
            logger.error(
                "[Worker] item %d came back after the outcomes were closed; its lease will "
                "expire and the item will be tried again",
                outcome.item_id,
            )

    def close(self, give_up_after: float) -> None:
        """No more outcomes: `run` writes what is left, then returns.

        If the database stays unreachable for `give_up_after` seconds, the rest is left to the
        leases: the process must exit (the platform kills it soon after SIGTERM anyway), and the
        reaper returns those items to PENDING once their leases expire.
        """
        self._give_up_at = anyio.current_time() + give_up_after
        self._send.close()

    async def run(self, done: anyio.Event) -> None:
        # Shielded: outcomes are written even while the process is being cancelled.
        with anyio.CancelScope(shield=True):
            async with self._receive:
                async for first in self._receive:
                    batch = [first]
                    while len(batch) < MAX_BATCH:
                        try:
                            batch.append(self._receive.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    await self._write(batch)
        done.set()

    async def _write(self, batch: list[Outcome]) -> None:
        # Until the database takes them: the items stay PROCESSING (leased) meanwhile, and an
        # outcome lands only while this worker still holds its item. The jobs these outcomes
        # finish end in the same transaction.
        written = await self._retrying(
            lambda: items_db.finish(self.pool, self.worker_id, batch),
            f"{len(batch)} outcome(s)",
            "their leases will expire and the items will be tried again",
        )
        if written is None:
            return
        superseded = [outcome for outcome in batch if outcome.item_id not in written]
        if superseded:
            logger.warning(
                "[Worker] %d outcome(s) not written: their leases had expired and the items "
                "were taken back (this worker was frozen or cut off for too long)",
                len(superseded),
            )
        self.on_written([o for o in batch if o.item_id in written], superseded)

    async def _retrying(
        self, write: Callable[[], Awaitable[T]], what: str, otherwise: str
    ) -> T | None:
        while True:
            try:
                done = await write()
                break
            except DatabaseError as error:
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
