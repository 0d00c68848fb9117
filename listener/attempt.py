"""One attempt at an item: its kind's handler called under its budget, and what becomes of it.

The handler steers the item by what it raises, whoever wrote it: `BudgetExhausted` pauses the
whole budget and tries again in place (the budget's fault, not the item's); `FailItem` fails
it; `RetryItem` retries it with backoff until its kind's max attempts; `StopWorker` stops the
process. A bug in a handler neither loses the item nor kills the worker.

An answer in hand is kept: the budget's row is corrected (and paused, when the answer says the
budget is spent) after the outcome is decided, as a best effort, so a database that cannot be
reached then never turns a paid-for answer into another call.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from typing import Any

from listener.backoff import retry_delay
from listener.errors import (
    BudgetExhausted,
    DatabaseError,
    DeferItem,
    FailItem,
    RetryItem,
    StopWorker,
)
from listener.handler import Item, Kind, Result
from listener.items import ClaimedItem, Outcome
from listener.limiter import Limiter
from listener.settings import Settings

logger = logging.getLogger("listener.worker")

# A 429 is the budget's fault, not the item's: it is retried in place this many times before
# the item goes back to PENDING with its attempt refunded.
MAX_RATE_LIMITED_RETRIES = 10


def read_payload(item: ClaimedItem, max_bytes: int) -> Any:
    """The item's payload as Python data (None when NULL); one too large or too deeply nested
    to read is the item's fault."""
    if item.payload_bytes is None:
        return None
    if item.payload_text is None:
        raise FailItem(
            f"payload is {item.payload_bytes:,} bytes, over the limit of {max_bytes:,} "
            "(MAX_PAYLOAD_BYTES)"
        )
    try:
        return json.loads(item.payload_text)
    except RecursionError:
        # Python reads JSON recursively: deep nesting is not product data.
        raise FailItem("payload is nested too deeply to read") from None


def handler_item(item: ClaimedItem, kind: Kind, settings: Settings) -> Item:
    """The item as its handler sees it; a required option missing is the job's fault."""
    missing = sorted(name for name in kind.required_options if name not in item.options)
    if missing:
        raise FailItem(
            f"kind {kind.name} needs option {', '.join(missing)} (on the job, or the store's)"
        )
    return Item(
        id=item.id,
        job_id=item.job_id,
        store=item.instance_id,
        kind=item.kind,
        product_id=item.product_id,
        payload=read_payload(item, settings.max_payload_bytes),
        options=item.options,
        attempt=item.attempts,
        max_attempts=kind.max_attempts or settings.max_attempts,
        tier=item.tier,
        deferred_since=item.deferred_since,
    )


def as_result(value: Any) -> Result:
    """A handler's return value as a Result. Its value is encoded once, when the outcome is
    written: one that is not JSON then fails its item alone, with the reason (items.py)."""
    return value if isinstance(value, Result) else Result(value)


def retry_outcome(
    item: ClaimedItem,
    error: RetryItem,
    max_attempts: int,
    settings: Settings,
    rng: random.Random,
) -> Outcome:
    """A retry after backoff, or FAILED once the item has used its attempts: the rule of every
    attempt, real-time or a batch's line."""
    if item.attempts >= max_attempts:
        return Outcome.failed(item, f"gave up after {item.attempts} attempt(s): {error}")
    delay = error.after
    if delay is None:
        delay = retry_delay(
            item.attempts, settings.retry_base_seconds, settings.retry_cap_seconds, rng
        )
    return Outcome.retry(item, str(error), delay)


async def attempt(
    item: ClaimedItem,
    grant: Any,
    *,
    kind: Kind,
    limiter: Limiter,
    estimate: int,
    settings: Settings,
    rng: random.Random,
    on_rate_limited: Callable[[], None],
) -> Outcome:
    max_attempts = kind.max_attempts or settings.max_attempts
    try:
        work = handler_item(item, kind, settings)
        for _ in range(MAX_RATE_LIMITED_RETRIES):
            try:
                result = as_result(await kind.handler(work))
            except BudgetExhausted as limited:
                on_rate_limited()
                logger.warning(
                    "[RateLimiter] budget exhausted (%s): pausing every worker for %.1fs",
                    limited,
                    limited.retry_after,
                )
                await limiter.pause(limited.retry_after, rate_limited=True)
                grant = await limiter.acquire(estimate)
                continue
            await _settle(limiter, grant, result, estimate, item)
            return Outcome.completed(
                item, result.value, result.usage, result.model, result.served_tier
            )
        return Outcome.release(item, error="rate limited", delay=5.0)
    except FailItem as error:
        return Outcome.failed(item, str(error))
    except DeferItem as error:
        return Outcome.deferral(item, str(error), max(0.0, error.after))
    except RetryItem as error:
        return retry_outcome(item, error, max_attempts, settings, rng)
    except DatabaseError as error:
        # The budget's row was unreachable before any answer (pause, acquire): not the item's
        # fault, and nothing was paid for.
        logger.warning("[Worker] releasing item %d: %s", item.id, error)
        return Outcome.release(item, error=str(error), delay=1.0)
    except StopWorker:
        raise
    except Exception as error:
        # A bug must not lose the item nor kill the worker: retry, then fail.
        logger.exception("[Worker] unexpected error on item %d", item.id)
        if item.attempts >= max_attempts:
            return Outcome.failed(item, f"unexpected error: {error!r}")
        return Outcome.retry(item, f"unexpected error: {error!r}", settings.retry_base_seconds)


async def _settle(
    limiter: Limiter, grant: Any, result: Result, estimate: int, item: ClaimedItem
) -> None:
    """Correct the budget with what the call cost, and pause it when the answer says it is
    spent: best effort, the answer is kept whatever happens here."""
    try:
        await limiter.settle(grant, estimate if result.cost is None else result.cost)
        if result.pause:
            await limiter.pause(result.pause, rate_limited=False)
    except DatabaseError as error:
        logger.warning(
            "[RateLimiter] could not settle the budget after item %d (its answer is kept): %s",
            item.id,
            error,
        )
