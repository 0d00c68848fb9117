"""A fair, event-driven job worker on PostgreSQL.

For apps that create jobs: `from listener import enqueue` (or `enqueue_async`). For apps that
serve kinds of their own: `App`, `Item`, `Result` and the errors that steer an item
(`listener.handler` says how). Importing the package loads the producer and the handler seam
only (psycopg), nothing of the worker.
"""

# The one place the version is written: setuptools reads it for the distribution's metadata
# (pyproject.toml's dynamic version), `listener --version` prints it.
__version__ = "0.1.0"

from listener.errors import BudgetExhausted, DeferItem, FailItem, RetryItem, StopWorker
from listener.handler import App, Budget, Item, Kind, Result
from listener.producer import InvalidJob, enqueue, enqueue_async

__all__ = [
    "App",
    "Budget",
    "BudgetExhausted",
    "DeferItem",
    "FailItem",
    "InvalidJob",
    "Item",
    "Kind",
    "Result",
    "RetryItem",
    "StopWorker",
    "__version__",
    "enqueue",
    "enqueue_async",
]
