"""What every step of the batch path works with: its connection (holding the step's lock), the
OpenAI client, the settings, the served app and the crash tests' checkpoint."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import openai

from listener.attempt import retry_outcome
from listener.batches.store import Connection
from listener.errors import RetryItem
from listener.handler import App
from listener.items import ClaimedItem, Outcome
from listener.settings import Settings

# Called after each call to OpenAI ("api:<call>") and each commit ("commit:<what>"): the crash
# tests SIGKILL the process there (tests/batch_then_die.py).
Checkpoint = Callable[[str], None]


def no_checkpoint(_where: str) -> None:
    return None


@dataclass
class Context:
    conn: Connection
    client: openai.AsyncOpenAI
    settings: Settings
    app: App
    checkpoint: Checkpoint = no_checkpoint
    rng: random.Random = field(default_factory=random.Random)

    def max_attempts(self, kind: str) -> int:
        limit = self.app[kind].max_attempts if kind in self.app else None
        return limit or self.settings.max_attempts

    def retry(self, item: ClaimedItem, reason: str) -> Outcome:
        """A retry by the real-time rule (backoff, FAILED at max attempts), in a later batch."""
        error = RetryItem(reason)
        return retry_outcome(item, error, self.max_attempts(item.kind), self.settings, self.rng)

    def committed(self) -> None:
        self.checkpoint("commit:outcomes")
