"""The price table: what OpenAI charges per model and tier, and the money a usage cost.

The built-in table (`prices.toml`, with the date its figures were read and their source) or
OPENAI_PRICES_FILE's, of the same shape. A mistake in the file is one line naming the file, the
model and the field: a worker or a report with a broken price table must not start. A model the
table does not list is "unpriced": logged once per model and process, counted, never a failure
(an item's answer is worth keeping whatever its price).
"""

from __future__ import annotations

import logging
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

from listener.errors import ConfigurationError
from listener.tiers import SERVED_TIERS

logger = logging.getLogger(__name__)

BUILT_IN = "prices.toml"
PER_TOKENS = 1_000_000
_PRICE_FIELDS = ("input", "cached_input", "output")
# A response names the model's dated snapshot ("gpt-4o-mini-2024-07-18"): priced as its alias
# when the table has no line of its own for it.
_SNAPSHOT = re.compile(r"^(?P<alias>.+)-\d{4}-\d{2}-\d{2}$")


class PriceTableError(ConfigurationError):
    """The price table cannot be used; the message names the file, the model and the field."""


@dataclass(frozen=True)
class Price:
    """Dollars per 1,000,000 tokens."""

    input: float
    cached_input: float
    output: float

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        """Prompt tokens include the cached ones (as OpenAI counts them): those are billed at
        the cached price, the rest at the input price."""
        cached = min(cached_tokens, prompt_tokens)
        return (
            (prompt_tokens - cached) * self.input
            + cached * self.cached_input
            + completion_tokens * self.output
        ) / PER_TOKENS


@dataclass
class PriceTable:
    prices: Mapping[tuple[str, str], Price]
    read_on: date
    source: str
    origin: str  # the file it was read from, for the operator's messages
    currency: str = "USD"
    # Models already logged as unpriced by this process: one line each, not one per reading.
    _warned: set[str] = field(default_factory=set, repr=False, compare=False)

    def price(self, model: str, tier: str) -> Price | None:
        found = self.prices.get((model, tier))
        if found is None:
            snapshot = _SNAPSHOT.match(model)
            if snapshot is not None:
                found = self.prices.get((snapshot.group("alias"), tier))
        if found is None:
            self._warn(model, tier)
        return found

    def models(self) -> list[str]:
        return sorted({model for model, _tier in self.prices})

    def _warn(self, model: str, tier: str) -> None:
        key = f"{model}\x1f{tier}"
        if key in self._warned:
            return
        self._warned.add(key)
        logger.warning(
            "[Cost] model %r on the %s tier is not in the price table (%s, read on %s): its "
            "items are shown as unpriced; add it to OPENAI_PRICES_FILE",
            model or "(none)",
            tier,
            self.origin,
            self.read_on.isoformat(),
        )


def load_built_in() -> PriceTable:
    text = resources.files("listener.openai").joinpath(BUILT_IN).read_text("utf-8")
    return parse(text, f"listener/openai/{BUILT_IN}")


def load_file(path: str) -> PriceTable:
    try:
        text = Path(path).read_text("utf-8")
    except OSError as error:
        raise PriceTableError(
            f"invalid setting OPENAI_PRICES_FILE: cannot read {path}: {error.strerror}"
        ) from None
    except UnicodeDecodeError:
        raise PriceTableError(f"invalid setting OPENAI_PRICES_FILE: {path} is not UTF-8") from None
    return parse(text, path)


def load(prices_file: str | None) -> PriceTable:
    """OPENAI_PRICES_FILE's table when set, the built-in one otherwise."""
    return load_file(prices_file) if prices_file else load_built_in()


def parse(text: str, origin: str) -> PriceTable:
    where = f"price table {origin}"
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PriceTableError(f"{where}: {error}") from None
    read_on = document.get("read_on")
    if not isinstance(read_on, date):
        raise PriceTableError(
            f"{where}: read_on must be the date the prices were read (read_on = 2026-12-07)"
        )
    source = document.get("source", "")
    currency = document.get("currency", "USD")
    if not isinstance(source, str) or not isinstance(currency, str):
        raise PriceTableError(f"{where}: source and currency must be strings")
    models = document.get("models")
    if not isinstance(models, dict) or not models:
        raise PriceTableError(f'{where}: no [models."<name>"] table')
    unknown = sorted(set(document) - {"read_on", "source", "currency", "models"})
    if unknown:
        raise PriceTableError(f"{where}: unknown key(s) {', '.join(unknown)}")
    prices: dict[tuple[str, str], Price] = {}
    for model, tiers in models.items():
        if not isinstance(tiers, dict):
            raise PriceTableError(f"{where}: model {model}: expected a table of tiers")
        for tier, figures in tiers.items():
            prices[(model, tier)] = _price(figures, f"{where}: model {model}, tier {tier}", tier)
        if (model, "realtime") not in prices:
            # The savings of the other tiers are measured against it.
            raise PriceTableError(f"{where}: model {model}: no realtime price")
    return PriceTable(prices, read_on, source, origin, currency)


def _price(figures: Any, where: str, tier: str) -> Price:
    if tier not in SERVED_TIERS:
        raise PriceTableError(f"{where}: the tier must be one of {', '.join(SERVED_TIERS)}")
    if not isinstance(figures, dict):
        raise PriceTableError(
            f"{where}: expected {{ input = ..., cached_input = ..., output = ... }}"
        )
    unknown = sorted(set(figures) - set(_PRICE_FIELDS))
    if unknown:
        raise PriceTableError(f"{where}: unknown field(s) {', '.join(unknown)}")
    values: dict[str, float] = {}
    for name in _PRICE_FIELDS:
        value = figures.get(name, figures.get("input") if name == "cached_input" else None)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PriceTableError(f"{where}: {name} must be dollars per 1M tokens (a number)")
        if not math.isfinite(value) or value < 0:
            raise PriceTableError(f"{where}: {name} must be 0 or more, got {value}")
        values[name] = float(value)
    return Price(**values)
