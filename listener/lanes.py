"""A worker's lanes: one per budget its kinds draw from, each with its own ring and claimer.

A worker takes its budget slot before it knows its item (so a new store's first item goes into
the very next slot), which means the slot must be of the budget the item will draw from: the
kinds of one budget are claimed together, by the lane of that budget, and never spend a slot of
another. A lane of kinds that draw from no budget has no slot to wait for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import anyio
from psycopg_pool import AsyncConnectionPool

from listener.dispatch import Dispatcher
from listener.handler import DEFAULT_BUDGET, App, Budget, Kind
from listener.limiter import Limiter, LocalLimiter, budget_limiter, make_limiter
from listener.settings import Settings

# A lane's name in `stores_served` and the logs: its budget's, or this for no budget.
NO_BUDGET = "none"


@dataclass
class Lane:
    name: str
    kinds: dict[str, Kind]
    limiter: Limiter
    # Budget tokens reserved for a slot before its item (and so its kind) is known.
    estimate: int
    # Requests a minute the budget allows (0: no budget; every worker passes at once).
    rpm: int
    dispatcher: Dispatcher
    # Workers that may wait for a slot at once; None without a budget (nothing to wait for).
    slot_gate: anyio.Semaphore | None

    @property
    def budgeted(self) -> bool:
        return self.rpm > 0


def budget_groups(app: App) -> list[tuple[str, list[Kind]]]:
    """The app's kinds by the budget they draw from: the default budget's first."""
    groups: dict[str, list[Kind]] = {}
    for kind in app:
        groups.setdefault(kind.budget or NO_BUDGET, []).append(kind)
    return sorted(groups.items(), key=lambda group: (group[0] != DEFAULT_BUDGET, group[0]))


def make_limiters(
    pool: AsyncConnectionPool | None, settings: Settings, app: App
) -> dict[str, Limiter]:
    """One limiter per budget the app's kinds draw from."""
    limiters: dict[str, Limiter] = {}
    for name, _kinds in budget_groups(app):
        if name == DEFAULT_BUDGET:
            limiters[name] = make_limiter(pool, settings)
        elif name == NO_BUDGET:
            limiters[name] = LocalLimiter(0, 0)
        else:
            budget: Budget = app.budgets[name]
            limiters[name] = budget_limiter(
                pool, name, budget.rpm, budget.tpm, settings.rate_limit_headroom_percent
            )
    return limiters


def budget_rpm(name: str, settings: Settings, app: App) -> tuple[int, int]:
    """The budget's requests and tokens a minute (0: none)."""
    if name == DEFAULT_BUDGET:
        return settings.rate_limit_rpm, settings.rate_limit_tpm
    if name == NO_BUDGET:
        return 0, 0
    budget = app.budgets[name]
    return budget.rpm, budget.tpm


def lane_kinds(lanes: Iterable[Lane]) -> Mapping[str, Lane]:
    return {kind: lane for lane in lanes for kind in lane.kinds}
