"""What `status` and `store show` print: rich tables for people, `--json` for machines.

Stores, products and errors are the clients' data: rich Text, never markup, so "[/x]" in a store
id is shown as it is instead of crashing the command (and control codes are dropped)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from listener import jobs, policy, usage
from listener.costs import PERIODS, StoreCost, money, store_costs
from listener.errors import ListenerError
from listener.openai.prices import PriceTable


@dataclass(frozen=True)
class JobRow:
    job: int
    store: str
    status: str
    created_at: datetime | None
    completed_at: datetime | None
    pending: int
    processing: int
    completed: int
    failed: int
    cancelled: int


@dataclass(frozen=True)
class FailedItem:
    item: int
    product_id: str | None
    attempts: int
    error: str | None


@dataclass(frozen=True)
class BatchHold:
    """An OpenAI batch holding some of a job's items (listener/batches)."""

    batch: int  # ours (openai_batches.id)
    openai_batch_id: str | None
    state: str
    status: str | None
    submitted_at: datetime | None
    items: int


@dataclass(frozen=True)
class BacklogRow:
    store: str
    pending: int
    processing: int


@dataclass(frozen=True)
class StoreRow:
    store: str
    weight: int
    rpm_limit: int | None
    max_in_flight: int | None
    paused: bool
    backlog: int
    in_flight: int
    last_minute: int


def _json(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, default=str, indent=2) + "\n")


def status(url: str, job_id: int | None, limit: int, as_json: bool) -> None:
    """A job's progress (or the `limit` latest jobs'), its failed items, the backlog per store."""
    if job_id is not None:
        row = jobs.job_progress(url, job_id)
        if row is None:
            raise ListenerError(f"no job {job_id}")
        rows = [JobRow(*row)]
        failed = [FailedItem(*item) for item in jobs.failed_items(url, job_id, limit)]
        batches = [BatchHold(*row) for row in jobs.job_batches(url, job_id)]
    else:
        rows = [JobRow(*row) for row in jobs.recent_jobs(url, limit)]
        failed, batches = [], []
    backlog = [BacklogRow(*row) for row in jobs.backlog_by_store(url, limit)]
    if as_json:
        document: dict[str, Any] = {
            "jobs": [asdict(row) for row in rows],
            "backlog": [asdict(row) for row in backlog],
        }
        if job_id is not None:
            document["failed_items"] = [asdict(item) for item in failed]
            document["batches"] = [asdict(hold) for hold in batches]
        _json(document)
        return
    console = Console()
    headers = ("job", "store", "status", "pending", "processing", "completed", "failed")
    table = Table(*headers, "cancelled", title="Jobs")
    for job in rows:
        counts = (job.pending, job.processing, job.completed, job.failed, job.cancelled)
        table.add_row(str(job.job), Text(job.store), Text(job.status), *map(str, counts))
    console.print(table)
    for item in failed:
        console.print(
            Text(
                f"  FAILED item {item.item} ({item.product_id}, {item.attempts} attempt(s)): "
                f"{item.error}"
            )
        )
    for hold in batches:
        where = hold.openai_batch_id or f"batch {hold.batch} of ours"
        status = f", {hold.status}" if hold.status else ""
        since = f", submitted {hold.submitted_at:%Y-%m-%d %H:%M} UTC" if hold.submitted_at else ""
        console.print(
            Text(f"  {hold.items} item(s) in OpenAI batch {where} ({hold.state}{status}{since})")
        )
    per_store = Table("store", "pending", "processing", title="Backlog per store")
    for entry in backlog:
        per_store.add_row(Text(entry.store), str(entry.pending), str(entry.processing))
    console.print(per_store)


def stores(
    url: str, store: str | None, limit: int, as_json: bool, prices: PriceTable | None = None
) -> None:
    """Each store's policy and work: one store, or the first `limit` with a row or work; with
    `prices`, what each costs today and this month (UTC) and what batch and flex saved."""
    rows = [StoreRow(*row) for row in policy.show(url, store, limit)]
    costs = {} if prices is None else store_costs(usage.read_usage(url, store), prices)
    if store is not None and not rows and store in costs:
        rows = [StoreRow(store, 1, None, None, False, 0, 0, 0)]  # no work now, but a cost
    if as_json:
        document: dict[str, Any] = {
            "stores": [
                {**asdict(row), **({} if prices is None else {"cost": _cost(costs, row.store)})}
                for row in rows
            ]
        }
        if prices is not None:
            document["prices"] = _prices_note(prices)
        _json(document)
        return
    headers = ("store", "weight", "rpm", "max in flight", "paused", "backlog", "in flight")
    priced = ("cost today", "cost this month", "saved this month") if prices else ()
    table = Table(*headers, "last minute", *priced, title="Stores")
    for row in rows:
        cost = costs.get(row.store, StoreCost(row.store))
        table.add_row(
            Text(row.store),
            str(row.weight),
            "-" if row.rpm_limit is None else str(row.rpm_limit),
            "-" if row.max_in_flight is None else str(row.max_in_flight),
            "yes" if row.paused else "no",
            str(row.backlog),
            str(row.in_flight),
            str(row.last_minute),
            *(
                (money(cost.today), money(cost.month), f"${cost.month.saved_usd:,.4f}")
                if prices
                else ()
            ),
        )
    console = Console()
    console.print(table)
    if prices is not None and store is not None:
        _print_tiers(console, costs.get(store, StoreCost(store)), prices)


def _cost(costs: dict[str, StoreCost], store: str) -> dict[str, Any]:
    return costs.get(store, StoreCost(store)).as_dict()


def _prices_note(prices: PriceTable) -> dict[str, Any]:
    return {
        "table": prices.origin,
        "read_on": prices.read_on.isoformat(),
        "currency": prices.currency,
        "periods": "UTC: today since 00:00, this month since the 1st",
    }


def _print_tiers(console: Console, cost: StoreCost, prices: PriceTable) -> None:
    """One store's cost by tier, and what is unpriced and why."""
    table = Table("period", "tier", "items", "prompt", "cached", "completion", "cost", "saved")
    table.title = f"Cost of {cost.store} (UTC; prices of {prices.read_on.isoformat()})"
    for name in PERIODS:
        period = cost.period(name)
        for tier, figures in period.as_dict()["tiers"].items():
            table.add_row(
                name,
                tier,
                f"{figures['items']:,}",
                f"{figures['prompt_tokens']:,}",
                f"{figures['cached_tokens']:,}",
                f"{figures['completion_tokens']:,}",
                "unpriced"
                if figures["unpriced_items"] == figures["items"]
                else f"${figures['cost_usd']:,.4f}",
                f"${figures['saved_usd']:,.4f}",
            )
    console.print(table)
    if cost.month.unpriced_models:
        console.print(
            Text(
                f"unpriced: {cost.month.unpriced_items:,} item(s) of model(s) "
                f"{', '.join(sorted(cost.month.unpriced_models))} this month: not in the price "
                f"table ({prices.origin}); set OPENAI_PRICES_FILE to a table that lists them"
            )
        )
