"""One worker process: listener, claimer, workers, completer, leases, reaper, stats, in one
anyio task group.

A worker's cycle: wait until some store has work, take a limiter slot, then an item, then call
the handler. Outcomes go to the completer, which writes them in batches.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskStatus
from psycopg_pool import AsyncConnectionPool

from listener import heartbeat, reaper, retention, usage
from listener import items as items_db
from listener.attempt import attempt
from listener.backoff import Backoff
from listener.complete import Completer
from listener.db import log_pool_stats, pool_stats, with_session_options
from listener.dispatch import Dispatcher
from listener.errors import ConfigurationError, DatabaseError, StopWorker
from listener.handler import DEFAULT_KIND, App, Kind
from listener.items import ClaimedItem, Outcome, ReadyStore
from listener.lanes import Lane, budget_groups, budget_rpm, lane_kinds
from listener.limiter import Limiter, gcra
from listener.listen import Listener
from listener.promoter import Promoter
from listener.registry import register_kinds
from listener.settings import Settings
from listener.throughput import Throughput
from listener.workerstats import WorkerStats

logger = logging.getLogger(__name__)

# Workers that may wait for a limiter slot at once: enough to hold the budget's slots of the next
# SLOT_HORIZON seconds (WORKER_CONCURRENCY permitting), never fewer than SLOT_SEEKERS. At 450 RPM
# slots are 133 ms apart and two seekers keep the budget busy. At 30,000 RPM they are 2 ms apart
# and two seekers, each paying a reservation and a claim before it seeks again, cannot follow;
# 25 can, and share the round trips: one reservation statement for the seekers queued together,
# one claim for those whose slots fall in one tick of the limiter (see limiter/queue.py). Every
# idle worker reserving a slot would spend the budget ahead on work that may not exist, and a
# store arriving after the work ran out would wait behind those slots: the horizon bounds that
# to 50 ms of the budget per process.
SLOT_SEEKERS = 2
SLOT_HORIZON = 0.05
# Under a budget an outcome waits this long at most for the next claim to write it in its own
# round trip and commit (at 450 RPM a process claims every 133 ms while it has work).
OUTCOME_HOLD_SECONDS = 0.25


def slot_seekers(rpm: int, concurrency: int) -> int:
    """How many of a process's `concurrency` workers may wait for a slot of `rpm` at once."""
    horizon = gcra.slots_within(rpm, gcra.to_micros(SLOT_HORIZON))
    return max(SLOT_SEEKERS, min(concurrency, horizon))


def binding_rpm(rpm: int, tpm: int, estimated_tokens: int) -> int:
    """The requests a minute the budget allows: RATE_LIMIT_RPM, or what RATE_LIMIT_TPM allows
    at each request's token estimate, whichever is lower (0: no budget). A token budget alone
    spaces slots too, and its seekers must follow them."""
    rates = [rpm] if rpm else []
    if tpm:
        rates.append(max(1, tpm // max(1, estimated_tokens)))
    return min(rates, default=0)


# Retention runs every few minutes (a few thousand rows each time at 450 items a minute), the
# first time soon after start; the advisory lock keeps it to one process of the fleet.
RETENTION_INTERVAL = 300.0
RETENTION_FIRST_DELAY = (5.0, 60.0)


@dataclass
class Counters:
    completed: int = 0
    failed: int = 0
    retried: int = 0
    released: int = 0
    rate_limited: int = 0
    reaped: int = 0
    superseded: int = 0  # outcomes refused: the lease had expired and the item was taken back


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    def __init__(
        self,
        settings: Settings,
        conninfo: str,
        pool: AsyncConnectionPool,
        limiters: Mapping[str, Limiter],
        app: App,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.app = app
        app.check_budgets()
        self.worker_id = worker_id or new_worker_id()
        self.counters = Counters()
        # Finished items by minute and store, for the dashboard's chart and per-store figures.
        self.throughput = Throughput()
        self.fatal: StopWorker | None = None
        # Claimed items not yet written back, and those whose handler is running now, keyed by
        # (item id, attempt): a claim of an item this worker claimed before (its lease expired
        # while it was frozen) is another entry, which the old claim's end does not remove.
        self.held: dict[tuple[int, int], str] = {}
        # Items held per job: a batch of outcomes need not ask whether a job is finished while
        # this worker holds another of its items (see `_jobs_still_held`).
        self._held_per_job: Counter[int] = Counter()
        self.running: dict[tuple[int, int], str] = {}
        # The last heartbeat that renewed the leases and wrote the row (time.monotonic()), and
        # the live workers it counted: what /health answers from, without a query of its own.
        self.last_beat: float | None = None
        self.live_workers = 0
        self._rng = random.Random()
        self._stopping = False
        self._idle_scopes: set[anyio.CancelScope] = set()
        self._backoff = Backoff(base=0.2, cap=10.0, rng=self._rng)
        self._workers_scope: anyio.CancelScope | None = None
        # The start-up (LISTEN, the ring, the first count): a `stop()` that comes meanwhile ends it.
        self._startup = anyio.CancelScope()
        self._services: anyio.abc.TaskGroup | None = None
        groups = budget_groups(app)
        if not groups:
            raise ConfigurationError("the worker serves no kind (WORKER_KINDS, --app)")
        budgeted = any(budget_rpm(name, settings, app) != (0, 0) for name, _ in groups)
        self.completer = Completer(
            pool,
            self.worker_id,
            self._on_written,
            self._rng,
            hold_seconds=OUTCOME_HOLD_SECONDS if budgeted else 0.0,
            # Under a budget claims write outcomes too, concurrently with the completer: a job
            # skipped by one writer because the other held its last item could then be skipped
            # by both. Without a budget the completer is the one writer.
            still_held=(lambda _batch: set()) if budgeted else self._jobs_still_held,
        )
        self.lanes = [self._lane(name, kinds, limiters[name]) for name, kinds in groups]
        self._lane_of = lane_kinds(self.lanes)
        self._lane_named = {lane.name: lane for lane in self.lanes}
        # With more than one lane, each has WORKER_CONCURRENCY workers, and this keeps the
        # process's items in flight to WORKER_CONCURRENCY in all.
        self._capacity = (
            anyio.Semaphore(settings.worker_concurrency, fast_acquire=True)
            if len(self.lanes) > 1
            else None
        )
        # Items waiting out a backoff are out of the claim's range: this puts them back when
        # due, and their stores' notification wakes the claimers of every process.
        self.promoter = Promoter(pool, idle_seconds=settings.sweep_interval_seconds)
        self.listener = Listener(
            with_session_options(conninfo, settings),
            on_notify=self._notified,
            on_rebuild=self._rebuilt,
            sweep_interval=settings.sweep_interval_seconds,
            on_store_changed=self._store_changed,
            on_served=self._served_elsewhere,
            kind_sets=[list(lane.kinds) for lane in self.lanes],
        )

    def _lane(self, name: str, kinds: list[Kind], limiter: Limiter) -> Lane:
        settings = self.settings
        estimate = max(kind.estimate for kind in kinds)
        rpm_setting, tpm_setting = budget_rpm(name, settings, self.app)
        rpm = binding_rpm(rpm_setting, tpm_setting, estimate)
        budgeted = rpm > 0
        # Without a budget there is no slot to wait for and no gate: every worker passes at
        # once (a gate of WORKER_CONCURRENCY permits for as many workers cost each item a
        # cancellation checkpoint, 5 % of a process's CPU at full speed). Passing the gate
        # without a wait costs no turn of the event loop (fast_acquire): an idle worker woken
        # for a new item goes straight to the claim.
        slot_gate = (
            anyio.Semaphore(slot_seekers(rpm, settings.worker_concurrency), fast_acquire=True)
            if budgeted
            else None
        )
        dispatcher = Dispatcher(
            self.pool,
            self.worker_id,
            claim_batch_size=settings.claim_batch_size,
            max_per_instance=settings.max_per_instance,
            lease_seconds=settings.lease_seconds,
            max_payload_bytes=settings.max_payload_bytes,
            on_claimed=self._on_claimed,
            on_orphan=lambda item: self._emit(Outcome.release(item)),
            announce_claims=budgeted,
            completer=self.completer if budgeted else None,
            concurrency=settings.worker_concurrency,
            kinds=sorted(kind.name for kind in kinds),
            lane=name,
            outcomes_waiting=self.completer.waiting,
        )
        return Lane(
            name, {kind.name: kind for kind in kinds}, limiter, estimate, rpm, dispatcher, slot_gate
        )

    @property
    def dispatcher(self) -> Dispatcher:
        """The first lane's (the default budget's, when the worker serves one of its kinds)."""
        return self.lanes[0].dispatcher

    @property
    def limiter(self) -> Limiter:
        return self.lanes[0].limiter

    @property
    def kinds(self) -> list[str]:
        return sorted(self._lane_of)

    # -- fed by the listener --------------------------------------------------------------

    def _notified(self, payload: str) -> None:
        store, _, kind = payload.partition("\x1f")
        lane = self._lane_of.get(kind or DEFAULT_KIND)
        if lane is not None:  # a kind this process does not serve: others will
            lane.dispatcher.notify(store)

    def _rebuilt(
        self, policies: Sequence[tuple[object, ...]], stores: list[list[ReadyStore]]
    ) -> None:
        for lane, ready in zip(self.lanes, stores, strict=True):
            lane.dispatcher.rebuild(policies, ready)

    def _store_changed(self, store: str) -> None:
        for lane in self.lanes:
            lane.dispatcher.store_changed(store)

    def _served_elsewhere(self, payload: str) -> None:
        lane = self._lane_named.get(payload.rpartition("\x1f")[2])
        if lane is not None:
            lane.dispatcher.served_elsewhere(payload)

    def _others_alive(self, count: int) -> None:
        for lane in self.lanes:
            lane.dispatcher.others_alive(count)

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until `stop()`; ready (LISTEN and ring built) when `task_status` is reported.

        Whatever ends it (`stop()` during the start-up too, an error, a cancellation), the
        claimer finishes its claim first, then the completer writes every outcome it was given
        and closes: nothing it was handed is left PROCESSING, and `run` always returns.
        """
        logger.info("[Worker] Starting background job worker...")
        async with anyio.create_task_group() as services:
            self._services = services
            completer_done = anyio.Event()
            # Started first and closed in the `finally` below, whatever happens in between: the
            # completer is shielded, so a task group waiting on it would otherwise never end.
            services.start_soon(self.completer.run, completer_done)
            try:
                with self._startup:
                    await services.start(self.listener.run)
                    for lane in self.lanes:
                        services.start_soon(lane.dispatcher.run_claimer)
                        services.start_soon(lane.dispatcher.run_wakeups)
                        services.start_soon(lane.dispatcher.run_policy_reload)
                        services.start_soon(lane.dispatcher.run_claim_log)
                        services.start_soon(lane.dispatcher.run_retirer)
                    services.start_soon(self._heartbeat_loop)
                    services.start_soon(self.promoter.run)
                    services.start_soon(
                        reaper.run_reaper,
                        self.pool,
                        self.settings.lease_seconds,
                        self.settings.max_attempts,
                        self._on_reaped,
                    )
                    services.start_soon(
                        log_pool_stats, self.pool, self.settings.pool_stats_interval_seconds
                    )
                    if self.settings.retention_days:
                        services.start_soon(
                            retention.run_retention,
                            self.pool.connection,
                            self.settings.retention_days,
                            RETENTION_INTERVAL,
                            # Processes of a fleet started together do not all try at once.
                            self._rng.uniform(*RETENTION_FIRST_DELAY),
                        )
                    services.start_soon(
                        usage.run_compactor,
                        self.pool.connection,
                        usage.COMPACT_INTERVAL,
                        self._rng.uniform(*RETENTION_FIRST_DELAY),
                    )
                    await self._log_pending()
                    await self._register_kinds()
                    for service in self.app.services:
                        services.start_soon(service, self.pool, self.app)
                if not self._stopping:
                    task_status.started()
                    async with anyio.create_task_group() as workers:
                        self._workers_scope = workers.cancel_scope
                        for lane in self.lanes:
                            for _ in range(self.settings.worker_concurrency):
                                workers.start_soon(self._work_loop, lane)
            finally:
                # Every worker has stopped (or `run` itself is failing or being cancelled). A
                # claim still on its way hands its items back through the completer, so the
                # completer stays open until the claimer is done; then it writes what is left.
                give_up_after = max(5.0, self.settings.shutdown_grace_seconds)
                for lane in self.lanes:
                    lane.dispatcher.stop()
                with anyio.CancelScope(shield=True), anyio.move_on_after(give_up_after):
                    for lane in self.lanes:
                        await lane.dispatcher.claims_settled()
                self.completer.close(give_up_after=give_up_after)
            await completer_done.wait()
            await heartbeat.forget(self.pool, self.worker_id)
            services.cancel_scope.cancel()
        logger.info(
            "[Worker] stopped: %d completed, %d failed, %d retried, %d released, %d superseded",
            self.counters.completed,
            self.counters.failed,
            self.counters.retried,
            self.counters.released,
            self.counters.superseded,
        )

    async def _log_pending(self) -> None:
        # The checklist's start-up line, nothing more: the ring is built already, so a database
        # that fails this one count (a failover under way) must not keep the worker from working.
        try:
            pending = await items_db.count_pending(self.pool)
        except DatabaseError as error:
            logger.warning("[Worker] could not count the pending items at start: %s", error)
            return
        logger.info("[Worker] ✅ Initialized with %d pending item(s)", pending)

    async def _register_kinds(self) -> None:
        # What producers may enqueue. A database that refuses it now must not keep the worker
        # from working: the next start registers them.
        try:
            await register_kinds(self.pool, self.app, self.settings.auto_rule)
        except DatabaseError as error:
            logger.warning("[Worker] could not register the kinds it serves: %s", error)
            return
        logger.info("[Worker] serving kind(s): %s", ", ".join(self.kinds))

    def stop(self, grace: float | None = None) -> None:
        """Stop claiming; in-flight items get `grace` seconds, then go back to PENDING."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        logger.info(
            "[Worker] stopping: no new claims; %d item(s) in flight get %.0fs to finish",
            len(self.running),
            grace,
        )
        for lane in self.lanes:
            lane.dispatcher.stop()
        self._startup.cancel()
        for scope in list(self._idle_scopes):
            scope.cancel()
        if self._services is not None:
            self._services.start_soon(self._cancel_workers_after, grace)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def cancel_in_flight(self) -> None:
        """Give up on the grace period: in-flight items go back to PENDING now."""
        if self._workers_scope is not None:
            self._workers_scope.cancel()

    async def _cancel_workers_after(self, grace: float) -> None:
        await anyio.sleep(grace)
        if self._workers_scope is not None and not self._workers_scope.cancel_called:
            logger.warning(
                "[Worker] grace period over: returning %d item(s) to PENDING", len(self.running)
            )
            self._workers_scope.cancel()

    # -- the work loop --------------------------------------------------------------------

    async def _work_loop(self, lane: Lane) -> None:
        dispatcher, gate = lane.dispatcher, lane.slot_gate
        while not self._stopping:
            item: ClaimedItem | None = None
            with anyio.CancelScope() as idle:
                self._idle_scopes.add(idle)
                try:
                    await dispatcher.wait_for_work()
                    if self._stopping:
                        break
                    if self._capacity is not None:
                        await self._capacity.acquire()
                    try:
                        if gate is not None:
                            await gate.acquire()
                        try:
                            if not len(dispatcher.ring):
                                continue  # the work went to others while this worker queued
                            try:
                                grant = await lane.limiter.acquire(lane.estimate)
                            except DatabaseError as error:
                                # The shared limiter lives in the database: no slot, no request.
                                logger.warning("[Worker] no limiter slot, retrying: %s", error)
                                await anyio.sleep(self._backoff.next())
                                continue
                        finally:
                            if gate is not None:
                                gate.release()
                        self._backoff.reset()
                        item = await dispatcher.next_item()
                    finally:
                        if item is None and self._capacity is not None:
                            self._capacity.release()
                finally:
                    self._idle_scopes.discard(idle)
            if item is not None:
                try:
                    await self._process(item, grant, lane)
                finally:
                    if self._capacity is not None:
                        self._capacity.release()

    async def _process(self, item: ClaimedItem, grant: Any, lane: Lane) -> None:
        key = (item.id, item.attempts)
        self.running[key] = item.instance_id
        outcome: Outcome | None = None
        try:
            outcome = await self._attempt(item, grant, lane)
        except StopWorker as error:
            outcome = Outcome.release(item)
            if self.fatal is None:
                self.fatal = error
                logger.error("[Worker] %s; stopping the worker", error)
                self.stop(grace=self.settings.shutdown_grace_seconds)
        except BaseException:
            outcome = Outcome.release(item)  # cancelled (shutdown): someone else will do it
            raise
        finally:
            self.running.pop(key, None)
            if outcome is not None:
                self._emit(outcome)

    async def _attempt(self, item: ClaimedItem, grant: Any, lane: Lane) -> Outcome:
        kind = lane.kinds.get(item.kind)
        if kind is None:  # a claim returns only the lane's kinds: this is a bug of ours
            return Outcome.release(item, error=f"no handler for kind {item.kind}", delay=5.0)
        return await attempt(
            item,
            grant,
            kind=kind,
            limiter=lane.limiter,
            estimate=lane.estimate,
            settings=self.settings,
            rng=self._rng,
            on_rate_limited=self._on_rate_limited,
        )

    def _on_rate_limited(self) -> None:
        self.counters.rate_limited += 1

    def _on_claimed(self, claimed: list[ClaimedItem]) -> None:
        for item in claimed:
            key = (item.id, item.attempts)
            if key not in self.held:
                self._held_per_job[item.job_id] += 1
            self.held[key] = item.instance_id

    def _release_held(self, outcome: Outcome) -> None:
        if self.held.pop((outcome.item_id, outcome.attempt), None) is not None:
            left = self._held_per_job[outcome.job_id] - 1
            if left > 0:
                self._held_per_job[outcome.job_id] = left
            else:
                del self._held_per_job[outcome.job_id]

    def _jobs_still_held(self, batch: list[Outcome]) -> set[int]:
        """The batch's jobs of which this worker holds an item outside the batch: open for sure
        (PROCESSING under this worker's lease, or back to PENDING if the lease was lost)."""
        in_batch = Counter(o.job_id for o in batch if (o.item_id, o.attempt) in self.held)
        return {job for job, count in in_batch.items() if self._held_per_job[job] > count}

    def _emit(self, outcome: Outcome) -> None:
        self.completer.emit(outcome)

    # -- services -------------------------------------------------------------------------

    def _on_written(self, batch: list[Outcome], superseded: list[Outcome]) -> None:
        for each in self.lanes:
            each.dispatcher.outcomes_written()
        self.counters.superseded += len(superseded)
        for outcome in superseded:
            self._release_held(outcome)
        now = time.time()
        for outcome in batch:
            self._release_held(outcome)
            if outcome.status in ("COMPLETED", "FAILED"):
                self.throughput.record(outcome.instance_id, now)
            if outcome.status == "COMPLETED":
                self.counters.completed += 1
            elif outcome.status == "FAILED":
                self.counters.failed += 1
                logger.warning("[Worker] item %d FAILED: %s", outcome.item_id, outcome.error)
            elif outcome.refund:
                self.counters.released += 1
            else:
                self.counters.retried += 1
            if outcome.status == "PENDING" and outcome.delay > 0:
                # In backoff until then: the promote step's notification wakes its store.
                self.promoter.due_in(outcome.delay)

    def heartbeat_interval(self) -> float:
        return self.settings.heartbeat_seconds

    async def _heartbeat_loop(self) -> None:
        await heartbeat.run_heartbeat(
            self.pool,
            self.worker_id,
            interval=self.heartbeat_interval,
            lease_seconds=self.settings.lease_seconds,
            held=lambda: [item_id for item_id, _attempt in self.held],
            stats=self.stats,
            listener_connected=lambda: self.listener.connected,
            on_others=self._on_beat,
        )

    def _on_beat(self, others: int) -> None:
        self.last_beat = time.monotonic()
        self.live_workers = others + 1
        self._others_alive(others)

    def _on_reaped(self, count: int) -> None:
        self.counters.reaped += count

    def stats(self) -> WorkerStats:
        limiter = self.limiter.snapshot()
        now = time.time()
        return {
            "requestsInLastMinute": limiter.requests_last_minute,
            "tokensInLastMinute": limiter.tokens_last_minute,
            "waiters": limiter.waiters,
            "rateLimitedTotal": self.counters.rate_limited,
            "completed": self.counters.completed,
            "failed": self.counters.failed,
            "retried": self.counters.retried,
            "released": self.counters.released,
            "reaped": self.counters.reaped,
            "superseded": self.counters.superseded,
            "claims": sum(lane.dispatcher.claims for lane in self.lanes),
            "claimedItems": sum(lane.dispatcher.claimed_items for lane in self.lanes),
            "inFlight": len(self.running),
            "inFlightByStore": dict(Counter(self.running.values())),
            "readyStores": len({s for lane in self.lanes for s in lane.dispatcher.ring}),
            "kinds": self.kinds,
            "listenerConnected": self.listener.connected,
            "pool": pool_stats(self.pool),
            "rpm": self.settings.rate_limit_rpm,
            "tpm": self.settings.rate_limit_tpm,
            "finishedPerMinute": self.throughput.per_minute(now),
            "finishedLastMinuteByStore": self.throughput.by_store(now),
        }
