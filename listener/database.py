"""Which database a command talks to: DATABASE_URL (or `--database-url`), or the embedded server
when asked for with `--embedded` (or LISTENER_EMBEDDED=1); never the embedded one by surprise.

An operator's `store pause X` or `api` with DATABASE_URL unset used to run against a fresh local
`.pgdata` and exit 0, pausing nothing anyone sees: with neither set, a command stops here."""

from __future__ import annotations

import logging

from listener.errors import ConfigurationError
from listener.settings import Settings

logger = logging.getLogger(__name__)

NO_DATABASE = (
    "invalid setting DATABASE_URL: not set (set it or pass --database-url; --embedded, or "
    "LISTENER_EMBEDDED=1, uses a local embedded PostgreSQL instead)"
)


def database_url(settings: Settings) -> str:
    """The configured database, or the embedded one when it was asked for."""
    if settings.database_url:
        return settings.database_url
    if not settings.listener_embedded:
        raise ConfigurationError(NO_DATABASE)
    from listener.embedded import start_embedded

    return start_embedded()


def resolve_database(settings: Settings) -> str:
    """`database_url`, with the embedded server migrated up (a fresh one has no tables)."""
    url = database_url(settings)
    if not settings.database_url:
        from listener.migrate import MigrationRunner

        MigrationRunner(url, output=lambda line: logger.info("%s", line)).up()
    return url
