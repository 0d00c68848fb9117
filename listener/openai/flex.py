"""The flex tier: `service_tier="flex"` on an item's requests, at the batch price, when OpenAI has
capacity for it.

A "resource unavailable" answer (a 429 that is not a rate limit) defers the item (DeferItem): it
goes back to PENDING with its attempt given back, for a backoff that grows with the time it has
waited, and its next attempt is claimed like any other, taking its slot of the shared per-minute
budget (flex draws from the same budget as realtime). Once FLEX_FALLBACK_SECONDS have passed
since the item's first flex attempt (`Item.deferred_since`: the claim of the first attempt
deferred), its request goes out on the standard tier instead. A rate-limit 429 keeps the
budget's handling (BudgetExhausted: every process pauses).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from datetime import datetime

import openai

from listener.errors import DeferItem
from listener.handler import Item
from listener.tiers import FLEX

logger = logging.getLogger(__name__)

# The error code OpenAI (and the stub) give a flex request that found no capacity.
UNAVAILABLE_CODE = "resource_unavailable"
MIN_DELAY = 1.0
MAX_DELAY = 60.0


def is_unavailable(error: openai.RateLimitError) -> bool:
    # The client's `body` is the answer's error object (its "error" member).
    body = error.body if isinstance(error.body, dict) else {}
    return UNAVAILABLE_CODE in (body.get("code"), body.get("type"))


@dataclass
class FlexPolicy:
    fallback_seconds: float
    timeout_seconds: float
    rng: random.Random = field(default_factory=random.Random)

    def waited(self, item: Item, now: datetime) -> float:
        """Seconds since the item's first flex attempt; 0 before any was deferred."""
        if item.deferred_since is None:
            return 0.0
        return max(0.0, (now - item.deferred_since).total_seconds())

    def use_flex(self, item: Item, now: datetime) -> bool:
        """Whether this attempt asks for flex: a flex item, until its wait is over."""
        if item.tier != FLEX:
            return False
        waited = self.waited(item, now)
        if item.deferred_since is not None and waited >= self.fallback_seconds:
            logger.info(
                "[Worker] item %d: flex had no capacity for %.0fs (FLEX_FALLBACK_SECONDS=%g): "
                "sending it on the standard tier",
                item.id,
                waited,
                self.fallback_seconds,
            )
            return False
        return True

    def deferral(self, item: Item, now: datetime) -> DeferItem:
        """The answer to "resource unavailable": try flex again after a backoff that grows with
        the wait (half of it, 1 to 60 s, jittered), never past the fallback's moment."""
        waited = self.waited(item, now)
        remaining = self.fallback_seconds - waited
        delay = min(MAX_DELAY, max(MIN_DELAY, waited / 2)) * self.rng.uniform(0.8, 1.2)
        delay = max(0.0, min(delay, remaining))
        return DeferItem(
            f"flex: resource unavailable; flex again in {delay:.1f}s, the standard tier after "
            f"{self.fallback_seconds:g}s of waiting ({waited:.0f}s so far)",
            after=delay,
        )
