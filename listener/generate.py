"""The item handler: a product's data in, one chat completion out, the text and usage stored.

Every attempt goes through our limiter and our retry policy, so the client's own retries are
off; the API's answer is turned into one of our errors, which the worker knows how to treat.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import openai

from listener.errors import (
    AuthenticationFailed,
    PermanentItemError,
    RateLimited,
    RetryableItemError,
    one_line,
)
from listener.items import ClaimedItem
from listener.settings import Settings

SYSTEM_PROMPT = (
    "You write product descriptions for an online store. Write one engaging, accurate "
    "description of the product in its language (English unless told otherwise), using only "
    "the facts given. Plain text, at most 120 words."
)
# Fields shown to the model in this order; anything else in the payload follows as attributes.
KNOWN_FIELDS = ("name", "description", "brand", "category", "price", "currency", "language")
DEFAULT_RETRY_AFTER = 1.0
# The longest wait a header may ask for: "inf", "1e308" or a typo would otherwise hold every
# worker of the fleet (or fail the limiter's pause); a day is more than any real reset.
MAX_WAIT_SECONDS = 86_400.0
# ASCII digits only: \d and str.isdigit() also take other scripts' digits and "²", which
# float() and int() then refuse.
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Generation:
    result: dict[str, Any]
    total_tokens: int
    # The server says the budget is spent until this many seconds from now (headers).
    pause_seconds: float | None = None


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def read_payload(item: ClaimedItem, max_bytes: int) -> Any:
    """The item's payload as Python data; one that cannot be read is a permanent error."""
    if item.payload_bytes is None:
        raise PermanentItemError(
            "payload is missing (NULL): a JSON object with the product's data is required"
        )
    if item.payload_text is None:
        raise PermanentItemError(
            f"payload is {item.payload_bytes:,} bytes, over the limit of {max_bytes:,} "
            "(MAX_PAYLOAD_BYTES)"
        )
    return json.loads(item.payload_text)


def prompt_for(item: ClaimedItem, max_bytes: int) -> list[dict[str, str]]:
    """The chat messages for one item, or a permanent error saying why there can be none."""
    try:
        return build_messages(read_payload(item, max_bytes))
    except RecursionError:
        # Python reads and writes JSON recursively: deep nesting is not product data.
        raise PermanentItemError("payload is nested too deeply to read") from None


def build_messages(payload: Any) -> list[dict[str, str]]:
    """The chat messages for one product; a payload the prompt cannot use is a permanent error."""
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            raise PermanentItemError(
                "payload must be a JSON object with the product's data, got a string"
            ) from None
    if not isinstance(payload, dict):
        raise PermanentItemError(
            f"payload must be a JSON object with the product's data, got {_json_type(payload)}"
        )
    name = payload.get("name")
    if not isinstance(name, str) or not name.strip():
        raise PermanentItemError("payload has no product 'name' (a non-empty string is required)")
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
    language = payload.get("language")
    if isinstance(language, str) and language.strip():
        lines.append(f"Write the description in {language.strip()}.")
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "\n".join(lines)},
    ]


def _render(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def parse_duration(text: str | None) -> float | None:
    """OpenAI's reset headers: '1s', '6m0s', '120ms', '1h2m3.5s'; also plain seconds. None
    for what is no finite duration ('inf', 'nan', garbage)."""
    if not text:
        return None
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
        parts = _DURATION.findall(text)
        if not parts or "".join(a + b for a, b in parts) != text:
            return None
        seconds = sum(float(amount) * scale[unit] for amount, unit in parts)
    # Before the max(): max(0.0, nan) is 0.0.
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _bounded(seconds: float) -> float:
    return min(seconds, MAX_WAIT_SECONDS)


def retry_after(headers: Mapping[str, str]) -> float:
    """How long a 429 asks us to wait, from the most precise header present."""
    milliseconds = parse_duration(headers.get("retry-after-ms"))
    if milliseconds is not None:
        return _bounded(milliseconds / 1000.0)
    for name in ("retry-after", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        seconds = parse_duration(headers.get(name))
        if seconds is not None:
            return _bounded(seconds)
    return DEFAULT_RETRY_AFTER


def budget_pause(headers: Mapping[str, str], next_tokens: int) -> float | None:
    """The server's own view of the budget: spent now means wait for its reset, for everyone."""
    pauses = []
    remaining = headers.get("x-ratelimit-remaining-requests")
    if remaining is not None and remaining.strip() == "0":
        pauses.append(parse_duration(headers.get("x-ratelimit-reset-requests")))
    tokens = headers.get("x-ratelimit-remaining-tokens")
    if tokens is not None and _DIGITS.fullmatch(tokens.strip()) and int(tokens) < next_tokens:
        pauses.append(parse_duration(headers.get("x-ratelimit-reset-tokens")))
    known = [p for p in pauses if p]
    return _bounded(max(known)) if known else None


class Generator:
    """Calls the chat completions API for one item at a time."""

    def __init__(self, settings: Settings, client: openai.AsyncOpenAI | None = None) -> None:
        self.model = settings.openai_model
        self.max_tokens = settings.openai_max_tokens
        self.max_payload_bytes = settings.max_payload_bytes
        if client is None:
            key = settings.openai_api_key
            client = openai.AsyncOpenAI(
                api_key=key.get_secret_value() if key else "missing",
                base_url=settings.openai_base_url,
                max_retries=0,
                timeout=settings.openai_timeout_seconds,
            )
        self.client = client

    async def aclose(self) -> None:
        """Close the HTTP connections now, inside the event loop that opened them."""
        await self.client.close()

    def estimate_tokens(self) -> int:
        """Reserved before the item is known; the limiter is corrected with the real usage."""
        return 250 + self.max_tokens

    async def __call__(self, item: ClaimedItem) -> Generation:
        messages = prompt_for(item, self.max_payload_bytes)
        try:
            raw = await self.client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=self.max_tokens,
            )
            completion = raw.parse()
        except openai.RateLimitError as error:
            body = error.body if isinstance(error.body, dict) else {}
            if body.get("code") == "insufficient_quota":
                raise AuthenticationFailed(
                    "OpenAI says the account has no quota left (429 insufficient_quota)"
                ) from None
            raise RateLimited(_describe(error), retry_after(error.response.headers)) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            raise AuthenticationFailed(
                f"OpenAI rejected the API key ({error.status_code}): check OPENAI_API_KEY"
            ) from None
        except openai.NotFoundError as error:
            raise AuthenticationFailed(
                f"OpenAI does not know model {self.model!r} or the endpoint (404): "
                f"check OPENAI_MODEL and OPENAI_BASE_URL ({_describe(error)})"
            ) from None
        except (openai.BadRequestError, openai.UnprocessableEntityError) as error:
            raise PermanentItemError(f"request rejected: {_describe(error)}") from None
        except openai.APITimeoutError:
            raise RetryableItemError("OpenAI request timed out") from None
        except openai.APIConnectionError as error:
            raise RetryableItemError(f"cannot reach OpenAI: {error}") from None
        except openai.APIStatusError as error:
            raise RetryableItemError(
                f"OpenAI error {error.status_code}: {_describe(error)}"
            ) from None
        except (ValueError, openai.APIResponseValidationError) as error:
            raise RetryableItemError(f"malformed response from OpenAI: {error}") from None
        if not completion.choices or completion.choices[0].message.content is None:
            raise RetryableItemError("OpenAI answered without a completion")
        usage = completion.usage
        prompt_tokens = usage.prompt_tokens if usage else 0
        completion_tokens = usage.completion_tokens if usage else 0
        total = usage.total_tokens if usage else self.estimate_tokens()
        result = {
            "text": completion.choices[0].message.content,
            "model": completion.model,
            "finish_reason": completion.choices[0].finish_reason,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": total,
            },
        }
        pause = budget_pause(raw.headers, self.estimate_tokens())
        return Generation(result=result, total_tokens=total, pause_seconds=pause)


def _describe(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        message = body.get("message") or (body.get("error") or {}).get("message")
        if message:
            return one_line(str(message))
    return one_line(str(error.message))
