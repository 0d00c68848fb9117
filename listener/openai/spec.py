"""Kinds as data: a TOML file, one table per kind, read into `KindSpec`s.

    [seo_meta]
    system = "You write SEO titles and meta descriptions for an online store."
    user = "{{ product }}"
    max_tokens = 200
    schema = { type = "object", properties = { ... }, required = [...] }

Every mistake is one line naming the file, the kind and the field: a worker with a broken kinds
file must not start and fail its items one by one.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jsonschema
import jsonschema.exceptions

from listener.errors import ConfigurationError
from listener.handler import DEFAULT_BUDGET, KIND_NAME
from listener.openai.prompt import compile_template
from listener.tiers import REALTIME, TIERS

BUILT_IN = "kinds.toml"
_FIELDS = {
    "model", "system", "user", "max_tokens", "temperature", "schema", "schema_name", "budget",
    "max_attempts", "options", "required_options", "description", "tier",
}  # fmt: skip


@dataclass(frozen=True)
class KindSpec:
    name: str
    system: jinja2.Template
    user: jinja2.Template
    model: str | None = None  # None: OPENAI_MODEL
    max_tokens: int | None = None  # None: OPENAI_MAX_TOKENS
    temperature: float | None = None
    schema: dict[str, Any] | None = None  # the answer's JSON Schema (structured output)
    schema_name: str | None = None
    budget: str | None = DEFAULT_BUDGET
    max_attempts: int | None = None
    options: frozenset[str] | None = None
    required_options: frozenset[str] = frozenset()
    description: str = ""
    tier: str = REALTIME  # the tier of its jobs that name none (listener.tiers)


class KindsFileError(ConfigurationError):
    """The kinds file cannot be used; the message names the file, the kind and the field."""


def load_built_in() -> dict[str, KindSpec]:
    text = resources.files("listener.openai").joinpath(BUILT_IN).read_text("utf-8")
    return parse(text, f"listener/openai/{BUILT_IN}")


def load_file(path: str) -> dict[str, KindSpec]:
    try:
        text = Path(path).read_text("utf-8")
    except OSError as error:
        raise KindsFileError(
            f"invalid setting OPENAI_KINDS_FILE: cannot read {path}: {error.strerror}"
        ) from None
    except UnicodeDecodeError:
        raise KindsFileError(f"kinds file {path}: not UTF-8 text") from None
    return parse(text, path)


def parse(text: str, source: str) -> dict[str, KindSpec]:
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise KindsFileError(f"kinds file {source}: {error}") from None
    specs: dict[str, KindSpec] = {}
    for name, table in tables.items():
        where = f"kinds file {source}: kind {name}"
        if not isinstance(table, dict):
            raise KindsFileError(f"{where}: expected a table ([{name}]), got a value")
        specs[name] = _spec(name, table, where)
    return specs


def _spec(name: str, table: dict[str, Any], where: str) -> KindSpec:
    if not KIND_NAME.match(name):
        raise KindsFileError(
            f"{where}: invalid name (lower-case letters, digits, '_', '.' or '-', "
            "starting with a letter)"
        )
    unknown = sorted(set(table) - _FIELDS)
    if unknown:
        raise KindsFileError(
            f"{where}: field {unknown[0]}: unknown (known: {', '.join(sorted(_FIELDS))})"
        )
    system = _text(table, "system", where, required=True)
    user = _text(table, "user", where, required=False) or "{{ product }}"
    options = _names(table, "options", where)
    required = _names(table, "required_options", where) or frozenset()
    if options is not None and not required <= options:
        raise KindsFileError(f"{where}: field required_options: names options not in options")
    return KindSpec(
        name=name,
        system=_template(system or "", where, "system"),
        user=_template(user, where, "user"),
        model=_text(table, "model", where, required=False),
        max_tokens=_integer(table, "max_tokens", where),
        temperature=_temperature(table, where),
        schema=_schema(table, where),
        schema_name=_text(table, "schema_name", where, required=False),
        budget=_budget(table, where),
        max_attempts=_integer(table, "max_attempts", where),
        options=options,
        required_options=required,
        description=_text(table, "description", where, required=False) or "",
        tier=_tier(table, where),
    )


def _tier(table: dict[str, Any], where: str) -> str:
    value = table.get("tier", REALTIME)
    if value not in TIERS:
        raise KindsFileError(f"{where}: field tier: expected one of {', '.join(TIERS)}")
    return str(value)


def _text(table: dict[str, Any], field: str, where: str, *, required: bool) -> str | None:
    value = table.get(field)
    if value is None:
        if required:
            raise KindsFileError(f"{where}: field {field}: missing")
        return None
    if not isinstance(value, str) or not value.strip():
        raise KindsFileError(f"{where}: field {field}: expected a non-empty string")
    return value


def _template(source: str, where: str, field: str) -> jinja2.Template:
    try:
        return compile_template(source)
    except jinja2.TemplateSyntaxError as error:
        raise KindsFileError(
            f"{where}: field {field}: template error on line {error.lineno}: {error.message}"
        ) from None


def _integer(table: dict[str, Any], field: str, where: str) -> int | None:
    value = table.get(field)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise KindsFileError(f"{where}: field {field}: expected a positive integer")
    return value


def _temperature(table: dict[str, Any], where: str) -> float | None:
    value = table.get("temperature")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 2:
        raise KindsFileError(f"{where}: field temperature: expected a number from 0 to 2")
    return float(value)


def _names(table: dict[str, Any], field: str, where: str) -> frozenset[str] | None:
    value = table.get(field)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise KindsFileError(f"{where}: field {field}: expected a list of option names")
    return frozenset(value)


def _budget(table: dict[str, Any], where: str) -> str | None:
    if "budget" not in table:
        return DEFAULT_BUDGET
    value = table["budget"]
    if value in ("", "none"):
        return None
    if not isinstance(value, str):
        raise KindsFileError(f'{where}: field budget: expected a budget\'s name, or "none"')
    return value


def _schema(table: dict[str, Any], where: str) -> dict[str, Any] | None:
    value = table.get("schema")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise KindsFileError(f"{where}: field schema: not JSON: {error}") from None
    if not isinstance(value, dict):
        raise KindsFileError(f"{where}: field schema: expected a JSON Schema object")
    try:
        jsonschema.Draft202012Validator.check_schema(value)
    except jsonschema.exceptions.SchemaError as error:
        path = "/".join(str(part) for part in error.absolute_path) or "(root)"
        raise KindsFileError(
            f"{where}: field schema: not a valid JSON Schema at {path}: {error.message}"
        ) from None
    if value.get("type") != "object":
        raise KindsFileError(
            f"{where}: field schema: structured outputs need an object at the root "
            '(type = "object")'
        )
    return value
