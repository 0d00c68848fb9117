"""An embedded PostgreSQL, when asked for: the demo with no DATABASE_URL, and a command given
`--embedded` (or LISTENER_EMBEDDED=1).

pgserver ships the server binaries in its wheel (the `embedded` extra, which a production
install leaves out) and runs as root, so nothing is installed on the machine; the server stops
when the last process using it exits.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from listener.errors import ConfigurationError, DatabaseError

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(".pgdata")
MISSING_EXTRA = (
    "the embedded PostgreSQL needs the embedded extra: pip install 'fair-pg-worker[embedded]'"
    " (or set DATABASE_URL)"
)


def _forget_dead_users(data_dir: Path) -> None:
    """pgserver stops the server when the last process in its list exits, but a process killed
    with SIGKILL stays in the list for ever, and the server would then outlive every later run.
    """
    from pgserver.postgres_server import PostgresServer

    pids_file = data_dir / ".handle_pids.json"
    with PostgresServer._lock:
        try:
            pids = json.loads(pids_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(pids, list):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and _is_alive(pid)]
        if alive != pids:
            pids_file.write_text(json.dumps(alive), encoding="utf-8")


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_embedded(data_dir: Path = DEFAULT_DATA_DIR) -> str:
    """Start (or join) the embedded server in `data_dir`; return its connection URI."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers); pgserver copes.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        try:
            import pgserver
        except ImportError:
            raise ConfigurationError(MISSING_EXTRA) from None

    data_dir.mkdir(parents=True, exist_ok=True)
    _forget_dead_users(data_dir)
    try:
        server = pgserver.get_server(  # type: ignore[attr-defined]
            str(data_dir.resolve()), cleanup_mode="stop"
        )
    except Exception as error:  # pgserver raises bare exceptions from its subprocess calls
        raise DatabaseError(
            f"cannot start the embedded PostgreSQL in {data_dir}: {error}"
        ) from error
    uri = str(server.get_uri())
    logger.info("using the embedded PostgreSQL in %s", data_dir)
    return uri
