"""`listener …` / `python -m listener …`: the operator's entry points."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from listener import redact
from listener.database import database_url
from listener.errors import ConfigurationError, ListenerError, UsageError, one_line
from listener.settings import Settings, load_settings

EXIT_CONFIG = 2
EXIT_FAILURE = 1

logger = logging.getLogger("listener")


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stdout,
    )
    # The HTTP clients log every request at INFO; that drowns the operator's lines.
    for noisy in ("httpx", "httpcore", "openai", "uvicorn.access", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # On the handlers, not the loggers: they see every record, whichever logger it comes from.
    redact.install_filter(logging.getLogger().handlers)


def _settings(args: argparse.Namespace, settings: Settings) -> int:
    for line in redact.settings_lines(settings):
        _say(line)
    return 0


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from listener import migrate

    url = database_url(settings)
    runner = migrate.MigrationRunner(url, output=_say)
    if args.action == "up" and args.plan:
        from listener.locks import plan_migrations

        plan_migrations(url, output=_say)
    elif args.action == "up":
        runner.up()
    elif args.action == "down":
        runner.down(args.count)
    elif args.action == "status":
        rows = runner.status()
        if args.verbose and not all(applied for _name, applied in rows):
            from listener.locks import plan_migrations

            plan_migrations(url, output=_say)
    elif args.action == "diff":
        diff = migrate.diff_against_schema(url)
        _say(diff.rstrip() if diff else "-- the database matches sql/schema.sql")
    elif args.action == "check":
        diff = migrate.check_migrations(url)
        if diff:
            _say("the migrations do not reach sql/schema.sql; the difference:")
            _say(diff.rstrip())
            return EXIT_FAILURE
        _say("migrations are in step with sql/schema.sql")
    return 0


def _stub(args: argparse.Namespace, settings: Settings) -> int:
    from listener.stub import server as stub

    return stub.main_from_args(args)


Handler = Callable[[argparse.Namespace, Settings], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="listener", description=__doc__)
    subcommands = parser.add_subparsers(dest="command", required=True)

    migrate = subcommands.add_parser("migrate", help="apply, revert, inspect the schema migrations")
    actions = migrate.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="apply every pending migration")
    up.add_argument(
        "--plan",
        action="store_true",
        help="apply nothing: print each pending statement and the locks it takes",
    )
    down = actions.add_parser("down", help="revert the last N migrations (default 1)")
    down.add_argument("count", nargs="?", type=int, default=1)
    status = actions.add_parser("status", help="list migrations as [COMPLETED] or [PENDING]")
    status.add_argument(
        "-v", "--verbose", action="store_true", help="and the locks of each pending statement"
    )
    actions.add_parser("diff", help="print the SQL that turns the database into sql/schema.sql")
    actions.add_parser("check", help="fail when the migrations do not reach sql/schema.sql")
    migrate.set_defaults(handler=_migrate)

    from listener.stub import server as stub

    stub_parser = subcommands.add_parser(
        "stub-openai", help="a local OpenAI-compatible stub server"
    )
    stub.add_arguments(stub_parser)
    stub_parser.set_defaults(handler=_stub)

    subcommands.add_parser(
        "settings", help="print every effective setting as NAME=value, secrets as ***"
    ).set_defaults(handler=_settings)

    from listener import commands, doctor
    from listener.demo import run as demo
    from listener.http import app as http

    for module in (commands, http, demo, doctor):
        module.register(subcommands)
    return parser


def _fail(error: BaseException) -> None:
    """One line: psycopg's messages span several ("Is the server running on that host…")."""
    sys.stderr.write(f"listener: {redact.redact(one_line(error))}\n")


def unwrap(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigurationError as error:
        sys.stderr.write(f"listener: {error}\n")
        return EXIT_CONFIG
    redact.remember(settings)
    # A bug's traceback may quote a connection string or a request's headers.
    sys.excepthook = redact.excepthook
    setup_logging(settings.log_level)
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except (ConfigurationError, UsageError) as error:
        _fail(error)
        return EXIT_CONFIG
    except ListenerError as error:
        _fail(error)
        return EXIT_FAILURE
    except BaseExceptionGroup as group:
        # A task group wraps the one error that stopped it; the operator wants that line.
        inner = unwrap(group)
        if isinstance(inner, ListenerError):
            _fail(inner)
            usage = isinstance(inner, ConfigurationError | UsageError)
            return EXIT_CONFIG if usage else EXIT_FAILURE
        raise
    except KeyboardInterrupt:
        return 130
