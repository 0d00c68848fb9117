"""One OpenAI stub's state: its configuration and injectable faults, its request counters, and
the two rate-limit windows (requests and tokens) that decide whether a request is admitted.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import anyio

from listener.stub.batches import BatchStore
from listener.stub.files import FileStore
from listener.stub.text import FLEX_UNAVAILABLE_MARKER
from listener.stub.window import SlidingWindow, ceil_ignoring_float_noise, format_duration


@dataclass
class StubConfig:
    """Server behaviour; fault fields may be mutated while the server runs."""

    latency: float = 0.0
    rpm: int = 0  # 0 = unlimited
    tpm: int = 0  # 0 = unlimited
    window_seconds: float = 60.0
    required_api_key: str | None = None
    fail_next_status: list[int] = field(default_factory=list)
    fail_rate: float = 0.0
    seed: int = 0
    timeout_next: int = 0
    hang_seconds: float = 30.0
    malformed_next: int = 0
    # The Batch API: how long a batch spends in each status (seconds of the batch clock), its
    # completion window, the share of its requests that fail, OpenAI's limits on a file.
    batch_validating_seconds: float = 1.0
    batch_processing_seconds: float = 5.0
    batch_finalizing_seconds: float = 1.0
    batch_cancelling_seconds: float = 1.0
    batch_completion_window_seconds: float = 86_400.0
    batch_error_rate: float = 0.0
    batch_enqueued_token_limit: int = 0  # prompt tokens per model; 0 = unlimited
    batch_max_requests: int = 50_000
    batch_max_bytes: int = 200 * 1024 * 1024
    # service_tier="flex": the share of requests answered "resource unavailable", extra latency.
    flex_unavailable_rate: float = 0.0
    flex_latency: float = 0.0


# What POST /stub/faults may change; not window_seconds, which would make the peak meaningless.
_RUNTIME_FIELDS = frozenset(f.name for f in fields(StubConfig)) - {
    "window_seconds",
    "required_api_key",
}


@dataclass
class Admission:
    """Outcome of a rate-limit check; ``headers`` go on the response either way."""

    allowed: bool
    headers: dict[str, str]
    limit_type: str = ""  # "requests" or "tokens" when refused
    message: str = ""


class StubState:
    """Counters, windows and faults of one stub server; safe because it is loop-confined."""

    def __init__(
        self, config: StubConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or StubConfig()
        self.clock = clock
        self.random = random.Random(self.config.seed)
        self.requests = SlidingWindow(self.config.window_seconds)
        self.tokens = SlidingWindow(self.config.window_seconds)
        self.requests_total = 0
        self.completed_total = 0
        self.rate_limited_total = 0
        self.errors_injected_total = 0
        self.unauthorized_total = 0
        self.flex_total = 0
        self.flex_unavailable_total = 0
        # Files and batches outlive a reset, which is of the counters and windows.
        self.files = FileStore()
        self.batches = BatchStore(self.files)
        # Created lazily: anyio.Event needs a running event loop.
        self._release: anyio.Event | None = None

    def reset(self) -> None:
        self.requests_total = self.completed_total = self.rate_limited_total = 0
        self.errors_injected_total = self.unauthorized_total = 0
        self.flex_total = self.flex_unavailable_total = 0
        self.requests.clear()
        self.tokens.clear()

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "requests_total": self.requests_total,
            "completed_total": self.completed_total,
            "rate_limited_total": self.rate_limited_total,
            "errors_injected_total": self.errors_injected_total,
            "unauthorized_total": self.unauthorized_total,
            "flex_total": self.flex_total,
            "flex_unavailable_total": self.flex_unavailable_total,
            "files": len(self.files),
            "batches": len(self.batches),
            "window_seconds": self.requests.length,
            "max_requests_in_any_window": self.requests.peak,
            "max_tokens_in_any_window": self.tokens.peak,
            "requests_in_window": self.requests.total(now),
            "tokens_in_window": self.tokens.total(now),
        }

    def faults(self) -> dict[str, Any]:
        return {name: getattr(self.config, name) for name in sorted(_RUNTIME_FIELDS)}

    def set_faults(self, updates: dict[str, Any]) -> None:
        unknown = set(updates) - _RUNTIME_FIELDS
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        for name, value in updates.items():
            current = getattr(self.config, name)
            # Coerce now so that a bad JSON value fails this call, not later requests.
            if isinstance(current, list):
                setattr(self.config, name, [int(v) for v in value])
            else:
                setattr(self.config, name, type(current)(value))
        if "seed" in updates:
            self.random.seed(self.config.seed)

    def flex_unavailable(self, prompt: str) -> bool:
        """Whether a flex request finds no capacity: by its marker, or by the seeded rate."""
        if FLEX_UNAVAILABLE_MARKER in prompt:
            return True
        rate = self.config.flex_unavailable_rate
        return rate > 0 and self.random.random() < rate

    def admit(self, model: str, cost: int) -> Admission:
        """Check both limits and record the request if admitted; must not await inside."""
        now = self.clock()
        for kind, limit, window, weight in self._limits(cost):
            wait = window.wait_until_fits(now, weight, limit) if limit > 0 else 0.0
            if wait > 0:
                headers = self.limit_headers(now)
                headers["retry-after"] = str(ceil_ignoring_float_noise(wait))
                headers["retry-after-ms"] = str(ceil_ignoring_float_noise(wait * 1000))
                message = (
                    f"Rate limit reached for {model} in organization org-stub on {kind} per "
                    f"min ({kind[0].upper()}PM): Limit {limit}, Used {window.total(now)}, "
                    f"Requested {weight}. Please try again in {format_duration(wait)}."
                )
                return Admission(False, headers, kind, message)
        self.requests.add(now, 1)
        self.tokens.add(now, cost)
        return Admission(True, self.limit_headers(now))

    def _limits(self, cost: int) -> list[tuple[str, int, SlidingWindow, int]]:
        return [
            ("requests", self.config.rpm, self.requests, 1),
            ("tokens", self.config.tpm, self.tokens, cost),
        ]

    def limit_headers(self, now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers; 'reset' is when the window fully drains."""
        headers: dict[str, str] = {}
        for kind, limit, window, _ in self._limits(0):
            if limit > 0:
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - window.total(now)))
                headers[f"x-ratelimit-reset-{kind}"] = format_duration(window.time_until_empty(now))
        return headers

    async def hang(self, seconds: float) -> None:
        """Sleep like a stuck upstream, but let server shutdown cut it short."""
        if self._release is None:
            self._release = anyio.Event()
        with anyio.move_on_after(seconds):
            await self._release.wait()

    def release_hung(self) -> None:
        if self._release is not None:
            self._release.set()
