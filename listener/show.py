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

from listener import jobs, policy
from listener.errors import ListenerError


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


def stores(url: str, store: str | None, limit: int, as_json: bool) -> None:
    """Each store's policy and work: one store, or the first `limit` with a row or work."""
    rows = [StoreRow(*row) for row in policy.show(url, store, limit)]
    if as_json:
        _json({"stores": [asdict(row) for row in rows]})
        return
    headers = ("store", "weight", "rpm", "max in flight", "paused", "backlog", "in flight")
    table = Table(*headers, "last minute", title="Stores")
    for row in rows:
        table.add_row(
            Text(row.store),
            str(row.weight),
            "-" if row.rpm_limit is None else str(row.rpm_limit),
            "-" if row.max_in_flight is None else str(row.max_in_flight),
            "yes" if row.paused else "no",
            str(row.backlog),
            str(row.in_flight),
            str(row.last_minute),
        )
    Console().print(table)
