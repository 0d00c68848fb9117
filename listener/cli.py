"""listener: a fair, event-driven job worker on PostgreSQL (`listener …` or `python -m listener …`).

Every command reads its settings from the environment and `.env` (`listener settings` prints
them); the database is DATABASE_URL or --database-url, or a local embedded one with --embedded."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import textwrap
from collections.abc import Callable, Generator, Iterator, Sequence

import psycopg

from listener import __version__, redact
from listener.database import database_url
from listener.errors import (
    ConfigurationError,
    DatabaseError,
    ListenerError,
    StopWorker,
    UsageError,
    one_line,
)
from listener.settings import (
    Settings,
    UncheckedSettings,
    load_settings,
    load_unchecked_settings,
    relation_errors,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

EXIT_CODES = f"""\
exit codes:
  {EXIT_OK:<5}done
  {EXIT_FAILURE:<5}a check or a lookup failed (migrate check, doctor, status of an unknown job)
  {EXIT_CONFIG:<5}bad usage or a bad setting (one line names it)
  {EXIT_UNAVAILABLE:<5}the database cannot be reached or used (it refused the connection or a
       statement, or has no schema), or the worker's OpenAI key was rejected
  {EXIT_INTERRUPTED:<5}interrupted (Ctrl-C)"""

# Every command in one of three groups, in the order `--help` lists them.
GROUPS = {
    "operate": ("worker", "api", "migrate", "enqueue", "store", "cancel", "retry", "prune"),
    "inspect": ("status", "doctor", "settings"),
    "develop": ("demo", "stub-openai"),
}

LISTING_WIDTH = 100
# Commands that never open a database take no --database-url nor --embedded after their name.
WITHOUT_DATABASE = frozenset({"stub-openai"})

logger = logging.getLogger("listener")


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each argument's default after its help (argparse's ArgumentDefaultsHelpFormatter, less
    its noise: nothing for a required argument, a flag, or an option with no default, nor when
    the help already says its default); the epilogs' tables as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        quiet = (
            action.required
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or "default" in text
            or not (action.option_strings or action.nargs in ("?", "*"))
        )
        return text if quiet else f"{text} (default: %(default)s)"

    def _iter_indented_subactions(
        self, action: argparse.Action
    ) -> Generator[argparse.Action, None, None]:
        # The top level's commands are listed by group in its epilog (`command_listing`).
        if action.dest != "command":
            yield from super()._iter_indented_subactions(action)


def add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes, before or after its name (`listener --embedded status`
    or `listener status --embedded`). A subcommand's copy defaults to SUPPRESS, so it never
    overwrites what was given before the command."""
    default = None if top else argparse.SUPPRESS
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--database-url",
        metavar="URL",
        default=default,
        help="the PostgreSQL to use (env: DATABASE_URL)",
    )
    where.add_argument(
        "--embedded",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="use a local embedded PostgreSQL in .pgdata (env: LISTENER_EMBEDDED=1; needs the"
        " embedded extra)",
    )


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
    return EXIT_OK


def settings_despite_relations(overrides: dict[str, object]) -> int:
    """`listener settings` when a relation between settings fails: every value still, the
    settings named by a failing relation marked, then exit 2 (each value alone must parse)."""
    unchecked: UncheckedSettings = load_unchecked_settings(**overrides)
    redact.remember(unchecked)
    problems = relation_errors(unchecked)
    for line in redact.settings_lines(unchecked):
        name = line.partition("=")[0]
        marks = [problem for problem in problems if re.search(rf"\b{name}\b", problem)]
        _say(f"{line}    # ✗ {marks[0]}" if marks else line)
    sys.stderr.write(f"listener: invalid settings: {problems[0]}\n")
    return EXIT_CONFIG


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
    return EXIT_OK


def _stub(args: argparse.Namespace, settings: Settings) -> int:
    from listener.stub import server as stub

    return stub.main_from_args(args)


Handler = Callable[[argparse.Namespace, Settings], int]


def _register_migrate(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = subcommands.add_parser("migrate", help="apply, revert, inspect the schema migrations")
    actions = migrate.add_subparsers(
        dest="action", required=True, metavar="ACTION", help="one of the actions below"
    )
    up = actions.add_parser("up", help="apply every pending migration")
    up.add_argument(
        "--plan",
        action="store_true",
        help="apply nothing: print each pending statement and the locks it takes",
    )
    down = actions.add_parser("down", help="revert the last N migrations")
    down.add_argument("count", nargs="?", type=int, default=1, help="how many to revert")
    status = actions.add_parser("status", help="list migrations as [COMPLETED] or [PENDING]")
    status.add_argument(
        "-v", "--verbose", action="store_true", help="and the locks of each pending statement"
    )
    actions.add_parser("diff", help="print the SQL that turns the database into sql/schema.sql")
    actions.add_parser("check", help="fail when the migrations do not reach sql/schema.sql")
    migrate.set_defaults(handler=_migrate)


def _register_own(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The commands this module runs: migrate, stub-openai, settings."""
    _register_migrate(subcommands)

    from listener.stub import server as stub

    stub_parser = subcommands.add_parser(
        "stub-openai", help="a local OpenAI-compatible stub server"
    )
    stub.add_arguments(stub_parser)
    stub_parser.set_defaults(handler=_stub)

    subcommands.add_parser(
        "settings",
        help="print every effective setting as NAME=value, secrets as ***; exit 2, the bad ones"
        " marked, when a relation between them fails",
    ).set_defaults(handler=_settings)


def _subparsers(
    parser: argparse.ArgumentParser,
) -> Iterator[argparse._SubParsersAction[argparse.ArgumentParser]]:
    # argparse keeps a parser's subcommands among its private actions, and offers no other way.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield action


def _every_command(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    for action in _subparsers(parser):
        for sub in action.choices.values():
            yield sub
            yield from _every_command(sub)


def command_listing(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> str:
    """The commands by group with their one-line help, for the top-level `--help`."""
    helps = {choice.dest: choice.help or "" for choice in subcommands._choices_actions}
    grouped = [name for names in GROUPS.values() for name in names]
    unknown = sorted(set(subcommands.choices) - set(grouped))
    if unknown:
        raise AssertionError(f"commands in no group of cli.GROUPS: {unknown}")
    indent = " " * (max(len(name) for name in grouped) + 4)
    lines = []
    for group, names in GROUPS.items():
        lines.append(f"{group} commands:")
        for name in names:
            first = f"  {name:<{len(indent) - 2}}{helps.get(name, '')}"
            lines += textwrap.wrap(first, width=LISTING_WIDTH, subsequent_indent=indent)
        lines.append("")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="listener",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"listener {__version__}")
    add_global_options(parser, top=True)
    # The commands are listed by group in the epilog: argparse's flat list is hidden.
    subcommands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="one of the commands below"
    )
    _register_own(subcommands)

    from listener import commands, doctor
    from listener.demo import run as demo
    from listener.http import app as http

    for module in (commands, http, demo, doctor):
        module.register(subcommands)

    for action in (parser, *_every_command(parser)):
        for sub_action in _subparsers(action):
            for choice in sub_action._choices_actions:
                sub = sub_action.choices[choice.dest]
                # `listener worker --help` says what the command does, as the listing does.
                sub.description = sub.description or choice.help
    for sub in _every_command(parser):
        sub.formatter_class = HelpFormatter
        if not any(_subparsers(sub)) and sub.prog.split()[1] not in WITHOUT_DATABASE:
            add_global_options(sub, top=False)
    parser.epilog = f"{command_listing(subcommands)}{EXIT_CODES}"
    return parser


def _fail(error: BaseException) -> None:
    """One line: psycopg's messages span several ("Is the server running on that host…")."""
    sys.stderr.write(f"listener: {redact.redact(one_line(error))}\n")


def unwrap(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def exit_code(error: BaseException) -> int | None:
    """The exit code of an error the operator gets one line for; None: a bug (a traceback)."""
    if isinstance(error, ConfigurationError | UsageError):
        return EXIT_CONFIG
    if isinstance(error, DatabaseError | StopWorker | psycopg.OperationalError):
        return EXIT_UNAVAILABLE
    if isinstance(error, ListenerError):
        return EXIT_FAILURE
    return None


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    """The global options given, as settings (they win over the environment)."""
    url = getattr(args, "database_url", None)
    embedded = getattr(args, "embedded", False)
    # Each flag is exclusive where it is given; given on either side of the command, both can be.
    if url is not None and embedded:
        raise UsageError("--database-url and --embedded: give one or the other")
    if url is not None:
        return {"database_url": url, "listener_embedded": False}
    if embedded:
        return {"database_url": None, "listener_embedded": True}
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides = _overrides(args)
        settings = load_settings(**overrides)
    except UsageError as error:
        sys.stderr.write(f"listener: {error}\n")
        return EXIT_CONFIG
    except ConfigurationError as error:
        if args.command == "settings" and str(error).startswith("invalid settings:"):
            return settings_despite_relations(overrides)
        # A --database-url is checked like DATABASE_URL, and its error names the setting
        # without echoing the value (its password): see settings.describe_error.
        sys.stderr.write(f"listener: {error}\n")
        return EXIT_CONFIG
    redact.remember(settings)
    # A bug's traceback may quote a connection string or a request's headers.
    sys.excepthook = redact.excepthook
    setup_logging(settings.log_level)
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as raised:
        # A task group wraps the one error that stopped it; the operator wants that line.
        inner = unwrap(raised)
        code = exit_code(inner)
        if code is None:
            raise
        _fail(inner)
        return code
