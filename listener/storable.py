"""Outcomes made storable before they are written: what PostgreSQL would refuse, and can be
cleaned without changing what the item's answer says, is cleaned, and the result says so.

A model's answer or an error's text can hold characters that neither `text` nor `jsonb` store:
NUL (U+0000: `text` cannot hold it, `jsonb` refuses its escape) and unpaired UTF-16 surrogates
(U+D800..U+DFFF alone: not UTF-8, and `jsonb` refuses their escapes). Left in, one of them made
the whole batch's statement fail, again at every retry. NUL is removed (it carries nothing a
reader sees) and an unpaired surrogate becomes U+FFFD, the replacement character, as any
decoder would show it. What cannot be cleaned (a NaN in a result, a value some constraint
refuses) is left to the database to refuse: the completer then fails that item alone
(`complete.py`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from listener.handler import USAGE_KEYS
from listener.tiers import SERVED_TIERS

if TYPE_CHECKING:
    from listener.items import Outcome

logger = logging.getLogger(__name__)

# listener_usage_tokens (sql/schema.sql) reads counts up to 10^15; a larger one is a bug.
MAX_TOKENS = 10**15
# A model name is a label in reports and metrics, not data: longer is a bug.
MAX_MODEL_LENGTH = 200

# The key added to a result that was cleaned: {"nul_removed": n, "surrogates_replaced": m}.
CLEANED_KEY = "cleaned_for_storage"
REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Cleaning:
    """What was changed, counted over every string of one value."""

    nul_removed: int = 0
    surrogates_replaced: int = 0

    def __bool__(self) -> bool:
        return bool(self.nul_removed or self.surrogates_replaced)

    def note(self) -> dict[str, int]:
        return {"nul_removed": self.nul_removed, "surrogates_replaced": self.surrogates_replaced}

    def text(self) -> str:
        parts = []
        if self.nul_removed:
            parts.append(f"{self.nul_removed} NUL character(s) removed")
        if self.surrogates_replaced:
            parts.append(f"{self.surrogates_replaced} unpaired surrogate(s) replaced by U+FFFD")
        return "; ".join(parts)


def clean_text(text: str, cleaning: Cleaning) -> str:
    if text.isascii():  # the common case, and ASCII holds no surrogate
        if "\x00" not in text:
            return text
    elif _SURROGATE.search(text):
        # Through UTF-16: two halves of a pair (a str built by hand) join into their character,
        # and each unpaired one becomes one U+FFFD.
        fixed = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        cleaning.surrogates_replaced += fixed.count(REPLACEMENT) - text.count(REPLACEMENT)
        text = fixed
    nul = text.count("\x00")
    if nul:
        cleaning.nul_removed += nul
        text = text.replace("\x00", "")
    return text


def clean_value(value: Any, cleaning: Cleaning) -> Any:
    """A JSON-like value with every string cleaned, keys included; anything else as it is."""
    if isinstance(value, str):
        return clean_text(value, cleaning)
    if isinstance(value, dict):
        return {
            clean_text(k, cleaning) if isinstance(k, str) else k: clean_value(v, cleaning)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [clean_value(v, cleaning) for v in value]
    return value


def checked_usage(usage: Any, item_id: int) -> dict[str, int] | None:
    """The usage counts a handler reported, as stored: whole numbers 0..10^15 of USAGE_KEYS.
    Anything else is a handler's bug: dropped with a warning (the answer is kept)."""
    if usage is None:
        return None
    if not isinstance(usage, Mapping):
        logger.warning("[Worker] item %d: usage is not a mapping, not recorded", item_id)
        return None
    counts = {}
    for key in USAGE_KEYS:
        value = usage.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
            logger.warning(
                "[Worker] item %d: usage %s is %r, not a token count; usage not recorded",
                item_id,
                key,
                value,
            )
            return None
        counts[key] = value
    return counts


def _metering(outcome: Outcome) -> dict[str, Any]:
    """The changes that make an outcome's metering storable (a COMPLETED outcome's only)."""
    if outcome.status != "COMPLETED":
        if outcome.usage is None and outcome.model is None and outcome.served_tier is None:
            return {}
        return {"usage": None, "model": None, "served_tier": None}
    changes: dict[str, Any] = {}
    usage = checked_usage(outcome.usage, outcome.item_id)
    if usage != outcome.usage:
        changes["usage"] = usage
    if outcome.model is not None and (
        not isinstance(outcome.model, str) or len(outcome.model) > MAX_MODEL_LENGTH
    ):
        logger.warning("[Worker] item %d: model %r not recorded", outcome.item_id, outcome.model)
        changes["model"] = None
    elif outcome.model is not None:
        model = clean_text(outcome.model, Cleaning())
        if model != outcome.model:
            changes["model"] = model
    if outcome.served_tier is not None and outcome.served_tier not in SERVED_TIERS:
        logger.warning(
            "[Worker] item %d: served tier %r is none of %s; its cost is not recorded",
            outcome.item_id,
            outcome.served_tier,
            ", ".join(SERVED_TIERS),
        )
        changes["served_tier"] = None
    return changes


def storable(outcome: Outcome) -> Outcome:
    """The outcome as it can be stored: the same object when nothing needed cleaning.

    A cleaned result carries CLEANED_KEY; a cleaned error text ends with a note in brackets (an
    error has no result to carry it).
    """
    changes: dict[str, Any] = _metering(outcome)
    if outcome.result is not None:
        cleaning = Cleaning()
        result = clean_value(outcome.result, cleaning)
        if cleaning:
            changes["result"] = {**result, CLEANED_KEY: cleaning.note()}
    if outcome.error is not None:
        cleaning = Cleaning()
        error = clean_text(outcome.error, cleaning)
        if cleaning:
            changes["error"] = f"{error} [cleaned for storage: {cleaning.text()}]"
    return replace(outcome, **changes) if changes else outcome
