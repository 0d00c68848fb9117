"""Every setting in one pydantic-settings model, read from the environment and `.env`."""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from listener.errors import ConfigurationError
from listener.handler import KIND_NAME
from listener.tiers import AutoRule

# 'package.module:attribute': what `--app` and WORKER_APP name.
APP_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class UncheckedSettings(BaseSettings):
    """Every setting, each checked alone; `Settings` adds the relations between them.
    `listener settings` prints these when a relation fails, so the operator sees every value."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # Unset: a command stops (exit 2) unless LISTENER_EMBEDDED (or `--embedded`) asks for the
    # embedded PostgreSQL in `.pgdata/`; the demo starts that one on its own.
    database_url: str | None = None
    listener_embedded: bool = False
    # A worker waits on HTTP, not on the database: a few connections serve many workers.
    db_pool_max: int = Field(default=4, ge=1, le=1000)
    db_pool_min: int = Field(default=1, ge=0, le=1000)
    # Every session of the worker and `listener api` (not `migrate`'s) gives up on a lock after
    # DB_LOCK_TIMEOUT_SECONDS and on any statement after DB_STATEMENT_TIMEOUT_SECONDS: a
    # migration holding a table makes claims fail and retry instead of hanging for its length.
    # Whole milliseconds reach PostgreSQL, where 0 would mean "no limit": hence the floor.
    db_lock_timeout_seconds: float = Field(default=5.0, ge=0.001, le=3600)
    db_statement_timeout_seconds: float = Field(default=30.0, ge=0.001, le=3600)

    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_model: str = Field(default="gpt-4o-mini", min_length=1)
    openai_timeout_seconds: float = Field(default=60.0, gt=0)
    openai_max_tokens: int = Field(default=300, ge=1)
    # A product's data is a few hundred bytes; a payload past this fails its item at once
    # (it would not fit a prompt) and is never loaded into the worker's memory.
    max_payload_bytes: int = Field(default=65_536, ge=1024, le=100_000_000)
    # The app's own kinds for the OpenAI handler (TOML, one table per kind), beside the built-in
    # ones (listener/openai/kinds.toml); a kind of the same name replaces the built-in.
    openai_kinds_file: str | None = Field(default=None, min_length=1)
    # What each model costs per tier (TOML, the shape of listener/openai/prices.toml), in place
    # of the built-in table; read when a process that prices usage starts.
    openai_prices_file: str | None = Field(default=None, min_length=1)
    # Flex: a "resource unavailable" answer is retried with backoff for this long after the
    # item's first flex attempt, then the request goes out on the standard tier. OpenAI advises
    # a long client timeout for flex requests (about 15 minutes).
    flex_fallback_seconds: float = Field(default=300.0, ge=0, le=86_400)
    openai_flex_timeout_seconds: float = Field(default=900.0, gt=0, le=86_400)

    # `listener worker --app`'s default: 'package.module:attribute' naming a listener.App whose
    # kinds the worker serves beside the OpenAI ones (the Procfile's way to say --app).
    worker_app: str | None = None
    # Serve these kinds only (comma-separated); unset: every kind this process has a handler for.
    worker_kinds: str | None = None

    # 0 turns a budget off (a local stub without limits, a benchmark of raw capacity).
    rate_limit_rpm: int = Field(default=450, ge=0)
    rate_limit_tpm: int = Field(default=200_000, ge=0)
    rate_limiter_name: str = Field(default="openai", min_length=1)
    # Requests reach the API with a few milliseconds of jitter; spacing them for a slightly
    # smaller budget keeps a window that the API measures from ever holding one too many.
    rate_limit_headroom_percent: float = Field(default=1.0, ge=0, lt=50)

    claim_batch_size: int = Field(default=100, ge=1, le=10_000)
    max_per_instance: int = Field(default=20, ge=1, le=10_000)
    worker_concurrency: int = Field(default=64, ge=1, le=10_000)

    max_attempts: int = Field(default=5, ge=1)
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_cap_seconds: float = Field(default=300.0, gt=0)
    lease_seconds: float = Field(default=60.0, ge=2)
    sweep_interval_seconds: float = Field(default=30.0, gt=0)
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    pool_stats_interval_seconds: float = Field(default=60.0, gt=0)
    # Finished jobs (and their items) older than this are deleted by the fleet; 0 keeps them.
    # 450 items a minute is 650,000 rows a day.
    retention_days: int = Field(default=14, ge=0, le=36_500)

    # `auto`-tier jobs go to OpenAI's Batch API when they have at least AUTO_BATCH_MIN_ITEMS
    # items or a priority at or under AUTO_BATCH_MAX_PRIORITY (-101: never by priority);
    # real-time otherwise. A plain INSERT applies the priority half only (its size is unknown).
    auto_batch_min_items: int = Field(default=1000, ge=1)
    auto_batch_max_priority: int = Field(default=-1, ge=-101, le=100)
    # The batch path (listener/batches/): how often each step runs, the limits of one input
    # file (OpenAI's: 50,000 requests, 200 MB), one store's share of a file, and our ceiling on
    # the prompt tokens enqueued at OpenAI at once (the account's enqueued-token limit; 0: none).
    batch_poll_seconds: float = Field(default=30.0, gt=0, le=86_400)
    batch_max_requests: int = Field(default=50_000, ge=1, le=50_000)
    batch_max_bytes: int = Field(default=200_000_000, ge=10_000, le=200_000_000)
    batch_max_per_store: int = Field(default=10_000, ge=1, le=50_000)
    batch_enqueued_token_limit: int = Field(default=2_000_000, ge=0)
    # A batch OpenAI refused for its enqueued-token limit: its items wait this long, then go
    # into a new batch.
    batch_retry_seconds: float = Field(default=300.0, ge=0, le=86_400)

    port: int | None = Field(default=None, ge=1, le=65535)
    # Loopback unless told otherwise: the stats and metrics are for the operator, and a
    # platform's router (Render's web services) is the one place that needs 0.0.0.0.
    http_host: str = "127.0.0.1"
    # Set: every endpoint but /health wants `Authorization: Bearer <API_TOKEN>`.
    api_token: SecretStr | None = None
    # Host names (or addresses) the HTTP app answers for, comma-separated; loopback names and
    # addresses always pass. A request naming any other Host gets 421: a page whose name rebinds
    # to this machine (DNS rebinding) cannot reach the dashboard. `*` turns the check off.
    allowed_hosts: str = ""
    # Without API_TOKEN the dashboard is read-only unless this says otherwise: anyone who can
    # reach the port (a page in a browser on this machine, too) could otherwise act.
    dashboard_allow_actions_without_token: bool = False
    # Addresses whose X-Forwarded-Proto / X-Forwarded-For are believed (uvicorn's
    # forwarded_allow_ips): IPs or networks, comma-separated, or `*` behind a router whose
    # addresses are not fixed and that is the only way in (Render's).
    forwarded_allow_ips: str = "127.0.0.1,::1"
    log_level: LogLevel = "INFO"

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        # Checked here, not at the first connection: a typo is a configuration error (exit 2),
        # not an outage to retry; and psycopg's own message would quote the URL, password too.
        if not value:
            return None
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict

        try:
            parts = conninfo_to_dict(value)
        except ProgrammingError:
            raise ValueError(
                "not a PostgreSQL URL (postgresql://user:password@host:5432/dbname)"
                " nor a connection string (host=... dbname=...)"
            ) from None
        port = str(parts.get("port", "5432"))
        # ASCII digits: "²".isdigit() is true, and libpq would refuse it only at the connection.
        if not all(re.fullmatch(r"[0-9]{1,5}", p) for p in port.split(",")):
            raise ValueError("its port is not a number")
        return value

    @field_validator("worker_app")
    @classmethod
    def _worker_app(cls, value: str | None) -> str | None:
        if value is not None and not APP_REFERENCE.match(value):
            raise ValueError("expected 'package.module:attribute'")
        return value

    @field_validator("worker_kinds")
    @classmethod
    def _worker_kinds(cls, value: str | None) -> str | None:
        if value is None:
            return None
        names = [name.strip() for name in value.split(",")]
        bad = [name for name in names if not KIND_NAME.match(name)]
        if bad or not names:
            raise ValueError(f"{bad[0] if bad else value!r} is not a kind's name")
        return ",".join(names)

    @field_validator("openai_base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value or None

    @field_validator("openai_api_key")
    @classmethod
    def _api_key(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty or spaced key fails every call as a connection error (an invalid header),
        # which would be retried for ever: refuse it at start instead.
        if value is not None and (
            not value.get_secret_value()
            or value.get_secret_value() != value.get_secret_value().strip()
        ):
            raise ValueError("is empty or has spaces around it")
        return value

    @property
    def heartbeat_seconds(self) -> float:
        """How often a worker renews its leases: a few times per lease, at least every 5 s."""
        return max(0.5, min(5.0, self.lease_seconds / 3))

    @property
    def auto_rule(self) -> AutoRule:
        return AutoRule(self.auto_batch_min_items, self.auto_batch_max_priority)

    @field_validator("http_host")
    @classmethod
    def _http_host(cls, value: str) -> str:
        return check_host(value)

    @field_validator("allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, value: str) -> str:
        for name in split_list(value):
            if name != "*":
                check_host(name.removeprefix("*.").removeprefix("[").removesuffix("]"))
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _forwarded_allow_ips(cls, value: str) -> str:
        entries = split_list(value)
        if not entries:
            raise ValueError("must name at least one address (127.0.0.1 is the default)")
        for entry in entries:
            if entry != "*":
                try:
                    # strict: uvicorn would take 10.0.0.1/8 for a literal that matches nothing.
                    ipaddress.ip_network(entry)
                except ValueError:
                    raise ValueError(
                        f"{entry!r} is not an IP address or network (e.g. 10.0.0.0/8, or *)"
                    ) from None
        return value

    @field_validator("api_token")
    @classmethod
    def _api_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_api_token(value.get_secret_value())
        return value


def relation_errors(settings: UncheckedSettings) -> list[str]:
    """Every relation between settings that fails, one line each naming both settings: each
    value may be fine alone and the pair still fail later (a backoff whose base exceeds its cap
    raises on the first retry)."""
    problems: list[str] = []
    if settings.db_pool_min > settings.db_pool_max:
        problems.append(
            f"DB_POOL_MIN ({settings.db_pool_min}) is larger than "
            f"DB_POOL_MAX ({settings.db_pool_max})"
        )
    if settings.retry_base_seconds > settings.retry_cap_seconds:
        problems.append(
            f"RETRY_BASE_SECONDS ({settings.retry_base_seconds:g}) is larger than "
            f"RETRY_CAP_SECONDS ({settings.retry_cap_seconds:g})"
        )
    if settings.max_per_instance > settings.claim_batch_size:
        problems.append(
            f"MAX_PER_INSTANCE ({settings.max_per_instance}) is larger than CLAIM_BATCH_SIZE "
            f"({settings.claim_batch_size}): no claim holds that many items"
        )
    if settings.db_lock_timeout_seconds > settings.db_statement_timeout_seconds:
        problems.append(
            f"DB_LOCK_TIMEOUT_SECONDS ({settings.db_lock_timeout_seconds:g}) is larger than "
            f"DB_STATEMENT_TIMEOUT_SECONDS ({settings.db_statement_timeout_seconds:g}): the "
            "statement would be cancelled before its lock wait ends"
        )
    if settings.lease_seconds <= settings.heartbeat_seconds + settings.db_lock_timeout_seconds:
        problems.append(
            f"LEASE_SECONDS ({settings.lease_seconds:g}) is too short for DB_LOCK_TIMEOUT_SECONDS "
            f"({settings.db_lock_timeout_seconds:g}): a heartbeat (every "
            f"{settings.heartbeat_seconds:.2g} s) held up by a lock that long would let the "
            "leases of a live worker expire"
        )
    if 0 < settings.rate_limit_tpm < settings.openai_max_tokens:
        problems.append(
            f"OPENAI_MAX_TOKENS ({settings.openai_max_tokens}) is larger than RATE_LIMIT_TPM "
            f"({settings.rate_limit_tpm}): one request could need more than a minute's budget"
        )
    if settings.batch_max_per_store > settings.batch_max_requests:
        problems.append(
            f"BATCH_MAX_PER_STORE ({settings.batch_max_per_store}) is larger than "
            f"BATCH_MAX_REQUESTS ({settings.batch_max_requests}): no batch file holds that many"
        )
    if settings.listener_embedded and settings.database_url:
        problems.append(
            "LISTENER_EMBEDDED and DATABASE_URL are both set: use one database or the other"
        )
    return problems


class Settings(UncheckedSettings):
    """The worker's configuration; `.env.example` documents each field."""

    @model_validator(mode="after")
    def _relations(self) -> Settings:
        # Refused at start, both names in one line: the first relation that fails.
        problems = relation_errors(self)
        if problems:
            raise ValueError(problems[0])
        return self


# Fields whose value may hold a secret: a settings error never repeats them (OPENAI_BASE_URL may
# carry a proxy's credentials).
SECRET_FIELDS = frozenset({"openai_api_key", "database_url", "api_token", "openai_base_url"})

# A token short enough to guess is no protection; 16 characters is the floor, 32+ is better.
MIN_API_TOKEN_LENGTH = 16
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def check_host(value: str) -> str:
    """An IP address or a host name to bind, as uvicorn takes it (`::`, not `[::]`)."""
    if not value:
        raise ValueError("must not be empty (127.0.0.1 serves this machine only, 0.0.0.0 all)")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    labels = value.removesuffix(".").split(".")
    # An all-digit last label is a mistyped IP address (999.0.0.1), not a name to resolve.
    valid = all(_HOST_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()
    if len(value) > 253 or not valid:
        raise ValueError("not an IP address or a host name (e.g. 127.0.0.1, 0.0.0.0, ::)")
    return value


def split_list(value: str) -> list[str]:
    """A comma-separated setting's entries, spaces and empty entries dropped."""
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def check_api_token(token: str) -> None:
    """The token's rules; the messages never repeat it."""
    if len(token) < MIN_API_TOKEN_LENGTH:
        raise ValueError(
            f"too short: at least {MIN_API_TOKEN_LENGTH} characters (e.g. the output of "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    # It travels in an HTTP header, where spaces and other characters do not survive intact.
    if not all("!" <= char <= "~" for char in token):
        raise ValueError("only printable ASCII characters, no spaces")


def describe_error(error: ValidationError) -> str:
    """One line naming the first bad setting, without echoing secrets."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "__root__"]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if not location:
        return f"invalid settings: {message}"
    name = location[0]
    shown = ""
    if name not in SECRET_FIELDS and "input" in first:
        shown = f" (got {first['input']!r})"
    return f"invalid setting {name.upper()}: {message}{shown}"


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning a validation failure into a `ConfigurationError`."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigurationError(describe_error(error)) from None


def load_unchecked_settings(**overrides: object) -> UncheckedSettings:
    """The settings, each checked alone (`listener settings` when a relation fails)."""
    try:
        return UncheckedSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigurationError(describe_error(error)) from None
