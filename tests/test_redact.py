"""Secret masking, the HTTP_HOST and API_TOKEN rules, the bearer check: pure, no I/O."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from listener import redact
from listener.errors import ConfigurationError, ListenerError
from listener.http.auth import presented_token, token_matches
from listener.redact import (
    MASK,
    RedactingFilter,
    Redactor,
    database_passwords,
    mask_database_url,
    mask_url_credentials,
    secret_values,
    settings_lines,
    url_credentials,
)
from listener.settings import check_host, load_settings

DB_PASSWORD = "S3cretDbPass"
KEY = "sk-live-Zq9xW3vK7mN2pL5r"
TOKEN = "tok-Hb4Jd8Ls2Pq6Wv9Xy3Zk"
PROXY_PASSWORD = "Pr0xyPa55w0rd"
PG_ENV_PASSWORD = "EnvPgPa55"


def test_the_redactor_masks_every_occurrence_longest_secret_first() -> None:
    scrub = Redactor(["abcd", "abcdefgh", "xy"])
    assert scrub("abcdefgh and abcd, xy") == f"{MASK} and {MASK}, xy"  # "xy" is too short
    assert Redactor([])("nothing to hide") == "nothing to hide"
    assert Redactor(["a.c+d"])("a.c+d abcd") == f"{MASK} abcd"  # literal, not a pattern


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"postgresql://app:{DB_PASSWORD}@db:5432/shop", {DB_PASSWORD}),
        ("postgres://app:p%40ss%2Fword@db/shop", {"p%40ss%2Fword", "p@ss/word"}),
        (f"postgresql://db/shop?user=app&password={DB_PASSWORD}", {DB_PASSWORD}),
        (f"host=db dbname=shop password={DB_PASSWORD}", {DB_PASSWORD}),
        (r"host=db password='it\'s secret' dbname=shop", {"'it\\'s secret'", "it's secret"}),
        ("postgresql://app@db/shop", set()),
        ("host=db dbname=shop", set()),
        # Malformed: libpq quotes these in its errors; the patterns still find the password.
        (f"postgresql://postgres:{DB_PASSWORD}%zz@127.0.0.1/db", {f"{DB_PASSWORD}%zz"}),
        (f"postgresql://postgres:{DB_PASSWORD}@[::1/db", {DB_PASSWORD}),
        (f"host=x password='{DB_PASSWORD}", {DB_PASSWORD}),
    ],
)
def test_database_passwords_as_parsed_and_as_written(url: str, expected: set[str]) -> None:
    found = database_passwords(url)
    assert expected <= found
    if not expected:
        assert found == set()
    for value in found:
        assert (value and value in url) or value in {"p@ss/word", "it's secret"}


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            f"postgresql://app:{DB_PASSWORD}@db:5432/shop?sslmode=require",
            f"postgresql://app:{MASK}@db:5432/shop?sslmode=require",
        ),
        (
            f"postgresql://db/shop?password={DB_PASSWORD}&sslmode=require",
            f"postgresql://db/shop?password={MASK}&sslmode=require",
        ),
        (
            f"host=db password='{DB_PASSWORD} x' dbname=shop",
            f"host=db password={MASK} dbname=shop",
        ),
        ("postgresql://app@db/shop", "postgresql://app@db/shop"),
        (
            f"postgresql://postgres:{DB_PASSWORD}%zz@[::1/db",
            f"postgresql://postgres:{MASK}@[::1/db",
        ),
    ],
)
def test_mask_database_url_keeps_everything_but_the_password(url: str, masked: str) -> None:
    assert mask_database_url(url) == masked


@pytest.mark.parametrize(
    ("url", "credentials", "masked"),
    [
        (
            f"https://gateway:{PROXY_PASSWORD}@proxy.example/v1",
            {PROXY_PASSWORD},
            f"https://gateway:{MASK}@proxy.example/v1",
        ),
        (
            "https://p%40ss%3Aword@proxy/v1",
            {"p%40ss%3Aword", "p@ss:word"},
            f"https://{MASK}@proxy/v1",
        ),
        (
            f"https://gw.example/openai/v1?api-key={KEY}&region=eu&access_token={TOKEN}",
            {KEY, TOKEN},
            f"https://gw.example/openai/v1?api-key={MASK}&region=eu&access_token={MASK}",
        ),
        ("http://127.0.0.1:8001/v1", set(), "http://127.0.0.1:8001/v1"),
        ("https://api.openai.com/v1?region=eu", set(), "https://api.openai.com/v1?region=eu"),
    ],
)
def test_credentials_inside_an_http_url_are_found_and_masked(
    url: str, credentials: set[str], masked: str
) -> None:
    assert url_credentials(url) == credentials
    assert mask_url_credentials(url) == masked


def test_the_environment_s_pgpassword_and_the_base_url_s_credentials_are_secrets() -> None:
    settings = load_settings(openai_base_url=f"https://gateway:{PROXY_PASSWORD}@proxy/v1")
    environ = {"PGPASSWORD": PG_ENV_PASSWORD, "HOME": "/home/listener"}
    assert {PROXY_PASSWORD, PG_ENV_PASSWORD} <= secret_values(settings, environ)
    assert "/home/listener" not in secret_values(settings, environ)
    assert PG_ENV_PASSWORD not in secret_values(settings)  # the environment only when given
    lines = settings_lines(settings)
    assert f"OPENAI_BASE_URL=https://gateway:{MASK}@proxy/v1" in lines
    assert PROXY_PASSWORD not in "\n".join(lines)


def test_the_cli_masks_pgpassword_and_the_base_url_s_credentials(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from listener import cli

    monkeypatch.chdir(tmp_path)  # no developer's .env
    monkeypatch.setattr(redact, "_active", Redactor())  # what `main` remembers is undone after
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setenv("PGPASSWORD", PG_ENV_PASSWORD)
    monkeypatch.setenv("OPENAI_BASE_URL", f"https://gateway:{PROXY_PASSWORD}@proxy/v1")
    assert cli.main(["settings"]) == 0
    out = capsys.readouterr().out
    assert f"OPENAI_BASE_URL=https://gateway:{MASK}@proxy/v1" in out.splitlines()
    assert PROXY_PASSWORD not in out
    # From now on every log line and error line of the process masks both.
    cli._fail(ListenerError(f"auth failed for {PG_ENV_PASSWORD} via {PROXY_PASSWORD}"))
    assert capsys.readouterr().err == f"listener: auth failed for {MASK} via {MASK}\n"


def test_secret_values_and_settings_lines_hide_every_secret() -> None:
    settings = load_settings(
        database_url=f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:5432/shop",
        openai_api_key=KEY,
        api_token=TOKEN,
        # A secret that is also another setting's value is masked there too.
        rate_limiter_name=KEY,
    )
    assert {DB_PASSWORD, KEY, TOKEN} <= secret_values(settings)
    lines = settings_lines(settings)
    text = "\n".join(lines)
    for secret in (DB_PASSWORD, KEY, TOKEN):
        assert secret not in text
    assert f"OPENAI_API_KEY={MASK}" in lines
    assert f"API_TOKEN={MASK}" in lines
    assert f"RATE_LIMITER_NAME={MASK}" in lines
    assert f"DATABASE_URL=postgresql://postgres:{MASK}@127.0.0.1:5432/shop" in lines
    assert "HTTP_HOST=127.0.0.1" in lines
    assert "PORT=" in lines  # unset
    names = [line.split("=", 1)[0] for line in lines]
    assert names == [name.upper() for name in type(settings).model_fields]


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError(f"cannot connect to postgresql://app:{DB_PASSWORD}@db/shop")
        except RuntimeError:
            exc_info = sys.exc_info()
    return logging.LogRecord("listener.test", logging.INFO, __file__, 1, msg, args, exc_info)


def test_the_filter_masks_secrets_in_the_message_its_arguments_and_the_traceback() -> None:
    scrub = Redactor([DB_PASSWORD, KEY])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter(scrub))

    handler.handle(_record(f"key {KEY} and %s, %d item(s)", f"password={DB_PASSWORD}", 3))
    handler.handle(_record("url %(url)s", {"url": f"postgresql://u:{DB_PASSWORD}@h/d"}))
    handler.handle(_record("failed", exc=True))
    # Arguments that do not fit the message: logging would print them raw in its error report.
    handler.handle(_record("one %s", KEY, DB_PASSWORD))
    # A message with a literal % and no arguments is left as written.
    handler.handle(_record("100% done"))

    output = stream.getvalue()
    assert KEY not in output and DB_PASSWORD not in output, output
    assert f"INFO key {MASK} and password={MASK}, 3 item(s)" in output
    assert f"url postgresql://u:{MASK}@h/d" in output
    assert f"RuntimeError: cannot connect to postgresql://app:{MASK}@db/shop" in output
    assert "Traceback" in output
    assert "INFO 100% done" in output


def test_the_filter_leaves_the_record_formatted_once() -> None:
    record = _record("a %s b %s", KEY, "%s")
    assert RedactingFilter(Redactor([KEY])).filter(record)
    assert (record.getMessage(), record.args) == (f"a {MASK} b %s", ())


def test_remember_and_redact_use_the_loaded_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redact, "_active", Redactor())
    assert redact.redact(f"x {KEY}") == f"x {KEY}"
    redact.remember(load_settings(openai_api_key=KEY, api_token=TOKEN))
    assert redact.redact(f"x {KEY} {TOKEN}") == f"x {MASK} {MASK}"
    # The filter without its own redactor follows what was remembered.
    record = _record("key %s", KEY)
    RedactingFilter().filter(record)
    assert record.getMessage() == f"key {MASK}"


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::", "::1", "localhost", "api.local"])
def test_check_host_takes_addresses_and_names(host: str) -> None:
    assert check_host(host) == host


@pytest.mark.parametrize(
    "host", ["", " 127.0.0.1", "http://x", "[::1]", "host:80", "999.1.1.1", "a..b", "-x"]
)
def test_check_host_refuses_what_cannot_be_bound(host: str) -> None:
    with pytest.raises(ValueError):
        check_host(host)
    with pytest.raises(ConfigurationError, match="HTTP_HOST"):
        load_settings(http_host=host)


@pytest.mark.parametrize(
    ("token", "reason"),
    [("short-but-secret", None), ("0123456789abcde", "too short"), (" " * 20, "printable")],
)
def test_api_token_rules_never_repeat_the_token(token: str, reason: str | None) -> None:
    if reason is None:
        settings = load_settings(api_token=token)
        assert settings.api_token is not None
        return
    with pytest.raises(ConfigurationError, match=reason) as raised:
        load_settings(api_token=token)
    assert "API_TOKEN" in str(raised.value)
    assert token not in str(raised.value)


def test_the_bearer_header_is_parsed_and_compared_strictly() -> None:
    expected = SecretStr(TOKEN)
    assert presented_token(f"Bearer {TOKEN}".encode()) == TOKEN.encode()
    assert presented_token(f"bearer {TOKEN}".encode()) == TOKEN.encode()  # scheme: any case
    assert token_matches(f"Bearer {TOKEN}".encode(), expected)
    for header in (
        None,
        b"",
        b"Bearer ",
        TOKEN.encode(),  # no scheme
        f"Basic {TOKEN}".encode(),
        f"Bearer {TOKEN}x".encode(),
        f"Bearer {TOKEN[:-1]}".encode(),
        f"Bearer {TOKEN} {TOKEN}".encode(),
    ):
        assert not token_matches(header, expected), header


def test_the_cli_error_line_is_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from listener import cli
    from listener.errors import ListenerError

    monkeypatch.setattr(redact, "_active", Redactor([KEY]))
    cli._fail(ListenerError(f"rejected\n  key {KEY}"))
    assert capsys.readouterr().err == f"listener: rejected key {MASK}\n"


def test_the_excepthook_masks_a_traceback_quoting_a_malformed_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    url = f"postgresql://postgres:{DB_PASSWORD}@[::1/db"
    monkeypatch.setattr(redact, "_active", Redactor(database_passwords(url)))
    with pytest.raises(ProgrammingError) as raised:
        conninfo_to_dict(url)  # libpq's message quotes the whole URL
    assert DB_PASSWORD in str(raised.value)
    redact.excepthook(raised.type, raised.value, raised.tb)
    err = capsys.readouterr().err
    assert f"postgresql://postgres:{MASK}@[::1/db" in err and "Traceback" in err
    assert DB_PASSWORD not in err
