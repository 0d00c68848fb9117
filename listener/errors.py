"""The project's error types: one base, precise subclasses, psycopg wrapped at the boundary."""

from __future__ import annotations


def one_line(error: BaseException | str) -> str:
    """An error's message on one line: libpq's span several ("Is the server running…")."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    if text or isinstance(error, str):
        return text
    return type(error).__name__


class ListenerError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigurationError(ListenerError):
    """A setting is missing or invalid; the message names it."""


class UsageError(ListenerError):
    """A command's argument is invalid; the message names it (exit code 2, like a setting)."""


class DatabaseError(ListenerError):
    """The database could not be reached or refused a statement."""


class MigrationError(ListenerError):
    """A migration failed; the message names the file and the statement."""


# The errors a handler raises to steer its item. The engine acts on the error alone, whoever
# raised it: an OpenAI handler, a user's own, a test's.


class FailItem(ListenerError):
    """The item itself is bad (payload, request rejected): it ends FAILED with this reason, at
    once, whatever attempts it has left."""


class RetryItem(ListenerError):
    """A transient failure (5xx, timeout, connection): the item is tried again, with backoff or
    after `after` seconds, until its kind's max attempts; then it ends FAILED with the reason."""

    def __init__(self, reason: str, after: float | None = None) -> None:
        super().__init__(reason)
        self.after = after


class BudgetExhausted(ListenerError):
    """The budget the item draws from is spent for `retry_after` seconds (a 429): every process
    drawing from it pauses, and the item is tried again in place, its attempt not counted."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class StopWorker(ListenerError):
    """Every item would fail the same way (a rejected API key, an unknown model): the process
    stops (exit code 3) and its items go back to PENDING for a process configured right."""
