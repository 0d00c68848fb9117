"""Tiers: how a job's items reach their handler's API, and the `auto` rule.

`realtime` (the default): each item is claimed and called at once, under the per-minute budget.
`flex`: claimed the same way; the handler asks for OpenAI's flex service tier (cheaper, slower).
`batch`: collected into OpenAI Batch API files (half the price, answers within 24 h), never
claimed one by one. `auto`: `batch` when the job is large or of low priority, `realtime`
otherwise. A job's tier NULL means its kind's default (`Kind(tier=...)`).

Pure: the producer and the fill trigger (`listener_item_tier` in sql/schema.sql) apply the same
rule; keep them in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

REALTIME: Final = "realtime"
BATCH: Final = "batch"
FLEX: Final = "flex"
AUTO: Final = "auto"
# What a job may ask for (jobs_tier_valid) and what an item runs on (job_items_tier_valid).
TIERS: Final = (REALTIME, BATCH, FLEX, AUTO)
SERVED_TIERS: Final = (REALTIME, BATCH, FLEX)

ServedTier = Literal["realtime", "batch", "flex"]


@dataclass(frozen=True)
class AutoRule:
    """`auto` is `batch` for a job of at least `min_items` items or of a priority at or under
    `max_priority` (AUTO_BATCH_MIN_ITEMS, AUTO_BATCH_MAX_PRIORITY)."""

    min_items: int
    max_priority: int

    def wants_batch(self, count: int | None, priority: int) -> bool:
        # count None: a plain INSERT, whose size nobody knows when its first item arrives.
        return priority <= self.max_priority or (count is not None and count >= self.min_items)


def resolve(
    asked: str | None,
    *,
    kind_default: str,
    batchable: bool,
    rule: AutoRule | None,
    count: int | None,
    priority: int,
) -> str:
    """The tier a job's items run on. `rule` None: no worker has said how `auto` goes (nor that
    the kind can batch), so `auto` stays real-time."""
    tier = asked or kind_default
    if tier != AUTO:
        return tier
    if batchable and rule is not None and rule.wants_batch(count, priority):
        return BATCH
    return REALTIME
