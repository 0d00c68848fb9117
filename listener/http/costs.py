"""What the stores cost, for `/metrics` and the dashboard: one reading of every store's usage
this month, priced, shared by every request of the process and read again at most once a period.

The figures are of days and months: a reading half a minute old is fresh enough, and a hundred
scrapers and pages cost the database one reading (stores x days x models x tiers rows of the
daily rollup, plus the ledger's last minute) per period.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from psycopg_pool import AsyncConnectionPool

from listener import usage
from listener.costs import PERIODS, StoreCost, fleet_total, store_costs, top_stores
from listener.errors import DatabaseError, one_line
from listener.http.fleet import DB_ERRORS, DB_TIMEOUT_SECONDS
from listener.openai.prices import PriceTable
from listener.redact import redact

logger = logging.getLogger(__name__)

COST_SECONDS = 60.0
# A metric's `store` label: the stores that cost most this month, then "other".
TOP_STORES = 50
# The dashboard's table of the stores that cost most.
DASHBOARD_STORES = 10


@dataclass
class FleetCosts:
    stores: dict[str, StoreCost]
    total: StoreCost
    read_at: datetime
    prices: PriceTable

    def top(self, n: int) -> list[StoreCost]:
        return top_stores(self.stores, n)

    def of(self, store: str) -> StoreCost | None:
        return self.stores.get(store)


class CostReport:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        prices: PriceTable,
        *,
        period: float = COST_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.prices = prices
        self.period = period
        self.clock = clock
        self.current: FleetCosts | None = None
        self.error: str | None = None
        self._taken = float("-inf")
        self._lock = anyio.Lock()
        self.readings = 0

    async def get(self) -> FleetCosts | None:
        """The latest figures, read again first when older than the period; after a failed
        reading the previous ones (and `error` says why), None before any succeeded."""
        if self.clock() - self._taken < self.period:
            return self.current
        async with self._lock:
            if self.clock() - self._taken < self.period:
                return self.current
            try:
                with anyio.fail_after(DB_TIMEOUT_SECONDS * 5):
                    async with self.pool.connection(timeout=DB_TIMEOUT_SECONDS) as conn:
                        rows = await usage.fleet_usage(conn)
            except (DatabaseError, *DB_ERRORS) as error:
                self.error = redact(f"costs not read: {one_line(error)}")
                logger.warning("[HTTP] %s", self.error)
            else:
                stores = store_costs(rows, self.prices)
                self.current = FleetCosts(
                    stores, fleet_total(stores.values()), datetime.now(UTC), self.prices
                )
                self.error = None
                self.readings += 1
            # A failed reading waits a period too: a down database is not hammered.
            self._taken = self.clock()
        return self.current


def cost_metrics(costs: FleetCosts) -> Iterator[Metric]:
    """The cost families: per store (the TOP_STORES that cost most this month, then "other"),
    the fleet's, what is unpriced, and the price table's date."""
    per_store = {
        name: GaugeMetricFamily(
            f"listener_store_{name}_usd",
            f"{doc} per store, period (today, month: UTC) and tier; the {TOP_STORES} stores that "
            'cost most this month, the rest summed as store="other"',
            labels=["store", "period", "tier"],
        )
        for name, doc in (("cost", "What the usage cost"), ("saved", _SAVED))
    }
    fleet = {
        name: GaugeMetricFamily(
            f"listener_{name}_usd",
            f"{doc}, every store, per period (today, month: UTC) and tier",
            labels=["period", "tier"],
        )
        for name, doc in (("cost", "What the usage cost"), ("saved", _SAVED))
    }
    for store in costs.top(TOP_STORES):
        for period in PERIODS:
            for tier, tier_cost in store.period(period).tiers.items():
                labels = [store.store, period, tier]
                per_store["cost"].add_metric(labels, tier_cost.cost_usd)
                per_store["saved"].add_metric(labels, tier_cost.saved_usd)
    unpriced = GaugeMetricFamily(
        "listener_unpriced_items",
        "Items whose model and tier the price table does not list, per period (UTC); their "
        "cost is in no figure",
        labels=["period"],
    )
    for period in PERIODS:
        figures = costs.total.period(period)
        for tier, tier_figures in figures.tiers.items():
            fleet["cost"].add_metric([period, tier], tier_figures.cost_usd)
            fleet["saved"].add_metric([period, tier], tier_figures.saved_usd)
        unpriced.add_metric([period], figures.unpriced_items)
    yield from per_store.values()
    yield from fleet.values()
    yield unpriced
    read_on = datetime.combine(costs.prices.read_on, datetime.min.time(), UTC)
    yield GaugeMetricFamily(
        "listener_price_table_read_timestamp_seconds",
        "When the price table's figures were read (its read_on date), as a Unix time",
        read_on.timestamp(),
    )


_SAVED = "What the realtime tier would have cost for the same usage, minus its cost,"
