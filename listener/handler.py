"""The handler seam: the kinds of work a worker serves, and what a handler is given and returns.

    from listener import App, Item, Result, RetryItem, FailItem

    app = App()

    @app.kind("alt_text", budget=None, max_attempts=3)
    async def alt_text(item: Item) -> Result:
        if "image_url" not in item.payload:
            raise FailItem("payload has no image_url")
        return Result({"alt": await describe(item.payload["image_url"])})

`listener worker --app mypackage.tasks:app` serves the app's kinds beside the built-in OpenAI
ones. A handler is an async callable from an `Item` to a `Result` (or to any JSON value, which
becomes the result); the error it raises steers the item: `RetryItem` (again later),
`FailItem` (FAILED now), `BudgetExhausted` (the budget is spent: every process drawing from it
pauses, the item waits in place), `DeferItem` (not now, not the item's fault: back to PENDING
for a while, its attempt given back, `Item.deferred_since` counting), `StopWorker` (the process
cannot serve anything: it stops).

Each kind draws from a named budget: `"openai"` (RATE_LIMIT_RPM / RATE_LIMIT_TPM, shared by the
fleet), another the app declares with `app.budget(name, rpm=..., tpm=...)`, or None (no limit).
A worker takes its budget slot before it knows its item, so the slot reserves the largest
`estimate` of the budget's kinds; the `cost` a result reports then corrects the budget.

This module is part of the engine: it knows nothing of OpenAI, HTTP or the demo.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from listener.errors import ConfigurationError
from listener.tiers import BATCH, REALTIME, TIERS

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

# The kind of every job that names none (the column's default): today's product description.
DEFAULT_KIND = "product_description"
# The budget of RATE_LIMIT_RPM / RATE_LIMIT_TPM (its limiter row is RATE_LIMITER_NAME).
DEFAULT_BUDGET = "openai"
# jobs_kind_valid in sql/schema.sql.
KIND_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
# The token counts a result's usage may carry (listener_usage_tokens reads them).
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens")


@dataclass(frozen=True)
class Item:
    """One item as its handler sees it."""

    id: int
    job_id: int
    store: str  # the job's instance_id
    kind: str
    product_id: str | None
    payload: Any  # the item's JSON payload as Python data (None when it is NULL)
    options: Mapping[str, Any]  # the job's options over its store's defaults
    attempt: int  # 1 on the first try
    max_attempts: int
    # The tier it runs on: 'realtime' or 'flex' here ('batch' items go to the batch path).
    tier: str = REALTIME
    # When its handler first deferred it (DeferItem), by the database's clock; None: never.
    deferred_since: datetime | None = None


@dataclass(frozen=True)
class Result:
    """What a handler returns: `value` (any JSON value) becomes the item's `result`.

    `cost`: what the call actually cost its budget, in the budget's token units (None: the
    estimate reserved before it stands). `pause`: the budget's owner says it is spent for this
    many seconds (a rate-limit header saying 0 remaining): every process drawing from it waits.

    Metering, for what each store costs (stored with the item, priced when read): `usage`, the
    call's token counts ({"prompt_tokens", "completion_tokens", "cached_tokens"}: whole numbers,
    0 or more; other keys are dropped), `model`, the model that answered, and `served_tier`,
    the tier that served it (one of listener.tiers.SERVED_TIERS; None: no priced call served
    it). A value that does not fit is dropped with a warning; the item's answer is kept.
    """

    value: Any
    cost: int | None = None
    pause: float | None = None
    usage: Mapping[str, int] | None = None
    model: str | None = None
    served_tier: str | None = None


class Handler(Protocol):
    def __call__(self, item: Item, /) -> Awaitable[Any]: ...


class Service(Protocol):
    """A task the worker runs beside its claims while it runs (the OpenAI batch path), given
    its pool and the app it serves; cancelled when the worker stops, so every step of it must
    be safe to cut off and repeat."""

    def __call__(self, pool: AsyncConnectionPool, app: App, /) -> Coroutine[Any, Any, None]: ...


@dataclass(frozen=True)
class Budget:
    """A named, fleet-wide budget of requests (and tokens) a minute: one limiter row."""

    name: str
    rpm: int = 0
    tpm: int = 0


@dataclass(frozen=True)
class Kind:
    """A kind of work: its handler, the budget it draws from and the rules of its items."""

    name: str
    handler: Handler
    budget: str | None = DEFAULT_BUDGET
    # Tries before an item ends FAILED; None: MAX_ATTEMPTS.
    max_attempts: int | None = None
    # Budget tokens reserved for one call before its item is known (settled with `cost`).
    estimate: int = 1
    # The options a job may carry (None: any), and those its items need.
    options: frozenset[str] | None = None
    required_options: frozenset[str] = frozenset()
    # Called once when the worker closes (an HTTP client's connections, say).
    aclose: Callable[[], Awaitable[None]] | None = field(default=None, compare=False)
    # The tier of a job that names none (listener.tiers), and whether a batch runner serves its
    # batch-tier items (the OpenAI chat kinds): a job may ask for 'batch' only then.
    tier: str = REALTIME
    batch: bool = False

    def __post_init__(self) -> None:
        if not KIND_NAME.match(self.name):
            raise ConfigurationError(
                f"invalid kind name {self.name!r}: lower-case letters, digits, '_', '.' or '-', "
                "starting with a letter, at most 63 characters"
            )
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ConfigurationError(f"kind {self.name}: max_attempts must be at least 1")
        if self.estimate < 0:
            raise ConfigurationError(f"kind {self.name}: estimate must not be negative")
        if self.tier not in TIERS:
            raise ConfigurationError(
                f"kind {self.name}: tier {self.tier!r} is not one of {', '.join(TIERS)}"
            )
        if self.tier == BATCH and not self.batch:
            raise ConfigurationError(
                f"kind {self.name}: tier 'batch' needs a handler that can batch (batch=True)"
            )
        if self.options is not None and not self.required_options <= self.options:
            missing = ", ".join(sorted(self.required_options - self.options))
            raise ConfigurationError(
                f"kind {self.name}: required option(s) {missing} not among its options"
            )


class App:
    """A registry of kinds (and of the budgets they draw from) that a worker serves."""

    def __init__(
        self,
        kinds: Iterable[Kind] = (),
        budgets: Iterable[Budget] = (),
        services: Iterable[Service] = (),
    ) -> None:
        self._kinds: dict[str, Kind] = {}
        self._budgets: dict[str, Budget] = {}
        self.services: list[Service] = list(services)
        for budget in budgets:
            self.add_budget(budget)
        for kind in kinds:
            self.add(kind)

    def add(self, kind: Kind) -> Kind:
        if kind.name in self._kinds:
            raise ConfigurationError(f"kind {kind.name} is registered twice")
        self._kinds[kind.name] = kind
        return kind

    def add_budget(self, budget: Budget) -> Budget:
        if budget.name == DEFAULT_BUDGET:
            raise ConfigurationError(
                f"budget {DEFAULT_BUDGET!r} is RATE_LIMIT_RPM / RATE_LIMIT_TPM: set those instead"
            )
        if budget.rpm < 0 or budget.tpm < 0:
            raise ConfigurationError(f"budget {budget.name}: rpm and tpm must not be negative")
        self._budgets[budget.name] = budget
        return budget

    def budget(self, name: str, *, rpm: int = 0, tpm: int = 0) -> Budget:
        """Declare a budget of `rpm` requests (and `tpm` tokens) a minute for the whole fleet."""
        return self.add_budget(Budget(name, rpm, tpm))

    def kind(
        self,
        name: str,
        *,
        budget: str | None = DEFAULT_BUDGET,
        max_attempts: int | None = None,
        estimate: int = 1,
        options: Iterable[str] | None = None,
        required_options: Iterable[str] = (),
        tier: str = REALTIME,
    ) -> Callable[[Handler], Handler]:
        """Register the decorated async function as the handler of kind `name`."""

        def register(handler: Handler) -> Handler:
            self.add(
                Kind(
                    name,
                    handler,
                    budget=budget,
                    max_attempts=max_attempts,
                    estimate=estimate,
                    options=None if options is None else frozenset(options),
                    required_options=frozenset(required_options),
                    tier=tier,
                )
            )
            return handler

        return register

    def merged(self, other: App) -> App:
        """This app's kinds and budgets, then `other`'s (a name in both is an error)."""
        app = App(self, self._budgets.values(), [*self.services, *other.services])
        for budget in other.budgets.values():
            app.add_budget(budget)
        for kind in other:
            app.add(kind)
        return app

    def observed(self, on_start: Callable[[Item], None]) -> App:
        """The same app, calling `on_start(item)` as each handler starts (timing, tracing)."""

        def watch(handler: Handler) -> Handler:
            async def watched(item: Item) -> Any:
                on_start(item)
                return await handler(item)

            return watched

        return App(
            (dataclasses.replace(kind, handler=watch(kind.handler)) for kind in self),
            self._budgets.values(),
            self.services,
        )

    def only(self, names: Iterable[str]) -> App:
        """The same app serving `names` only; an unknown name is an error naming it."""
        wanted = list(names)
        unknown = [name for name in wanted if name not in self._kinds]
        if unknown:
            raise ConfigurationError(
                f"invalid setting WORKER_KINDS: no kind named {', '.join(unknown)} "
                f"(known: {', '.join(sorted(self._kinds))})"
            )
        return App((self._kinds[name] for name in wanted), self._budgets.values(), self.services)

    @property
    def budgets(self) -> Mapping[str, Budget]:
        return MappingProxyType(self._budgets)

    def __iter__(self) -> Iterator[Kind]:
        return iter(self._kinds.values())

    def __len__(self) -> int:
        return len(self._kinds)

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def __getitem__(self, name: str) -> Kind:
        return self._kinds[name]

    @property
    def names(self) -> list[str]:
        return sorted(self._kinds)

    def check_budgets(self) -> None:
        """Every kind draws from the default budget, a declared one, or none."""
        for kind in self:
            if kind.budget not in (None, DEFAULT_BUDGET) and kind.budget not in self._budgets:
                raise ConfigurationError(
                    f"kind {kind.name} draws from budget {kind.budget!r}, which the app does not "
                    f"declare (app.budget({kind.budget!r}, rpm=...))"
                )

    async def aclose(self) -> None:
        for kind in self:
            if kind.aclose is not None:
                await kind.aclose()


def load_app(reference: str) -> App:
    """The App named by 'package.module:attribute' (the attribute may be a function returning
    one); every failure is a ConfigurationError of one line naming the reference."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(
            f"invalid --app {reference!r}: expected 'package.module:attribute'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any error of the user's module at import is theirs to read
        raise ConfigurationError(
            f"invalid --app {reference!r}: cannot import {module_name}: "
            f"{type(error).__name__}: {error}"
        ) from None
    try:
        target = getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(
            f"invalid --app {reference!r}: module {module_name} has no attribute {attribute}"
        ) from None
    if callable(target) and not isinstance(target, App):
        target = target()
    if not isinstance(target, App):
        raise ConfigurationError(
            f"invalid --app {reference!r}: {attribute} is a {type(target).__name__}, "
            "not a listener.App"
        )
    return target
