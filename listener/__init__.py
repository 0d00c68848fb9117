"""A fair, event-driven job worker on PostgreSQL.

For apps that create jobs: `from listener import enqueue` (or `enqueue_async`). Importing the
package loads the producer only (psycopg), nothing of the worker.
"""

from listener.producer import InvalidJob, enqueue, enqueue_async

__all__ = ["InvalidJob", "enqueue", "enqueue_async"]
