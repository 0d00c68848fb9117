"""Secrets out of everything the program prints: log lines, error lines, `listener settings`.

Our own messages never include a secret on purpose; this is the net under them, for a library's
error that echoes its input (libpq quotes a malformed DATABASE_URL, password and all) or a debug
line nobody reviewed. The settings' secret values (every SecretStr field, the password inside
DATABASE_URL, the credentials inside OPENAI_BASE_URL) and PGPASSWORD from the environment are
remembered once loaded; the logging filter and the CLI's error printer replace any of them
with `***`.

Everything but `remember`'s one global and the excepthook is pure: strings in, strings out.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from urllib.parse import quote, unquote

from pydantic import SecretStr

from listener.settings import SECRET_FIELDS, UncheckedSettings

MASK = "***"
# A value this short cannot be told apart from ordinary text (masking "pw" would mangle every
# line), and protects nothing anyway.
MIN_SECRET_LENGTH = 4

# libpq's URI form: the user info ends at the first "@" before any "/", the user at its first ":".
_URL_SCHEME = re.compile(r"\s*postgres(?:ql)?://", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"^(\s*postgres(?:ql)?://[^@/:]*:)([^@/]*)(@)", re.IGNORECASE)
# A malformed URL may not follow that rule (a "/" in the password): everything up to the last "@".
_URL_PASSWORD_LOOSE = re.compile(r"://[^:@]*:(.*)@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#]*)", re.IGNORECASE)
# The key/value form: `password=secret` or `password = 'with \' quotes'` (maybe unterminated).
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)", re.IGNORECASE)

# libpq takes the password from here when DATABASE_URL has none: just as secret, never a setting.
ENV_SECRETS = ("PGPASSWORD",)
# An HTTP URL's credentials (OPENAI_BASE_URL through a proxy or a gateway): the password of its
# user info, or a user alone (then a token), and query parameters named like a key or a token.
_HTTP_USERINFO = re.compile(r"^(\s*https?://)([^@/?#]*)(@)", re.IGNORECASE)
_CREDENTIAL_PARAM = re.compile(
    r"([?&](?:[^=&#]*(?:key|token|secret|password|passwd|signature|sig|auth)[^=&#]*)=)([^&#]*)",
    re.IGNORECASE,
)


class Redactor:
    """Replaces each of the given secrets with `***` wherever it appears in a text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first: a secret that contains another is masked whole, not around it.
        values = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, values))) if values else None

    def __call__(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub(MASK, text)


def database_passwords(url: str) -> set[str]:
    """The password of a connection string (URI or key/value), as parsed and as written.

    Both spellings: libpq's errors quote the text as written (`%40`), a decoded value (`@`) may
    show elsewhere. A malformed string still gives up what the patterns find in it.
    """
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    found: set[str] = set()
    try:
        parsed = conninfo_to_dict(url).get("password")
        if parsed:
            found.add(str(parsed))
        malformed = False
    except psycopg.ProgrammingError:
        malformed = True
    written: list[str] = []
    if match := _URL_PASSWORD.match(url):
        written.append(match[2])
    elif malformed and _URL_SCHEME.match(url) and (match := _URL_PASSWORD_LOOSE.search(url)):
        written.append(match[1])
    written += [match[2] for match in _QUERY_PASSWORD.finditer(url)]
    if not _URL_SCHEME.match(url):
        for match in _KEYWORD_PASSWORD.finditer(url):
            raw = match[2]
            written.append(raw)
            if raw.startswith("'"):
                inner = raw[1:].removesuffix("'") if len(raw) > 1 else ""
                written += [inner, re.sub(r"\\(.)", r"\1", inner)]
    for value in written:
        found |= {value, unquote(value)}
    return {value for value in found if value}


def url_credentials(url: str) -> set[str]:
    """The credentials inside an HTTP URL, as written and decoded (see `_HTTP_USERINFO`)."""
    written: list[str] = []
    if match := _HTTP_USERINFO.match(url):
        user, colon, password = match[2].partition(":")
        written.append(password if colon else user)
    written += [match[2] for match in _CREDENTIAL_PARAM.finditer(url)]
    return {variant for value in written for variant in (value, unquote(value)) if variant}


def mask_url_credentials(url: str) -> str:
    """The HTTP URL with its credentials replaced by `***` (host and path help operators)."""

    def userinfo(match: re.Match[str]) -> str:
        user, colon, _password = match[2].partition(":")
        return f"{match[1]}{user}:{MASK}{match[3]}" if colon else f"{match[1]}{MASK}{match[3]}"

    masked = _HTTP_USERINFO.sub(userinfo, url)
    return _CREDENTIAL_PARAM.sub(rf"\1{MASK}", masked)


def secret_values(
    settings: UncheckedSettings, environ: Mapping[str, str] | None = None
) -> set[str]:
    """Every secret the settings (and `environ`'s ENV_SECRETS) hold, also as it would look
    percent-encoded in a URL."""
    values: set[str] = set()
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            values.add(value.get_secret_value())
    if settings.database_url:
        values |= database_passwords(settings.database_url)
    if settings.openai_base_url:
        values |= url_credentials(settings.openai_base_url)
    env = environ or {}
    values |= {env[name] for name in ENV_SECRETS if env.get(name)}
    return {variant for value in values for variant in (value, quote(value, safe=""))}


def mask_database_url(url: str) -> str:
    """The connection string with its password replaced by `***` (the rest helps operators)."""
    masked = _URL_PASSWORD.sub(rf"\1{MASK}\3", url)
    masked = _QUERY_PASSWORD.sub(rf"\1{MASK}", masked)
    if not _URL_SCHEME.match(url):
        masked = _KEYWORD_PASSWORD.sub(rf"\1{MASK}", masked)
    # The patterns cover the well-formed spellings; the redactor catches a malformed one.
    return Redactor(database_passwords(url))(masked)


def settings_lines(settings: UncheckedSettings) -> list[str]:
    """Every effective setting as `NAME=value`: secrets as `***`, an unset one as `NAME=`."""
    redactor = Redactor(secret_values(settings))
    lines = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            shown = ""
        elif isinstance(value, SecretStr):
            shown = MASK
        elif name == "database_url":
            shown = mask_database_url(str(value))
        elif name == "openai_base_url":
            shown = mask_url_credentials(str(value))
        elif name in SECRET_FIELDS:
            shown = MASK
        else:
            shown = str(value)
        # Defence in depth: a secret that is also some other setting's value is masked there too.
        lines.append(redactor(f"{name.upper()}={shown}"))
    return lines


_active = Redactor()


def remember(settings: UncheckedSettings, environ: Mapping[str, str] | None = None) -> None:
    """Mask these settings' secrets, and the environment's (`os.environ` unless given), from now
    on, in `redact` and the logging filter."""
    global _active
    _active = Redactor(secret_values(settings, os.environ if environ is None else environ))


def redact(text: str) -> str:
    """The text with every remembered secret replaced by `***`."""
    return _active(text)


_FORMATTER = logging.Formatter()


class RedactingFilter(logging.Filter):
    """Formats a record's message, then masks secrets in it (and in its traceback).

    The arguments are merged into the message and cleared: masking the template alone would let
    a secret passed as an argument through, and a handler formats the record again later.
    """

    def __init__(self, redactor: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self._redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        scrub = self._redactor or redact
        try:
            message = record.getMessage()
        except Exception:
            # Left as is, logging would print the raw arguments in its "--- Logging error ---".
            message = f"{record.msg} (arguments that do not fit the message: {record.args!r})"
        record.msg, record.args = scrub(message), ()
        if record.exc_info and not record.exc_text:
            # Formatted here (a handler would do it later, unmasked) and cached where it looks.
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def install_filter(handlers: Iterable[logging.Handler]) -> None:
    """Put the filter on each handler (once): a handler sees the records of every logger, where a
    logger's own filter would miss those its children pass up."""
    for handler in handlers:
        if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
            handler.addFilter(RedactingFilter())


def excepthook(
    kind: type[BaseException], error: BaseException, trace: TracebackType | None
) -> None:
    """An unexpected error's traceback, masked like any log line."""
    sys.stderr.write(redact("".join(traceback.format_exception(kind, error, trace))))
