"""An embedded PostgreSQL for a clone with no DATABASE_URL: the demo, a first `listener worker`.

pgserver ships the server binaries in its wheel and runs as root, so nothing is installed on the
machine; the server stops when the last process using it exits.
"""

from __future__ import annotations

import logging
from pathlib import Path

from listener.errors import DatabaseError

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(".pgdata")


def start_embedded(data_dir: Path = DEFAULT_DATA_DIR) -> str:
    """Start (or join) the embedded server in `data_dir`; return its connection URI."""
    import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(  # type: ignore[attr-defined]
            str(data_dir.resolve()), cleanup_mode="stop"
        )
    except Exception as error:  # pgserver raises bare exceptions from its subprocess calls
        raise DatabaseError(
            f"cannot start the embedded PostgreSQL in {data_dir}: {error}"
        ) from error
    uri = str(server.get_uri())
    logger.info("using the embedded PostgreSQL in %s (DATABASE_URL is unset)", data_dir)
    return uri
