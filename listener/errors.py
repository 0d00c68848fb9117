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


class OutcomeRefused(DatabaseError):
    """PostgreSQL refused the data of a batch of outcomes (SQLSTATE class 22 or 23: a value it
    cannot store, a constraint), or it could not even be encoded: writing the same batch again
    cannot help, one of its items is at fault. `reason`: what was refused, on one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"outcome(s) refused: {reason}")
        self.reason = reason


class MigrationError(ListenerError):
    """A migration failed; the message names the file and the statement."""


class PermanentItemError(ListenerError):
    """The item itself is bad (payload, request rejected): retrying cannot help."""


class RetryableItemError(ListenerError):
    """A transient failure (5xx, timeout, connection): the item is retried with backoff."""


class AuthenticationFailed(ListenerError):
    """The OpenAI key was rejected (401/403): every item would fail, so the worker stops."""


class RateLimited(ListenerError):
    """The API answered 429: the whole limiter pauses, the item is tried again, not failed."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
