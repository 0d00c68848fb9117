"""Every setting refuses a bad value at start: one line naming it, exit code 2, no secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from listener.cli import EXIT_CONFIG, main
from listener.settings import Settings

# One invalid value for every setting; a setting added without one fails the coverage test.
BAD_VALUES = {
    "database_url": "postgresql://app:hunter2@db:port/app",
    "listener_embedded": "maybe",
    "db_pool_max": "0",
    "db_pool_min": "-1",
    "db_lock_timeout_seconds": "0",
    "db_statement_timeout_seconds": "forever",
    "openai_api_key": " sk-with-a-space",
    "openai_base_url": "gateway:hunter3@api.openai.com/v1",
    "openai_model": "",
    "openai_timeout_seconds": "0",
    "openai_max_tokens": "lots",
    "max_payload_bytes": "10",
    "openai_kinds_file": "",
    "openai_prices_file": "",
    "flex_fallback_seconds": "-1",
    "openai_flex_timeout_seconds": "0",
    "worker_app": "tasks",
    "worker_kinds": "Alt Text",
    "rate_limit_rpm": "-450",
    "rate_limit_tpm": "2e5x",
    "rate_limiter_name": "",
    "rate_limit_headroom_percent": "75",
    "claim_batch_size": "0",
    "max_per_instance": "0",
    "worker_concurrency": "sixteen",
    "max_attempts": "0",
    "retry_base_seconds": "-1",
    "retry_cap_seconds": "0",
    "lease_seconds": "1",
    "sweep_interval_seconds": "0",
    "shutdown_grace_seconds": "-5",
    "pool_stats_interval_seconds": "never",
    "retention_days": "-1",
    "auto_batch_min_items": "0",
    "auto_batch_max_priority": "-102",
    "batch_poll_seconds": "0",
    "batch_max_requests": "50001",
    "batch_max_bytes": "200000001",
    "batch_max_per_store": "0",
    "batch_enqueued_token_limit": "-1",
    "batch_retry_seconds": "-1",
    "port": "70000",
    "http_host": "",
    "api_token": "tiny-T0ken",
    "allowed_hosts": "dash.example.com,http://x",
    "dashboard_allow_actions_without_token": "maybe",
    "forwarded_allow_ips": "10.0.0.1/8",
    "log_level": "LOUD",
}
SECRETS = {
    "database_url": "hunter2",
    "openai_api_key": "sk-with-a-space",
    "openai_base_url": "hunter3",
    "api_token": "tiny-T0ken",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No developer's `.env` or environment leaks in."""
    monkeypatch.chdir(tmp_path)
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def test_every_setting_has_a_bad_value_tested() -> None:
    assert set(BAD_VALUES) == set(Settings.model_fields)


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_a_bad_value_stops_the_program_with_one_line_naming_the_setting(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(name.upper(), BAD_VALUES[name])
    assert main(["worker"]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith(f"listener: invalid setting {name.upper()}: "), err
    if name in SECRETS:
        assert SECRETS[name] not in err


# Settings that are each valid alone and wrong together: every pair used to pass the start-up
# check and fail later (a backoff with base > cap raised on the first retryable error).
CONTRADICTIONS = {
    "pool": (
        {"DB_POOL_MIN": "8", "DB_POOL_MAX": "4"},
        "DB_POOL_MIN (8) is larger than DB_POOL_MAX (4)",
    ),
    "retry": (
        {"RETRY_BASE_SECONDS": "10", "RETRY_CAP_SECONDS": "5"},
        "RETRY_BASE_SECONDS (10) is larger than RETRY_CAP_SECONDS (5)",
    ),
    "claim": (
        {"MAX_PER_INSTANCE": "50", "CLAIM_BATCH_SIZE": "20"},
        "MAX_PER_INSTANCE (50) is larger than CLAIM_BATCH_SIZE (20)",
    ),
    "timeouts": (
        {"DB_LOCK_TIMEOUT_SECONDS": "60", "DB_STATEMENT_TIMEOUT_SECONDS": "10"},
        "DB_LOCK_TIMEOUT_SECONDS (60) is larger than DB_STATEMENT_TIMEOUT_SECONDS (10)",
    ),
    "lease": (
        {"LEASE_SECONDS": "6", "DB_LOCK_TIMEOUT_SECONDS": "5"},
        "LEASE_SECONDS (6) is too short for DB_LOCK_TIMEOUT_SECONDS (5)",
    ),
    "tokens": (
        {"OPENAI_MAX_TOKENS": "4000", "RATE_LIMIT_TPM": "1000"},
        "OPENAI_MAX_TOKENS (4000) is larger than RATE_LIMIT_TPM (1000)",
    ),
    "batch_share": (
        {"BATCH_MAX_PER_STORE": "20000", "BATCH_MAX_REQUESTS": "10000"},
        "BATCH_MAX_PER_STORE (20000) is larger than BATCH_MAX_REQUESTS (10000)",
    ),
    "embedded": (
        {"LISTENER_EMBEDDED": "1", "DATABASE_URL": "postgresql://app:hunter2@db/app"},
        "LISTENER_EMBEDDED and DATABASE_URL are both set",
    ),
}


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_settings_that_contradict_each_other_stop_the_program_naming_both(
    case: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    values, message = CONTRADICTIONS[case]
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    assert main(["worker"]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith(f"listener: invalid settings: {message}"), err


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_settings_prints_every_setting_when_a_relation_fails_marking_the_pair(
    case: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    values, message = CONTRADICTIONS[case]
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    assert main(["settings"]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert err.count("\n") == 1, err
    assert err.startswith(f"listener: invalid settings: {message}"), err
    lines = out.splitlines()
    assert [line.partition("=")[0] for line in lines] == [n.upper() for n in Settings.model_fields]
    # A pair may break a second relation too (a long lock timeout outlasts the lease as well).
    marked = {line.partition("=")[0]: line for line in lines if "# ✗ " in line}
    assert set(values) <= set(marked), out
    assert all(message in marked[name] for name in values), out
    assert "hunter2" not in out + err


@pytest.mark.parametrize(
    "values",
    [
        {"RETRY_BASE_SECONDS": "5", "RETRY_CAP_SECONDS": "5"},
        {"MAX_PER_INSTANCE": "20", "CLAIM_BATCH_SIZE": "20"},
        {"LEASE_SECONDS": "2", "DB_LOCK_TIMEOUT_SECONDS": "1"},
        {"OPENAI_MAX_TOKENS": "4000", "RATE_LIMIT_TPM": "0"},
    ],
)
def test_settings_at_the_edge_of_a_relation_are_accepted(
    values: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    assert main(["settings"]) == 0
    shown = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    for name, value in values.items():
        assert float(shown[name]) == float(value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:hunter2@db.internal:5432/app",
        "host=db.internal port=5432 dbname=app user=app password=hunter2",
        "postgres://app@db.internal/app?sslmode=require",
    ],
)
def test_good_database_urls_are_accepted(url: str) -> None:
    assert Settings(database_url=url).database_url == url


@pytest.mark.parametrize("value", ["-1", "x", "1.5"])
def test_a_bad_retention_stops_the_program(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RETENTION_DAYS", value)
    assert main(["worker"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("listener: invalid setting RETENTION_DAYS: "), err
    assert err.count("\n") == 1


def test_retention_of_zero_keeps_everything() -> None:
    assert Settings(retention_days=0).retention_days == 0
    assert Settings().retention_days == 14


def test_a_database_url_port_of_other_digits_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # "²".isdigit() is true: the check must not let libpq be the first to refuse it.
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db:5432\u00b2/app")
    assert main(["worker"]) == EXIT_CONFIG
    _out, err = capsys.readouterr()
    assert err.startswith("listener: invalid setting DATABASE_URL: its port is not a number"), err
