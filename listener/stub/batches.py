"""The stub's batches: each one's life as a function of the batch clock, and the output and
error files it writes when it ends. Kept in memory, like the files.

A batch's times are fixed when it is created (validating, in progress, finalizing, each for
its configured seconds; expiry at the end of its completion window) or cancelled, and its
status at any moment follows from them, so nothing runs in the background: every read first
settles the batches that have ended, writing their files. The clock is the wall clock plus an
offset that POST /stub/batches/advance moves forward, so tests can make hours pass at once.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from listener.stub.batch_input import BatchError, BatchInput, unfinished_line
from listener.stub.files import FileStore

ENQUEUED = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})
_UNFINISHED = {
    "expired": (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
    "cancelled": ("batch_cancelled", "This request was cancelled before it could be executed."),
}


@dataclass(frozen=True)
class Timing:
    """A batch's durations in seconds, read from the configuration when it is created."""

    validating: float
    processing: float
    finalizing: float
    cancelling: float
    window: float


@dataclass
class Batch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    created: float
    timing: Timing
    input: BatchInput
    rng: random.Random  # the batch's own: the output's order depends on the seed only
    failure: list[BatchError] = field(default_factory=list)
    cancel_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    settled: bool = False

    @property
    def validated_at(self) -> float:
        return self.created + self.timing.validating

    @property
    def processed_at(self) -> float:
        return self.validated_at + self.timing.processing

    @property
    def expires_at(self) -> float:
        return self.created + self.timing.window

    @property
    def size(self) -> int:
        return len(self.input.answers)

    def end(self) -> tuple[str, float]:
        """The status it ends in and when."""
        if self.cancel_at is not None:
            return "cancelled", self.cancel_at + self.timing.cancelling
        if self.failure:
            return "failed", self.validated_at
        finished = self.processed_at + self.timing.finalizing
        return (
            ("completed", finished) if finished <= self.expires_at else ("expired", self.expires_at)
        )

    def status(self, now: float) -> str:
        status, at = self.end()
        if now >= at:
            return status
        if self.cancel_at is not None and now >= self.cancel_at:
            return "cancelling"
        if now < self.validated_at:
            return "validating"
        return "in_progress" if now < self.processed_at else "finalizing"

    def _cut_at(self) -> float:
        """When a cancel or the expiry stops it (infinity when neither does)."""
        cancelled = math.inf if self.cancel_at is None else self.cancel_at
        return min(cancelled, self.expires_at)

    def ran(self, now: float) -> int:
        """How many requests (the first ones in file order) have run by `now`."""
        t = min(now, self._cut_at(), self.processed_at)
        if self.failure or t < self.validated_at:
            return 0
        if t >= self.processed_at:
            return self.size
        share = (t - self.validated_at) / self.timing.processing
        # Rounded first: sums of times near 1.8e9 s and fractional durations can carry float
        # noise, and an expiry at exactly half the processing must run half of the requests.
        return min(self.size, math.floor(round(self.size * share, 6)))

    def settle(self, files: FileStore) -> None:
        """Write its output file (the successes, shuffled) and error file (the rest)."""
        status, at = self.end()
        ran = self.ran(at)
        outputs = [a.line for a in self.input.answers[:ran] if a.ok]
        errors = [a.line for a in self.input.answers[:ran] if not a.ok]
        if status in _UNFINISHED:
            code, message = _UNFINISHED[status]
            errors += [
                unfinished_line(a.custom_id, code, message) for a in self.input.answers[ran:]
            ]
        # Shuffled, as OpenAI promises no order: consumers match lines by custom_id.
        self.rng.shuffle(outputs)
        self.rng.shuffle(errors)
        if outputs:
            name = f"{self.id}_output.jsonl"
            self.output_file_id = files.add(name, "batch_output", _jsonl(outputs), int(at)).id
        if errors:
            name = f"{self.id}_error.jsonl"
            self.error_file_id = files.add(name, "batch_output", _jsonl(errors), int(at)).id
        self.settled = True

    def as_json(self, now: float) -> dict[str, Any]:
        """The Batch object the `openai` client parses."""
        status = self.status(now)
        ended, end_at = self.end()
        # Counted once validated; a batch cancelled while validating counts its requests failed.
        counted = status != "failed" and (now >= self.validated_at or status in TERMINAL)
        ran = self.ran(now)
        ok = self.input.ok_before[ran]
        failed = (self.size - ok) if status in ("expired", "cancelled") else ran - ok
        boundary = self._cut_at()
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.input.model,
            "errors": (
                {"object": "list", "data": [e.as_json() for e in self.failure]}
                if status == "failed"
                else None
            ),
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created),
            "in_progress_at": _at(
                self.validated_at, now, not self.failure and self.validated_at <= boundary
            ),
            "expires_at": int(self.expires_at),
            "finalizing_at": _at(
                self.processed_at, now, not self.failure and self.processed_at <= boundary
            ),
            "completed_at": _at(end_at, now, ended == "completed"),
            "failed_at": _at(end_at, now, ended == "failed"),
            "expired_at": _at(end_at, now, ended == "expired"),
            "cancelling_at": None if self.cancel_at is None else int(self.cancel_at),
            "cancelled_at": _at(end_at, now, ended == "cancelled"),
            "request_counts": {
                "total": self.size if counted else 0,
                "completed": ok if counted else 0,
                "failed": failed if counted else 0,
            },
            "usage": self._usage(ran) if counted else None,
            "metadata": self.metadata,
        }

    def _usage(self, ran: int) -> dict[str, Any]:
        prompt = self.input.prompt_before[ran]
        completion = self.input.completion_before[ran]
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }


def _at(moment: float, now: float, happens: bool) -> int | None:
    return int(moment) if happens and now >= moment else None


def _jsonl(lines: list[str]) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode()


class CannotCancel(ValueError):
    """The batch has ended (a 409)."""


class BatchStore:
    """Batches by id, newest last; loop-confined, so every method runs without awaiting."""

    def __init__(self, files: FileStore, clock: Callable[[], float] = time.time) -> None:
        self.files = files
        self.offset = 0.0  # seconds POST /stub/batches/advance has added to the clock
        self._clock = clock
        self._batches: dict[str, Batch] = {}
        self._numbers = 0

    def now(self) -> float:
        return self._clock() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        self.settle()

    def next_number(self) -> int:
        """A number for the next batch's randomness, taken before its input is read."""
        self._numbers += 1
        return self._numbers

    def settle(self) -> float:
        """Write the files of the batches that have ended; the moment it settled them at, which
        is what their JSON is to be made at (a later moment may have ended another)."""
        now = self.now()
        for batch in self._batches.values():
            if not batch.settled and now >= batch.end()[1]:
                batch.settle(self.files)
        return now

    def as_json(self, batch: Batch) -> dict[str, Any]:
        return batch.as_json(self.settle())

    def enqueued_tokens(self, model: str) -> int:
        """Prompt tokens of this model's batches that have not ended (the enqueued limit's)."""
        now = self.now()
        return sum(
            b.input.prompt_tokens
            for b in self._batches.values()
            if b.input.model == model and not b.failure and b.status(now) in ENQUEUED
        )

    def add(self, batch: Batch, token_limit: int) -> Batch:
        """Store a new batch; it is to fail at validation when its file is invalid or its
        tokens would take the model's enqueued tokens past `token_limit` (0: no limit)."""
        batch.failure = list(batch.input.errors)
        model = batch.input.model
        if not batch.failure and model is not None and token_limit > 0:
            enqueued = self.enqueued_tokens(model)
            if enqueued + batch.input.prompt_tokens > token_limit:
                message = (
                    f"Enqueued token limit reached for {model} in organization org-stub. "
                    f"Limit: {token_limit} enqueued tokens, {enqueued} already enqueued, "
                    f"{batch.input.prompt_tokens} in this batch. Please try submitting your "
                    "requests in smaller batches or try again once your in-progress batches "
                    "complete."
                )
                batch.failure = [BatchError("token_limit_exceeded", message)]
        self._batches[batch.id] = batch
        return batch

    def get(self, batch_id: str) -> Batch | None:
        return self._batches.get(batch_id)

    def page(self, limit: int, after: str | None) -> tuple[list[Batch], bool]:
        """Up to `limit` batches newest first, after the one named `after`; and whether more."""
        newest_first = list(reversed(self._batches.values()))
        if after is not None:
            ids = [b.id for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        return newest_first[:limit], len(newest_first) > limit

    def cancel(self, batch_id: str) -> Batch | None:
        batch = self.get(batch_id)
        if batch is None:
            return None
        now = self.now()
        status = batch.status(now)
        if status in TERMINAL:
            raise CannotCancel(f"Cannot cancel a batch with status '{status}'.")
        if batch.cancel_at is None:
            batch.cancel_at = now
        return batch

    def __len__(self) -> int:
        return len(self._batches)


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex[:24]}"
