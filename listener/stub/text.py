"""What the OpenAI stub reads and writes: the text of chat messages, a deterministic product
description for the prompt, and a rough token count for both.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any


def text_of(content: Any) -> str:
    """The text of a chat message's `content`, whether a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: only the text parts matter
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


_LABELLED = re.compile(r"(?im)^\s*(?:product(?:\s+name)?|name|title)\s*[:=]\s*(.+?)\s*$")
_QUOTED = re.compile(r"[\"“]([^\"”\n]{2,80})[\"”]")


def extract_product_name(prompt: str) -> str:
    """Best-effort product name: a 'Product: X' line, a quoted phrase, or text after a colon."""
    if match := _LABELLED.search(prompt):
        return match.group(1).strip(" .!?\"'")
    if match := _QUOTED.search(prompt):
        return match.group(1).strip()
    lines = [line.strip() for line in prompt.splitlines() if line.strip()]
    if not lines:
        return "this product"
    last = lines[-1]
    if ":" in last and (tail := last.rsplit(":", 1)[1].strip(" .!?")):
        return tail
    return " ".join(last.split()[:8]).strip(" .!?")


_ADJECTIVES = ("durable", "lightweight", "versatile", "sleek", "compact", "reliable")
_AUDIENCES = ("everyday use", "busy professionals", "outdoor adventures", "home and office")


def generate_description(prompt: str) -> str:
    """Deterministic, product-specific text so tests can assert on it."""
    name = extract_product_name(prompt)
    digest = hashlib.sha256(prompt.encode()).digest()
    adjective = _ADJECTIVES[digest[0] % len(_ADJECTIVES)]
    second = _ADJECTIVES[(digest[0] + 1 + digest[1] % 5) % len(_ADJECTIVES)]
    audience = _AUDIENCES[digest[2] % len(_AUDIENCES)]
    return (
        f"{name} is a {adjective} choice for {audience}. "
        f"It pairs {second} design with dependable performance, "
        f"so {name} keeps up with whatever you ask of it."
    )


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


# A user message holding one of these asks the stub to misbehave, so tests and the demo can
# exercise a structured output that is refused or does not fit its schema.
REFUSE_MARKER = "STUB:REFUSE"
INVALID_MARKER = "STUB:INVALID"


_AT_MOST = re.compile(r"at most (\d+) characters")


def object_for_schema(schema: Any, prompt: str) -> Any:
    """A deterministic value that fits a (strict-mode) JSON Schema, from the prompt's product."""
    return _fit(schema, extract_product_name(prompt), generate_description(prompt), "value")


def _fit(schema: Any, name: str, text: str, key: str) -> Any:
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for combined in ("anyOf", "oneOf", "allOf"):
        choices = schema.get(combined)
        if isinstance(choices, list) and choices:
            typed = [c for c in choices if isinstance(c, dict) and c.get("type") != "null"]
            return _fit((typed or choices)[0], name, text, key)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        return {
            field: _fit(sub, name, text, field)
            for field, sub in properties.items()
            if isinstance(field, str)
        }
    if kind == "array":
        count = max(1, int(schema.get("minItems", 1)))
        return [_fit(schema.get("items", {}), name, text, key) for _ in range(count)]
    if kind in ("integer", "number"):
        return schema.get("minimum", 1)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    value = f"{name} | {text}" if "title" in key or "name" in key else text
    limit = schema.get("maxLength")
    # A limit said in words in the description, as a model reads it.
    if limit is None and (said := _AT_MOST.search(str(schema.get("description", "")))):
        limit = int(said.group(1))
    if isinstance(limit, int) and len(value) > limit:
        value = value[:limit].rstrip()
    minimum = schema.get("minLength")
    if isinstance(minimum, int) and len(value) < minimum:
        value = value.ljust(minimum, ".")
    return value


# Markers of the Batch API and the flex tier: a batch line whose prompt holds BATCH_ERROR ends
# in the error file with a 500 body, BATCH_400 with a 400 body; a flex request whose prompt
# holds FLEX_UNAVAILABLE is answered "resource unavailable" (429), whatever the configured rate.
BATCH_ERROR_MARKER = "STUB:BATCH_ERROR"
BATCH_400_MARKER = "STUB:BATCH_400"
FLEX_UNAVAILABLE_MARKER = "STUB:FLEX_UNAVAILABLE"
