"""One attempt at an item: the handler called under the limiter, and what becomes of the item.

A 429 pauses the whole limiter and is retried in place (it is the budget's fault, not the
item's); a permanent error fails the item; a retryable one retries it with backoff until
MAX_ATTEMPTS; a bug of ours neither loses the item nor kills the worker.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from listener.backoff import retry_delay
from listener.errors import (
    AuthenticationFailed,
    DatabaseError,
    PermanentItemError,
    RateLimited,
    RetryableItemError,
)
from listener.generate import Generation
from listener.items import ClaimedItem, Outcome
from listener.limiter import Limiter
from listener.settings import Settings

logger = logging.getLogger("listener.worker")

# A 429 is the budget's fault, not the item's: it is retried in place this many times before
# the item goes back to PENDING with its attempt refunded.
MAX_RATE_LIMITED_RETRIES = 10


class ItemHandler(Protocol):
    def estimate_tokens(self) -> int: ...

    def __call__(self, item: ClaimedItem) -> Awaitable[Generation]: ...

    async def aclose(self) -> None: ...


async def attempt(
    item: ClaimedItem,
    grant: Any,
    *,
    handler: ItemHandler,
    limiter: Limiter,
    settings: Settings,
    rng: random.Random,
    on_rate_limited: Callable[[], None],
) -> Outcome:
    try:
        for _ in range(MAX_RATE_LIMITED_RETRIES):
            try:
                generation = await handler(item)
            except RateLimited as limited:
                on_rate_limited()
                logger.warning(
                    "[RateLimiter] 429 from OpenAI: pausing every worker for %.1fs",
                    limited.retry_after,
                )
                await limiter.pause(limited.retry_after, rate_limited=True)
                grant = await limiter.acquire(handler.estimate_tokens())
                continue
            await limiter.settle(grant, generation.total_tokens)
            if generation.pause_seconds:
                await limiter.pause(generation.pause_seconds, rate_limited=False)
            return Outcome.completed(item, generation.result)
        return Outcome.release(item, error="rate limited", delay=5.0)
    except PermanentItemError as error:
        return Outcome.failed(item, str(error))
    except RetryableItemError as error:
        if item.attempts >= settings.max_attempts:
            return Outcome.failed(item, f"gave up after {item.attempts} attempt(s): {error}")
        delay = retry_delay(
            item.attempts, settings.retry_base_seconds, settings.retry_cap_seconds, rng
        )
        return Outcome.retry(item, str(error), delay)
    except DatabaseError as error:
        # The limiter's row was unreachable (settle/pause): the item is not at fault.
        logger.warning("[Worker] releasing item %d: %s", item.id, error)
        return Outcome.release(item, error=str(error), delay=1.0)
    except AuthenticationFailed:
        raise
    except Exception as error:
        # A bug of ours must not lose the item nor kill the worker: retry, then fail.
        logger.exception("[Worker] unexpected error on item %d", item.id)
        if item.attempts >= settings.max_attempts:
            return Outcome.failed(item, f"unexpected error: {error!r}")
        return Outcome.retry(item, f"unexpected error: {error!r}", settings.retry_base_seconds)
