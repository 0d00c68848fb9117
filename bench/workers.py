"""Workers as the benchmarks run them: the project's worker in this process with timing hooks, a
worker with an instant handler (the worker's own cost, no HTTP), and the old worker re-created.

`python -m bench.workers` runs the instant-handler worker as a process, configured from the
environment like `python -m listener worker`.
"""

from __future__ import annotations

import logging
import signal
import time
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio

from bench.common import sql
from listener import assembly
from listener.assembly import served_app
from listener.attempt import handler_item
from listener.db import open_pool
from listener.errors import BudgetExhausted, RetryItem
from listener.handler import DEFAULT_KIND, App, Item, Kind, Result
from listener.items import ClaimedItem, Outcome, finish
from listener.limiter import Limiter, make_limiter
from listener.settings import Settings, load_settings
from listener.worker import Worker, new_worker_id


def bench_settings(base_url: str, **overrides: Any) -> Settings:
    """The production defaults, pointed at the stub; what a benchmark changes is explicit."""
    values: dict[str, Any] = {
        "openai_api_key": "bench-key",
        "openai_base_url": base_url,
        "rate_limit_rpm": 450,
        "rate_limit_tpm": 0,
        "worker_concurrency": 16,
        "shutdown_grace_seconds": 5,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return load_settings(**values)


class StartTimes:
    """When each store's first item started (time.time()), and a way to wait for it."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.started = 0
        self._events: dict[str, anyio.Event] = {}

    def event(self, store: str) -> anyio.Event:
        return self._events.setdefault(store, anyio.Event())

    def note(self, item: Item) -> None:
        self.started += 1
        if item.store not in self.first:
            self.first[item.store] = time.time()
            self.event(item.store).set()


class TimingGenerator(App):
    """The real OpenAI kinds, noting when each store's first item started."""

    def __init__(self, settings: Settings) -> None:
        self.times = StartTimes()
        base = served_app(settings).observed(self.times.note)
        super().__init__(base, base.budgets.values())


class InstantHandler(App):
    """A handler that answers at once: what is left is the worker's own cost."""

    def __init__(self) -> None:
        self.times = StartTimes()
        super().__init__([Kind(DEFAULT_KIND, self.handle, estimate=0)])

    async def handle(self, item: Item) -> Result:
        self.times.note(item)
        return Result({"text": "ok"}, cost=0)


def running_worker(
    url: str, settings: Settings, handler: TimingGenerator | InstantHandler
) -> AbstractAsyncContextManager[Worker]:
    """The project's worker in this process, ready (LISTEN done, ring built) inside the block."""
    return assembly.running_worker(settings, url, handler, name="listener-bench", grace=2)


class OldWorker:
    """The worker before this project, re-created: every `poll_seconds` (ticks skipped while a
    batch is running), claim the oldest `batch` PENDING items (the `fifo` baseline), then send
    them through the same kind of rate limiter to the API, `concurrency` at a time."""

    def __init__(
        self,
        url: str,
        settings: Settings,
        handler: TimingGenerator,
        poll_seconds: float = 5.0,
        batch: int = 100,
    ) -> None:
        self.url = url
        self.settings = settings
        self.handler = handler
        self.poll_seconds = poll_seconds
        self.batch = batch
        self.worker_id = f"old-{new_worker_id()}"
        self.claims: list[tuple[float, int]] = []  # (time.time() of the claim, items claimed)
        self.claimed = anyio.Event()  # set (and replaced) at each claim
        self.completed = 0
        self.last_completion = 0.0

    async def run(self) -> None:
        pool = await open_pool(self.url, self.settings, name="bench-old-worker")
        limiter = make_limiter(None, self.settings)  # the old worker's budget: its own
        held: dict[int, ClaimedItem] = {}
        try:
            started = anyio.current_time()
            while True:
                async with pool.connection() as conn:
                    cursor = await conn.execute(sql("baselines")["fifo"], self._params())
                    items = [ClaimedItem(*row) for row in await cursor.fetchall()]
                self.claims.append((time.time(), len(items)))
                self.claimed.set()
                self.claimed = anyio.Event()
                held.update((item.id, item) for item in items)
                outcomes = await self._process(items, limiter)
                await finish(pool, self.worker_id, outcomes)
                for outcome in outcomes:
                    held.pop(outcome.item_id, None)
                self.completed += sum(o.status == "COMPLETED" for o in outcomes)
                self.last_completion = time.time()
                elapsed = anyio.current_time() - started
                await anyio.sleep(self.poll_seconds - elapsed % self.poll_seconds)
        finally:
            with anyio.CancelScope(shield=True):
                await finish(pool, self.worker_id, [Outcome.release(i) for i in held.values()])
                await pool.close()

    def _params(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "worker_id": self.worker_id,
            "lease_seconds": 300,
            "max_payload_bytes": self.settings.max_payload_bytes,
        }

    async def _process(self, items: list[ClaimedItem], limiter: Limiter) -> list[Outcome]:
        outcomes: list[Outcome] = []
        slots = anyio.Semaphore(self.settings.worker_concurrency)

        async def one(item: ClaimedItem) -> None:
            async with slots:
                while True:
                    await limiter.acquire(0)
                    try:
                        kind = self.handler[item.kind]
                        await kind.handler(handler_item(item, kind, self.settings))
                    except BudgetExhausted as limited:
                        await anyio.sleep(limited.retry_after)
                        continue
                    except RetryItem as error:
                        outcomes.append(Outcome.retry(item, str(error), 5.0))
                        return
                    outcomes.append(Outcome.completed(item, {"text": "done"}))
                    return

        async with anyio.create_task_group() as tg:
            for item in items:
                tg.start_soon(one, item)
        return outcomes


async def _serve_instant() -> None:
    settings = load_settings()
    assert settings.database_url, "DATABASE_URL is required"
    handler = InstantHandler()
    async with running_worker(settings.database_url, settings, handler) as worker:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _signum in signals:
                worker.stop(grace=2)
                break


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    anyio.run(_serve_instant)
