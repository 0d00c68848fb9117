"""The project's error types: one base, precise subclasses, psycopg wrapped at the boundary."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import psycopg

P = ParamSpec("P")
T = TypeVar("T")


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


class DeferItem(ListenerError):
    """Not now, and not the item's fault (flex capacity unavailable): the item goes back to
    PENDING for `after` seconds with its attempt given back, and its next attempt is claimed
    like any other (taking a budget slot). `Item.deferred_since` then says since when its
    handler has been deferring it, so the handler can stop waiting after a while."""

    def __init__(self, reason: str, after: float) -> None:
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


def wrap(error: psycopg.Error, doing: str) -> DatabaseError:
    """The one place psycopg errors become ours, on one line.

    A server's error is its primary message: the rest of psycopg's text is the statement's
    `LINE 8: FROM job_items j` and a caret on lines of their own, and a DETAIL may quote a whole
    row (a payload). A client's error (a connection lost) has no such parts: all of it, joined.
    """
    return DatabaseError(f"{doing}: {error.diag.message_primary or one_line(error)}")


def database_call(
    doing: str,
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """An engine function that runs SQL: a psycopg error it lets out (a pool timeout included)
    comes out as our DatabaseError saying what failed (`wrap`), so no caller sees psycopg's and
    no function repeats the conversion."""

    def decorate(function: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(function)
        async def call(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return await function(*args, **kwargs)
            except psycopg.Error as error:
                raise wrap(error, doing) from error

        return call

    return decorate
