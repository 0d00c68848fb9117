"""Which database a command talks to: DATABASE_URL, or an embedded server when it is unset."""

from __future__ import annotations

import logging

from listener.settings import Settings

logger = logging.getLogger(__name__)


def database_url(settings: Settings) -> str:
    """The configured database, or the embedded one when DATABASE_URL is unset."""
    if settings.database_url:
        return settings.database_url
    from listener.embedded import start_embedded

    return start_embedded()


def resolve_database(settings: Settings) -> str:
    """DATABASE_URL, or an embedded server (migrated up) when it is unset."""
    url = database_url(settings)
    if not settings.database_url:
        from listener.migrate import MigrationRunner

        MigrationRunner(url, output=lambda line: logger.info("%s", line)).up()
    return url
