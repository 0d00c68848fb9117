"""A fair, event-driven job worker on PostgreSQL.

For apps that create jobs: `from listener import enqueue` (or `enqueue_async`). Importing the
package loads the producer only (psycopg), nothing of the worker.
"""

# The one place the version is written: setuptools reads it for the distribution's metadata
# (pyproject.toml's dynamic version), `listener --version` prints it.
__version__ = "0.1.0"

from listener.producer import InvalidJob, enqueue, enqueue_async

__all__ = ["InvalidJob", "enqueue", "enqueue_async"]
