"""Why a store or a job is waiting, in words: the answer to "my job is stuck".

Pure: the facts come from one snapshot (the database's clock included), the sentences out. The
reasons are listed most decisive first: no worker at all beats a paused store, which beats the
budget's pause, and so on down to simply waiting one's turn in the ring.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Policy:
    """A store's row of the store policy (no row: the defaults)."""

    weight: int = 1
    rpm_limit: int | None = None
    max_in_flight: int | None = None
    paused: bool = False
    # Its rpm_limit's next start (the GCRA time in `store_throttles`): later than now means over.
    rpm_next: datetime | None = None


DEFAULT_POLICY = Policy()


@dataclass(frozen=True)
class Hold:
    """An item a worker holds now (PROCESSING under a lease)."""

    item_id: int
    job_id: int
    instance_id: str
    worker_id: str
    lease_expires_at: datetime | None


@dataclass(frozen=True)
class BatchState:
    """One of our OpenAI batches not finished yet (`openai_batches`)."""

    id: int
    openai_batch_id: str | None
    state: str  # ours: collected, uploaded, submitting, submitted
    status: str | None  # OpenAI's: validating, in_progress, finalizing, ...
    created_at: datetime
    submitted_at: datetime | None


@dataclass(frozen=True)
class Situation:
    """The fleet-wide facts every answer depends on."""

    now: datetime
    live_workers: int
    budget_paused_until: datetime | None
    ready_stores: int
    # worker_id -> "host pid 123": the name an operator recognises.
    worker_names: Mapping[str, str]
    # Our OpenAI batches not finished yet, by our id.
    batches: Mapping[int, BatchState] = field(default_factory=dict)


def when(moment: datetime, now: datetime) -> str:
    """`00:41:07 UTC (in 12 s)`: the time, and how far it is from the database's now."""
    seconds = (moment - now).total_seconds()
    clock = moment.strftime("%H:%M:%S UTC")
    if seconds >= 0:
        return f"{clock} (in {_duration(seconds)})"
    return f"{clock} ({_duration(-seconds)} ago)"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def holds_in_words(holds: Iterable[Hold], situation: Situation) -> list[str]:
    """`2 item(s) held by worker host pid 12, lease ends 00:41:07 UTC (in 40 s)`, per worker."""
    by_worker: dict[str, list[Hold]] = {}
    for hold in holds:
        by_worker.setdefault(hold.worker_id, []).append(hold)
    sentences = []
    for worker_id, held in sorted(by_worker.items()):
        name = situation.worker_names.get(worker_id)
        if name is None:
            who = f"worker {worker_id}, which sends no heartbeat (dead?)"
        else:
            who = f"worker {name}"
        leases = [h.lease_expires_at for h in held if h.lease_expires_at is not None]
        lease = f", lease ends {when(max(leases), situation.now)}" if leases else ""
        sentences.append(f"{len(held)} item(s) held by {who}{lease}")
    return sentences


def waiting_reasons(
    situation: Situation,
    *,
    pending: int,
    ready: int,
    backoff_until: datetime | None,
    in_flight: int,
    policy: Policy,
    instance_id: str,
) -> list[str]:
    """Why a store's (or a job's) PENDING items do not start now; [] when nothing waits."""
    if pending == 0:
        return []
    reasons = []
    if situation.live_workers == 0:
        reasons.append("no live worker: no process sent a heartbeat in the last 15 s")
    if policy.paused:
        reasons.append(f"paused: `listener store resume {instance_id}` or Resume lets it go on")
    if situation.budget_paused_until is not None:
        reasons.append(
            "the shared budget is paused by a 429 from OpenAI until "
            + when(situation.budget_paused_until, situation.now)
        )
    if policy.max_in_flight is not None and in_flight >= policy.max_in_flight:
        reasons.append(
            f"at its cap: {in_flight} of at most {policy.max_in_flight} item(s) in flight; "
            "the next starts when one finishes"
        )
    if (
        policy.rpm_limit is not None
        and policy.rpm_next is not None
        and policy.rpm_next > situation.now
    ):
        reasons.append(
            f"over its cap of {policy.rpm_limit} item(s) a minute until "
            + when(policy.rpm_next, situation.now)
        )
    if ready == 0 and backoff_until is not None:
        reasons.append(f"in backoff after a failed try until {when(backoff_until, situation.now)}")
    if not reasons and ready > 0:
        others = max(0, situation.ready_stores - 1)
        if others:
            reasons.append(
                f"waiting its turn: {others} other store(s) with ready work share the budget "
                "round robin"
            )
        else:
            reasons.append("next in line: the next free budget slot is its")
    return reasons


def batch_in_words(items: int, batch_id: int | None, others: int, situation: Situation) -> str:
    """`40 item(s) in OpenAI batch batch_abc, submitted 12 min ago, validating`."""
    batch = situation.batches.get(batch_id) if batch_id is not None else None
    more = f" (and {others} other batch(es))" if others > 0 else ""
    if batch is None:
        return f"{items} item(s) in an OpenAI batch being written{more}"
    if batch.state == "submitted" and batch.submitted_at is not None:
        ago = _duration(max(0.0, (situation.now - batch.submitted_at).total_seconds()))
        status = batch.status or "status not read yet"
        return (
            f"{items} item(s) in OpenAI batch {batch.openai_batch_id}, submitted {ago} ago, "
            f"{status}{more}"
        )
    doing = {
        "collected": "collected, its file to be uploaded",
        "uploaded": "uploaded, to be submitted (it waits while the enqueued-token limit is full)",
        "submitting": "being submitted to OpenAI",
    }.get(batch.state, batch.state)
    return f"{items} item(s) in batch {batch.id} of ours, {doing}{more}"


def batch_pending_in_words(pending: int) -> str:
    return (
        f"{pending} item(s) of the batch tier wait to be collected into an OpenAI batch "
        "(each BATCH_POLL_SECONDS)"
    )
