"""The work waiting: pending items per store, the oldest, backoff, expired leases, recent
failures, and the plan of the claim for the busiest store (the checklist's "Slow Queries")."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from listener.doctor.context import Context
from listener.doctor.report import Check, fail, ok, warn
from listener.sqlfiles import queries

TOP_STORES = 10
RECENT_FAILURES_CAP = 10_000
# Above this estimated cost the claim no longer reads only the head of a store's index range.
CLAIM_COST_WARNING = 10_000.0
# Below this, a sequential scan is the planner's right choice, not a missing index.
SMALL_TABLE_ROWS = 1_000


def age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class Backlog:
    """The per-store reading, taken once: the claim's plan check uses its busiest store."""

    def __init__(self, ctx: Context) -> None:
        rows = ctx.rows("backlog")
        self.top = [(str(r[0]), int(r[1])) for r in rows]
        self.stores = int(rows[0][2]) if rows else 0
        self.pending = int(rows[0][3]) if rows else 0
        self.in_backoff = int(rows[0][4]) if rows else 0
        self.oldest = ctx.one("oldest_pending")

    @property
    def busiest(self) -> str | None:
        return self.top[0][0] if self.top else None


def check_backlog(ctx: Context, backlog: Backlog) -> Check:
    if not backlog.pending:
        return ok("backlog", "no PENDING item", pending=0, stores=0)
    oldest_age = float(backlog.oldest[2]) if backlog.oldest else 0.0
    check = ok(
        "backlog",
        f"{backlog.pending:,} pending over {backlog.stores:,} store(s); oldest waits"
        f" {age(oldest_age)}; {backlog.in_backoff:,} in retry backoff",
        pending=backlog.pending,
        stores=backlog.stores,
        in_backoff=backlog.in_backoff,
        oldest_seconds=oldest_age,
        top=dict(backlog.top),
    )
    check.lines = [f"{count:>9,}  {store}" for store, count in backlog.top]
    if backlog.stores > len(backlog.top):
        check.lines.append(f"{'':>9}  … and {backlog.stores - len(backlog.top):,} more store(s)")
    return check


def check_leases(ctx: Context) -> Check:
    row = ctx.one("expired_leases")
    count, overdue = (int(row[0]), float(row[1])) if row else (0, 0.0)
    owners = sorted(row[2] or []) if row else []
    data = {"expired": count, "overdue_seconds": overdue, "claimed_by": owners}
    if not count:
        return ok("leases", "no PROCESSING item with an expired lease", **data)
    summary = (
        f"{count:,} PROCESSING item(s) with an expired lease, the oldest {age(overdue)} past;"
        f" claimed by {', '.join(owners[:3])}{' …' if len(owners) > 3 else ''}"
    )
    # A live worker's reaper returns them within a few seconds; still there after a whole lease
    # means nobody is reaping: the fleet is dead (or every worker lost its database).
    if overdue > ctx.settings.lease_seconds:
        return fail(
            "leases",
            summary,
            "no live worker reaps them: start `listener worker` (its reaper returns them to"
            " PENDING at once) and find out why the fleet died (see `workers`)",
            **data,
        )
    return warn("leases", summary, "a worker died: its items are being reaped", **data)


# Past this, the promote step of every live worker (one pass each SWEEP_INTERVAL_SECONDS at the
# latest) would have run: nobody is promoting.
BACKOFF_GRACE_SECONDS = 5.0
BACKOFF_OVERDUE_CAP = 10_000


def check_backoff(ctx: Context) -> Check:
    row = ctx.one("backoff_overdue", cap=BACKOFF_OVERDUE_CAP)
    count, overdue = (int(row[0]), float(row[1])) if row else (0, 0.0)
    data = {"overdue": count, "overdue_seconds": overdue}
    if not count:
        return ok("backoff", "no item past its backoff left out of the claims", **data)
    shown = f"{count:,}+" if count >= BACKOFF_OVERDUE_CAP else f"{count:,}"
    summary = (
        f"{shown} item(s) past their backoff still out of the claims (in_backoff),"
        f" the oldest due {age(overdue)} ago"
    )
    if overdue > ctx.settings.sweep_interval_seconds + BACKOFF_GRACE_SECONDS:
        return fail(
            "backoff",
            summary,
            "no live worker promotes them: start `listener worker` (its promote step puts them"
            " back at once) and see `workers`",
            **data,
        )
    return warn("backoff", summary, "a worker's promote step is catching up", **data)


def check_failures(ctx: Context) -> Check:
    row = ctx.one("recent_failures", cap=RECENT_FAILURES_CAP)
    count, error = (int(row[0]), row[1]) if row else (0, None)
    if not count:
        return ok("failures", "no item FAILED in the last hour", failed_last_hour=0)
    return warn(
        "failures",
        f"{count:,} item(s) FAILED in the last hour; most often: {error}",
        "`listener status` lists a job's failed items with their reason; fix the cause",
        failed_last_hour=count,
        most_common_error=error,
    )


class _Params(Mapping[str, Any]):
    """The claim's parameters for one store; any parameter a newer claim adds reads as NULL,
    so the doctor follows changes of `items.sql` without knowing them."""

    def __init__(self, known: dict[str, Any]) -> None:
        self.known = known

    def __getitem__(self, key: str) -> Any:
        return self.known.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.known)

    def __len__(self) -> int:
        return len(self.known)


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _explain_claim(ctx: Context, params: _Params, seqscan: bool = True) -> dict[str, Any]:
    # EXPLAIN without ANALYZE: the UPDATE is planned, never run (and the session is read-only).
    explain = "EXPLAIN (FORMAT JSON) " + queries("items")["claim"]
    with ctx.conn.transaction(force_rollback=True):
        if not seqscan:
            ctx.conn.execute("SET LOCAL enable_seqscan = off")
        row = ctx.conn.execute(explain, params).fetchone()
    document = row[0] if row else [{}]
    plan: dict[str, Any] = (json.loads(document) if isinstance(document, str) else document)[0]
    return dict(plan["Plan"])


def _is_small(plan: dict[str, Any]) -> bool:
    scans = [n for n in _nodes(plan) if n.get("Relation Name") == "job_items"]
    return any(n.get("Node Type") == "Seq Scan" for n in scans) and all(
        float(n.get("Plan Rows", 0)) < SMALL_TABLE_ROWS and float(n.get("Total Cost", 0)) < 1000
        for n in scans
    )


def check_claim_plan(ctx: Context, backlog: Backlog) -> Check:
    store = backlog.busiest or "listener-doctor-probe"
    settings = ctx.settings
    params = _Params(
        {
            "stores": [store],
            "limits": [settings.max_per_instance],
            "worker_id": "listener-doctor",
            "lease_seconds": settings.lease_seconds,
            "max_payload_bytes": settings.max_payload_bytes,
        }
    )
    plan = _explain_claim(ctx, params)
    small = _is_small(plan)
    if small:
        # On a small table a sequential read is cheapest and the planner rightly takes it; what
        # matters is that the claim can use an index once the backlog grows.
        plan = _explain_claim(ctx, params, seqscan=False)
    nodes = list(_nodes(plan))
    on_items = [n for n in nodes if n.get("Relation Name") == "job_items"]
    seq_scans = [n for n in on_items if n.get("Node Type") == "Seq Scan"]
    indexes = sorted({str(n["Index Name"]) for n in on_items if "Index Name" in n})
    cost = float(plan.get("Total Cost", 0.0))
    data = {"store": store, "indexes": indexes, "cost": cost, "seq_scan": bool(seq_scans)}
    where = f"for store {store}" if backlog.busiest else "(no pending item: a probe store)"
    if small:
        where += "; job_items is small, planned as if large"
    if seq_scans or not indexes:
        return fail(
            "claim plan",
            f"the claim {where} reads job_items sequentially (cost {cost:,.0f}): every claim"
            " reads the whole backlog",
            "check `indexes` above; then ANALYZE job_items; REINDEX TABLE CONCURRENTLY"
            " job_items if an index is bloated",
            **data,
        )
    summary = f"uses {', '.join(indexes)}; cost {cost:,.1f} {where}"
    if cost > CLAIM_COST_WARNING:
        return warn(
            "claim plan", summary, "ANALYZE job_items; REINDEX TABLE CONCURRENTLY job_items", **data
        )
    return ok("claim plan", summary, **data)
