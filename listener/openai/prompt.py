"""The chat messages of one item: the kind's system prompt, then its user message rendered from
the item's payload and options.

Product text is untrusted input (a merchant, or whoever wrote the product, typed it): it only
ever goes into the user message, as data. The system prompt is rendered from the options alone
(the app's and the operator's words), never from the payload.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NoReturn

import jinja2
import jinja2.sandbox

from listener.errors import FailItem
from listener.handler import Item

# Fields shown to the model in this order; anything else in the payload follows as attributes.
KNOWN_FIELDS = ("name", "description", "brand", "category", "price", "currency", "language")

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def product_object(payload: Any) -> dict[str, Any]:
    """The payload as a product; one the prompt cannot use is the item's fault."""
    if payload is None:
        raise FailItem(
            "payload is missing (NULL) or null: a JSON object with the product's data is "
            "required, got null"
        )
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            raise FailItem(
                "payload must be a JSON object with the product's data, got a string"
            ) from None
    if not isinstance(payload, dict):
        raise FailItem(
            f"payload must be a JSON object with the product's data, got {_json_type(payload)}"
        )
    return payload


def product_facts(payload: Any) -> str:
    """The product's data as labelled lines: its name first, then the known fields, then the
    rest as attributes."""
    payload = product_object(payload)
    name = payload.get("name")
    if not isinstance(name, str) or not name.strip():
        raise FailItem("payload has no product 'name' (a non-empty string is required)")
    lines = [f"Product name: {name.strip()}"]
    for key in KNOWN_FIELDS[1:]:
        value = payload.get(key)
        if value not in (None, ""):
            lines.append(f"{key.capitalize()}: {_render(value)}")
    extra = {k: v for k, v in payload.items() if k not in KNOWN_FIELDS and v not in (None, "")}
    attributes = extra.pop("attributes", None)
    if isinstance(attributes, dict):
        extra = {**attributes, **extra}
    elif attributes is not None:
        extra["attributes"] = attributes
    if extra:
        lines.append("Attributes:")
        lines.extend(f"- {key}: {_render(value)}" for key, value in extra.items())
    return "\n".join(lines)


def _render(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


class _ProductFacts:
    """`{{ product }}` in a template: rendered only when used, so a kind whose template does not
    show the product does not need a product-shaped payload."""

    def __init__(self, payload: Any) -> None:
        self._payload = payload

    def __str__(self) -> str:
        return product_facts(self._payload)


class _MissingField(jinja2.Undefined):
    """A template names a field the item lacks: the item fails, the reason names the field."""

    def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> NoReturn:
        owner = self._undefined_obj
        name = self._undefined_name
        if isinstance(owner, dict) and name is not None:
            raise FailItem(f"the template names field {name!r}, which the item lacks")
        raise FailItem(f"the template names {name!r}, which the item lacks")

    # Shown, it fails the item; tested (`{% if options.tone %}`), it is false, as Jinja's own
    # lenient Undefined is: a kind may use an option only when it is set.
    def __str__(self) -> str:
        self._fail_with_undefined_error()


# Sandboxed: a template is the app's code, but what it renders is data, and a template that
# reaches for attributes of Python objects is refused instead of run.
_ENVIRONMENT = jinja2.sandbox.SandboxedEnvironment(
    undefined=_MissingField, autoescape=False, keep_trailing_newline=False
)


def compile_template(source: str) -> jinja2.Template:
    """A template, or jinja2.TemplateSyntaxError (the kinds file reports it, naming the kind)."""
    return _ENVIRONMENT.from_string(source)


def language_of(item: Item) -> str | None:
    """The language asked for: the job's (or its store's) option, else the product's own."""
    for source in (item.options, item.payload if isinstance(item.payload, dict) else {}):
        value = source.get("language")
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def context(item: Item) -> dict[str, Any]:
    """What a user-message template sees."""
    payload = item.payload if isinstance(item.payload, dict) else {}
    return {
        "payload": payload,
        "options": dict(item.options),
        "product": _ProductFacts(item.payload),
        "language": language_of(item),
        "store": item.store,
        "kind": item.kind,
    }


def system_context(options: Mapping[str, Any], item: Item) -> dict[str, Any]:
    """What a system-prompt template sees: the options, never the payload."""
    return {"options": dict(options), "language": options.get("language"), "kind": item.kind}


def render(template: jinja2.Template, values: Mapping[str, Any]) -> str:
    try:
        return template.render(values).strip()
    except RecursionError:
        raise FailItem("payload is nested too deeply to read") from None
    except jinja2.TemplateError as error:
        raise FailItem(f"the template cannot be rendered for this item: {error}") from None
