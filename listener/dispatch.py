"""The claimer: hands items to workers that are ready to start them, stores in ring order.

A worker asks for an item only once it holds its limiter slot, so the store is chosen at the
last moment: a store that became ready a millisecond ago gets the very next slot. Workers that
ask together are served by one claim statement.
"""

from __future__ import annotations

import heapq
import logging
import random
import re
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import psycopg
from psycopg_pool import AsyncConnectionPool

from listener.announced import retire_drained
from listener.claimed import claim_report, interleave
from listener.complete import Completer
from listener.errors import DatabaseError
from listener.handler import DEFAULT_BUDGET, DEFAULT_KIND
from listener.items import ClaimedItem, ReadyStore, claim, split_quota
from listener.policy import StorePolicies, read_some
from listener.ring import ReadyRing

logger = logging.getLogger(__name__)

# At most this many event-loop turns spent gathering the workers about to ask for an item.
GATHER_TURNS = 32
# Claims on their way at once: while one is in the database, the workers served by the other
# start their items (Python) and come back, so the two overlap instead of taking turns.
CLAIMS_IN_FLIGHT = 2
# A claim announced by another process counts as a sign of life this long: it may have started
# since this process's last heartbeat read the fleet.
OTHERS_HEARD_SECONDS = 15.0
# A turn count in a `stores_served` payload: ASCII digits only (int("²") raises).
_TURNS = re.compile(r"[0-9]{1,9}")
# A store whose retirement found a producer of its lock slot committing is looked at again after
# this long (a commit's time, a few milliseconds, with room to spare).
RETIRE_BUSY_SECONDS = 0.05
# After a retirement the database refused: the stores come back to the ring after this long.
RETIRE_FAILED_SECONDS = 1.0
# A worker on its way passes several turns (its wake-up, the slot gate): one turn without a new
# waiter does not mean nobody is coming.
QUIET_TURNS = 3
# Outcomes waiting for the completer past which no claim goes out: while the completer cannot
# write (a slow or locked database), claiming on at full speed left every claimed item
# PROCESSING, 33,000 of them in one run, each renewed by every heartbeat's one statement, which
# then took seconds and held the very rows the completer waited for. Four of its batches.
OUTCOMES_WAITING_LIMIT = 2_000


@dataclass
class _Waiter:
    event: anyio.Event = field(default_factory=anyio.Event)
    item: ClaimedItem | None = None
    answered: bool = False


class Dispatcher:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        worker_id: str,
        *,
        claim_batch_size: int,
        max_per_instance: int,
        lease_seconds: float,
        max_payload_bytes: int,
        on_claimed: Callable[[list[ClaimedItem]], None],
        on_orphan: Callable[[ClaimedItem], None],
        clock: Callable[[], float] = anyio.current_time,
        announce_claims: bool = False,
        completer: Completer | None = None,
        concurrency: int | None = None,
        kinds: Sequence[str] = (DEFAULT_KIND,),
        lane: str = DEFAULT_BUDGET,
        outcomes_waiting: Callable[[], int] = lambda: 0,
    ) -> None:
        self.pool = pool
        # How many outcomes wait to be written: past OUTCOMES_WAITING_LIMIT the claimer waits
        # for the completer (`outcomes_written` wakes it).
        self.outcomes_waiting = outcomes_waiting
        self.held_for_outcomes = 0  # claims put off for the completer (a figure for tests)
        # The kinds this dispatcher claims (those of one budget), and that budget's name.
        self.kinds = list(kinds)
        self.lane = lane
        self.worker_id = worker_id
        self.claim_batch_size = claim_batch_size
        # One claim serves at most its share of the workers: the other claims in flight serve
        # the rest (with all of them in one claim, nobody would be left to overlap it).
        self.claim_size = min(
            claim_batch_size, -(-(concurrency or claim_batch_size) // CLAIMS_IN_FLIGHT)
        )
        self.max_per_instance = max_per_instance
        self.lease_seconds = lease_seconds
        self.max_payload_bytes = max_payload_bytes
        self.on_claimed = on_claimed
        self.on_orphan = on_orphan
        self.clock = clock
        # Under a budget every claim tells the fleet which stores it served (`stores_served`),
        # so every process's ring goes round in step with the others'; not while this process
        # is alone (each notification costs every listening session a transaction).
        self.announce_claims = announce_claims
        self._others: int | None = None  # other live workers at the last heartbeat; None: unknown
        self._heard_others_until = -float("inf")
        # Under a budget, each claim also writes the outcomes waiting (see complete.py).
        self.completer = completer
        self.policies = StorePolicies()
        self.ring = ReadyRing(weight_of=self.policies.weight)
        # Stores their rpm_limit holds back, and until when (this process's clock): their
        # notifications are ignored until then, and a wake-up brings them back.
        self._held_until: dict[str, float] = {}
        self._changed: set[str] = set()
        self._policy_changed = anyio.Event()
        self._rng = random.Random()
        self.stopping = False
        self.claims = 0
        self.claimed_items = 0
        self._waiters: deque[_Waiter] = deque()
        self._live = 0  # waiters not yet answered: counted, not scanned (64 workers ask often)
        # Idle workers, each asleep on its event, oldest first (see `wait_for_work`).
        self._sleepers: deque[anyio.Event] = deque()
        self._demand = anyio.Event()
        self._wakeups: list[tuple[float, str]] = []
        self._earliest_wakeup: dict[str, float] = {}
        self._wakeup_changed = anyio.Event()
        self._single_claims: list[ClaimedItem] = []
        self._backlogged = False  # the last claim found every store's quota of items
        # Set while no claim is on its way: one sent before `stop()` still returns its items,
        # and they must be handed back (`on_orphan`) before the worker closes its completer.
        self._claim_settled = anyio.Event()
        self._claim_settled.set()
        self._in_flight = 0  # claims on their way
        self._covered = 0  # waiters those claims were sized for
        # Stores notified while claims were on their way, with the notification's number: a
        # claim's snapshot may predate the new item, so a short claim must not drop a store
        # notified after it started (see `_claim_once`).
        self._notifications = 0
        self._notified_at: dict[str, int] = {}
        # Stores claims found drained, to be retired from `announced_stores` (announced.py).
        self._to_retire: set[str] = set()
        self._retire_wanted = anyio.Event()
        self.retirements = 0

    # -- fed by the listener --------------------------------------------------------------

    def notify(self, store: str) -> None:
        if self._held(store):
            return
        if self._in_flight:
            self._notifications += 1
            self._notified_at[store] = self._notifications
        self.ring.notify(store)
        self._wake(1)

    def rebuild(self, policies: Sequence[tuple[object, ...]], stores: list[ReadyStore]) -> None:
        """A scan of the tables: the full policy, and every store with pending items."""
        self.policies.replace_all(policies)
        for store in [s for s in self.ring if self.policies.paused(s)]:
            self.ring.drop(store)
        due: list[str] = []
        for ready in stores:
            if ready.due_in > 0:
                # Only items not due yet that escaped the backoff flag (items in backoff are
                # not in the scan): the store joins when the first is due.
                self._wake_at_most(ready.instance_id, ready.due_in)
            elif not self._held(ready.instance_id):
                due.append(ready.instance_id)
        # The scan returns stores in index order, the same in every process: shuffled, the
        # processes of a fleet start their turns at different stores instead of all taking
        # the same store at once.
        self._rng.shuffle(due)
        self.ring.replace_all(due)
        self._wake(len(self.ring))

    def served_elsewhere(self, payload: str) -> None:
        """`stores_served` from a claim: another process served the store; ours are ignored."""
        parts = payload.split("\x1f")
        if len(parts) != 4 or parts[0] == self.worker_id or not _TURNS.fullmatch(parts[2]):
            return
        # A process that started since our last heartbeat: tell it ours from now on.
        self._heard_others_until = self.clock() + OTHERS_HEARD_SECONDS
        self.ring.advance(parts[1], int(parts[2]))

    def others_alive(self, count: int) -> None:
        """From each heartbeat: how many other worker processes are alive."""
        self._others = count

    def _announcing(self) -> bool:
        if not self.announce_claims:
            return False
        return self._others != 0 or self.clock() < self._heard_others_until

    def store_changed(self, store: str) -> None:
        """`stores_changed`: re-read the store's policy (a task does it, on the pool)."""
        self._changed.add(store)
        self._policy_changed.set()

    def wake_later(self, store: str, delay: float) -> None:
        """Look at `store` again in `delay` seconds: its rpm_limit allows an item then, or the
        scan found its first item due then (dated later by a write that bypassed the backoff
        flag; items in backoff are announced by the promote step when due)."""
        at = self.clock() + delay
        heapq.heappush(self._wakeups, (at, store))
        self._earliest_wakeup[store] = min(at, self._earliest_wakeup.get(store, at))
        self._wakeup_changed.set()

    def _wake_at_most(self, store: str, delay: float) -> None:
        # Each sweep finds the same stores in backoff again: one wake-up each is enough.
        if self._earliest_wakeup.get(store, float("inf")) > self.clock() + delay:
            self.wake_later(store, delay)

    def _held(self, store: str) -> bool:
        """Paused, or its rpm_limit allows nothing before a time still to come."""
        if self.policies.paused(store):
            return True
        until = self._held_until.get(store)
        if until is None:
            return False
        if until <= self.clock():
            del self._held_until[store]
            return False
        return True

    # -- used by workers ------------------------------------------------------------------

    async def wait_for_work(self) -> None:
        """Return when some store may have work, or at `stop()`.

        Idle workers are woken one by one, not all at once: a store's first item wakes one
        worker, and each claim that got all it asked for wakes twice as many more as it got
        items (so a burst is served by 1, 2, 4, ... workers within a few claims). Waking every idle
        worker for one notification cost an idle process a step of each of its workers before
        the claim could go out, then empty claims for the rest.
        """
        while not len(self.ring) and not self.stopping:
            event = anyio.Event()
            self._sleepers.append(event)
            try:
                await event.wait()
            finally:
                if not event.is_set():
                    self._sleepers.remove(event)  # cancelled while asleep

    def _wake(self, count: int) -> None:
        for _ in range(min(count, len(self._sleepers))):
            self._sleepers.popleft().set()

    async def next_item(self) -> ClaimedItem | None:
        """An item for a worker that can start it now; None when there is no work after all."""
        if self.stopping:
            return None
        waiter = _Waiter()
        self._waiters.append(waiter)
        self._live += 1
        self._demand.set()
        try:
            await waiter.event.wait()
        except BaseException:
            # Cancelled while waiting: an item already handed over must not be lost.
            if waiter.item is not None:
                self.on_orphan(waiter.item)
            elif not waiter.answered:
                waiter.answered = True
                self._live -= 1
            raise
        return waiter.item

    def stop(self) -> None:
        self.stopping = True
        self._answer_all()
        self._wake(len(self._sleepers))
        self._demand.set()

    def outcomes_written(self) -> None:
        """The completer wrote a batch: a claim put off for it may go now."""
        self._demand.set()

    async def claims_settled(self) -> None:
        """Return once no claim is on its way (after `stop()`, none starts again)."""
        await self._claim_settled.wait()

    # -- tasks ----------------------------------------------------------------------------

    async def run_claimer(self) -> None:
        """Claim for the waiting workers, up to CLAIMS_IN_FLIGHT claims at once: while one is
        on its way, the workers of the other start their items and come back for the next."""
        async with anyio.create_task_group() as claims:
            while True:
                await self._demand.wait()
                self._demand = anyio.Event()
                while self._live_waiters() > self._covered:
                    if self.stopping or not len(self.ring):
                        if not self._in_flight:
                            self._answer_all()
                        break  # else the claim on its way answers them, or wakes this loop
                    if self._in_flight == CLAIMS_IN_FLIGHT:
                        break  # the next claim back wakes this loop
                    if self.outcomes_waiting() >= OUTCOMES_WAITING_LIMIT:
                        self.held_for_outcomes += 1
                        break  # the completer's next write wakes this loop
                    if self._backlogged:
                        await self._gather_waiters()
                    wanted = min(self._live_waiters() - self._covered, self.claim_size)
                    if wanted <= 0:
                        break
                    self._in_flight += 1
                    self._covered += wanted
                    self._claim_settled = anyio.Event()
                    claims.start_soon(self._claim_for, wanted, self._notifications)

    async def _claim_for(self, wanted: int, since: int) -> None:
        try:
            await self._claim_once(wanted, since)
        finally:
            self._in_flight -= 1
            self._covered -= wanted
            if not self._in_flight:
                self._notified_at.clear()
                self._claim_settled.set()
            self._demand.set()

    async def run_wakeups(self) -> None:
        while True:
            if not self._wakeups:
                await self._wakeup_changed.wait()
            else:
                with anyio.move_on_after(max(0.0, self._wakeups[0][0] - self.clock())):
                    await self._wakeup_changed.wait()
            self._wakeup_changed = anyio.Event()
            now = self.clock()
            while self._wakeups and self._wakeups[0][0] <= now:
                at, store = heapq.heappop(self._wakeups)
                if self._earliest_wakeup.get(store) == at:
                    del self._earliest_wakeup[store]
                self.notify(store)

    async def run_policy_reload(self) -> None:
        """Apply `stores_changed` notifications: re-read those rows, then look at the stores
        again (a resumed store, a raised cap: in the ring within milliseconds)."""
        while True:
            await self._policy_changed.wait()
            self._policy_changed = anyio.Event()
            stores, self._changed = sorted(self._changed), set()
            try:
                async with self.pool.connection() as conn:
                    rows = await read_some(conn, stores)
            except (DatabaseError, psycopg.Error) as error:
                logger.warning("[Worker] reading changed store policies failed: %s", error)
                self._changed.update(stores)
                await anyio.sleep(1.0)
                self._policy_changed.set()
                continue
            self.policies.update(rows, stores)
            for store in stores:
                self._held_until.pop(store, None)
                if self.policies.paused(store):
                    self.ring.drop(store)
                else:
                    self.notify(store)

    async def run_retirer(self) -> None:
        """Retire the stores claims found drained, a batch a round trip, off the claim's path:
        until it is done a store stays announced and silent, and the retirement itself tells
        which stores have items after all (their producers saw the row and sent nothing)."""
        while True:
            await self._retire_wanted.wait()
            self._retire_wanted = anyio.Event()
            stores, self._to_retire = sorted(self._to_retire), set()
            try:
                done = await retire_drained(self.pool, stores, self.kinds)
            except DatabaseError as error:
                logger.warning("[Worker] retiring drained stores failed: %s", error)
                for store in stores:
                    self.wake_later(store, RETIRE_FAILED_SECONDS)
                continue
            self.retirements += len(done.retired)
            for store in done.pending:
                self.notify(store)
            for store in done.busy:
                self.wake_later(store, RETIRE_BUSY_SECONDS)

    async def run_claim_log(self, interval: float = 10.0) -> None:
        """Single-item claims (the paced, rate-limited regime) are reported as a summary."""
        while True:
            await anyio.sleep(interval)
            if self._single_claims:
                for line in claim_report(self._single_claims, f" (last {interval:.0f}s)"):
                    logger.info("%s", line)
                self._single_claims = []

    # -- internals ------------------------------------------------------------------------

    async def _gather_waiters(self) -> None:
        """Let workers a few steps from asking (just done with an item, passing the slot gate)
        join this claim: one statement then serves them all instead of a few each. Stops after
        QUIET_TURNS turns of the event loop that bring nobody new, so a lone waiter (a paced
        worker) pays a few turns, microseconds. Only while the last claim got every quota it
        asked: after a short one (an idle process woken by a notification), the first waiter's
        item must not wait for every idle worker to pass the slot gate."""
        seen, quiet = self._live_waiters(), 0
        for _ in range(GATHER_TURNS):
            await anyio.lowlevel.checkpoint()
            now = self._live_waiters()
            quiet = quiet + 1 if now == seen else 0
            if quiet == QUIET_TURNS or now - self._covered >= self.claim_size:
                return
            seen = now

    def _live_waiters(self) -> int:
        while self._waiters and self._waiters[0].answered:
            self._waiters.popleft()
        return self._live

    def _answer_all(self) -> None:
        while self._waiters:
            self._answer(self._waiters.popleft(), None)

    def _answer(self, waiter: _Waiter, item: ClaimedItem | None) -> None:
        if waiter.answered:
            if item is not None:
                self.on_orphan(item)
            return
        waiter.answered = True
        self._live -= 1
        waiter.item = item
        waiter.event.set()

    async def _claim_once(self, wanted: int, since: int) -> None:
        """Claim `wanted` items; `since`: the notifications counted when it set out."""
        stores = self.ring.take(min(wanted, len(self.ring)))
        quotas = split_quota(stores, wanted, self.max_per_instance)
        # When a claim wants more items than the ring has stores, the ring hands out all of
        # them in the same order each time, and the first would always get the extra items:
        # the extras move one store on with every claim.
        if quotas:
            shift = self.claims % len(quotas)
            quotas = quotas[len(quotas) - shift :] + quotas[: len(quotas) - shift]
        outcomes = self.completer.take() if self.completer is not None else []
        try:
            result = await claim(
                self.pool,
                self.worker_id,
                stores,
                quotas,
                self.lease_seconds,
                self.max_payload_bytes,
                self._announcing(),
                outcomes,
                kinds=self.kinds,
                lane=self.lane,
            )
        except BaseException as error:
            if self.completer is not None and outcomes:
                self.completer.give_back(outcomes)  # the completer writes them alone
            if not isinstance(error, DatabaseError):
                raise
            logger.warning("[Worker] claim failed, retrying: %s", error)
            self._answer_all()  # their limiter slots are lost; no item is
            await anyio.sleep(1.0)
            return
        if self.completer is not None and outcomes:
            self.completer.written(outcomes, result.written, result.deferred)
        items = result.items
        for held in result.held_back:
            if held.retry_in is not None:
                # Over its rpm_limit: out of the ring until the limit allows its next item.
                self._held_until[held.instance_id] = self.clock() + held.retry_in
                self.wake_later(held.instance_id, held.retry_in)
        self._backlogged = bool(items) and len(items) == sum(quotas)
        got = Counter(item.instance_id for item in items)
        held_back = {held.instance_id for held in result.held_back}
        for store, quota in zip(stores, quotas, strict=True):
            # Weights share items, not turns: the turn pays for each item it brought (none: the
            # turn is given back, a refusal is not service).
            self.ring.charge(store, got[store])
            if got[store] < quota and (
                self._notified_at.get(store, 0) <= since or self._held(store)
            ):
                self.ring.drop(store)
                if store not in held_back:
                    # Drained: retired, so its next insert notifies again. (A store its policy
                    # held back has items: a resume or room under its cap notifies it.)
                    self._to_retire.add(store)
        if self._to_retire:
            self._retire_wanted.set()
        self.claims += 1
        self.claimed_items += len(items)
        if items:
            self.on_claimed(items)
            if len(items) > 1:
                for line in claim_report(items):
                    logger.info("%s", line)
            else:
                self._single_claims.extend(items)
        for item in interleave(items):
            if self._live_waiters():
                self._answer(self._waiters.popleft(), item)
            else:
                self.on_orphan(item)
        if len(self.ring):
            # A claim that got every quota it asked for found more work than workers: twice as
            # many join the next one (1, 2, 4, ... within a few claims). Otherwise one more looks.
            self._wake(2 * len(items) if self._backlogged else 1)
