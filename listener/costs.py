"""What each store costs, today and this month (UTC), and what the batch and flex tiers saved.

The stored token counts (`listener.usage`) priced with the price table when read: `cost` is what
the usage cost on the tier that served it, `saved` what the same usage would have cost on the
realtime tier minus that. A model (or tier) the table does not list is unpriced: its items are
counted apart and the figure says so, never 0 dollars.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from listener.openai.prices import PriceTable
from listener.tiers import SERVED_TIERS
from listener.usage import UsageRow

PERIODS = ("today", "month")
OTHER_STORES = "other"


@dataclass
class TierCost:
    items: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0  # of the priced items
    saved_usd: float = 0.0  # realtime's price of the same priced items, minus cost_usd
    unpriced_items: int = 0

    def add(self, other: TierCost) -> None:
        self.items += other.items
        self.prompt_tokens += other.prompt_tokens
        self.cached_tokens += other.cached_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd
        self.saved_usd += other.saved_usd
        self.unpriced_items += other.unpriced_items


@dataclass
class PeriodCost:
    tiers: dict[str, TierCost] = field(default_factory=dict)
    unpriced_models: set[str] = field(default_factory=set)

    def tier(self, name: str) -> TierCost:
        return self.tiers.setdefault(name, TierCost())

    @property
    def items(self) -> int:
        return sum(t.items for t in self.tiers.values())

    @property
    def cost_usd(self) -> float:
        return sum(t.cost_usd for t in self.tiers.values())

    @property
    def saved_usd(self) -> float:
        return sum(t.saved_usd for t in self.tiers.values())

    @property
    def unpriced_items(self) -> int:
        return sum(t.unpriced_items for t in self.tiers.values())

    def add(self, other: PeriodCost) -> None:
        for name, tier in other.tiers.items():
            self.tier(name).add(tier)
        self.unpriced_models |= other.unpriced_models

    def as_dict(self) -> dict[str, Any]:
        return {
            "cost_usd": round(self.cost_usd, 6),
            "saved_usd": round(self.saved_usd, 6),
            "items": self.items,
            "unpriced_items": self.unpriced_items,
            "unpriced_models": sorted(self.unpriced_models),
            "tiers": {
                name: {
                    "items": t.items,
                    "prompt_tokens": t.prompt_tokens,
                    "cached_tokens": t.cached_tokens,
                    "completion_tokens": t.completion_tokens,
                    "cost_usd": round(t.cost_usd, 6),
                    "saved_usd": round(t.saved_usd, 6),
                    "unpriced_items": t.unpriced_items,
                }
                for name, t in sorted(self.tiers.items(), key=lambda kv: _tier_order(kv[0]))
            },
        }


@dataclass
class StoreCost:
    store: str
    today: PeriodCost = field(default_factory=PeriodCost)
    month: PeriodCost = field(default_factory=PeriodCost)

    def period(self, name: str) -> PeriodCost:
        return self.today if name == "today" else self.month

    def add(self, other: StoreCost) -> None:
        self.today.add(other.today)
        self.month.add(other.month)

    def as_dict(self) -> dict[str, Any]:
        return {"today": self.today.as_dict(), "month": self.month.as_dict()}


def _tier_order(name: str) -> int:
    return SERVED_TIERS.index(name) if name in SERVED_TIERS else len(SERVED_TIERS)


def priced(row: UsageRow, prices: PriceTable) -> TierCost:
    """One usage row in money: its cost on its tier and what it saved against realtime."""
    cost = TierCost(row.items, row.prompt_tokens, row.cached_tokens, row.completion_tokens)
    price = prices.price(row.model, row.served_tier)
    realtime = price
    if price is not None and row.served_tier != "realtime":
        realtime = prices.price(row.model, "realtime")
    if price is None or realtime is None:
        cost.unpriced_items = row.items
        return cost
    tokens = (row.prompt_tokens, row.cached_tokens, row.completion_tokens)
    cost.cost_usd = price.cost(*tokens)
    cost.saved_usd = realtime.cost(*tokens) - cost.cost_usd
    return cost


def store_costs(rows: Iterable[UsageRow], prices: PriceTable) -> dict[str, StoreCost]:
    """Each store's cost, today and this month (today's rows count in the month too)."""
    stores: dict[str, StoreCost] = {}
    for row in rows:
        store = stores.setdefault(row.store, StoreCost(row.store))
        cost = priced(row, prices)
        periods = (store.today, store.month) if row.today else (store.month,)
        for period in periods:
            period.tier(row.served_tier).add(cost)
            if cost.unpriced_items:
                period.unpriced_models.add(row.model or "(none)")
    return stores


def fleet_total(stores: Iterable[StoreCost]) -> StoreCost:
    total = StoreCost("")
    for store in stores:
        total.add(store)
    return total


def top_stores(stores: dict[str, StoreCost], n: int) -> list[StoreCost]:
    """The `n` stores that cost most this month, then one row "other" summing the rest (when
    there are more): the `store` label of a metric stays bounded with thousands of stores."""
    ranked = sorted(stores.values(), key=lambda s: (-s.month.cost_usd, -s.month.items, s.store))
    top = ranked[:n]
    rest = ranked[n:]
    if rest:
        other = StoreCost(OTHER_STORES)
        for store in rest:
            other.add(store)
        top.append(other)
    return top


def money(period: PeriodCost) -> str:
    """The period's cost in words: dollars, "unpriced", or both."""
    if period.unpriced_items and not period.items - period.unpriced_items:
        return "unpriced"
    text = f"${period.cost_usd:,.4f}"
    if period.unpriced_items:
        text += f" + {period.unpriced_items:,} unpriced item(s)"
    return text
