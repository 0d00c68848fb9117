"""The OpenAI handler: one chat completion for an item of a `KindSpec`, its answer checked and
turned into a `Result`; the API's errors turned into the seam's errors, which steer the item.

Every attempt goes through the worker's budget and retry policy, so the client's own retries
are off.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any, NoReturn

import jsonschema
import openai
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion

from listener.errors import (
    BudgetExhausted,
    FailItem,
    RetryItem,
    StopWorker,
    one_line,
)
from listener.handler import Item, Result
from listener.openai.flex import FlexPolicy, is_unavailable
from listener.openai.prompt import context, render, system_context
from listener.openai.spec import KindSpec
from listener.settings import Settings
from listener.tiers import FLEX, REALTIME

DEFAULT_RETRY_AFTER = 1.0
# A server asking for a longer pause than this (or an infinite one) is wrong: the budget waits
# a day at most, then the next 429 says again.
MAX_RETRY_AFTER = 86_400.0
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """OpenAI's reset headers: '1s', '6m0s', '120ms', '1h2m3.5s'; also plain seconds. Anything
    else, or a value that is not finite, is None."""
    if not text:
        return None
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return min(MAX_RETRY_AFTER, max(0.0, seconds)) if math.isfinite(seconds) else None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = _DURATION.findall(text)
    if not parts or "".join(a + b for a, b in parts) != text:
        return None
    return min(MAX_RETRY_AFTER, sum(float(amount) * scale[unit] for amount, unit in parts))


def retry_after(headers: Mapping[str, str]) -> float:
    """How long a 429 asks us to wait, from the most precise header present."""
    milliseconds = parse_duration(headers.get("retry-after-ms"))
    if milliseconds is not None:
        return milliseconds / 1000.0
    for name in ("retry-after", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        seconds = parse_duration(headers.get(name))
        if seconds is not None:
            return seconds
    return DEFAULT_RETRY_AFTER


def _whole_number(text: str | None) -> int | None:
    # str.isdigit() also accepts '²' and other digits int() refuses.
    if text is None or not text.strip().isascii() or not text.strip().isdecimal():
        return None
    return int(text.strip())


def budget_pause(headers: Mapping[str, str], next_tokens: int) -> float | None:
    """The server's own view of the budget: spent now means wait for its reset, for everyone."""
    pauses = []
    if _whole_number(headers.get("x-ratelimit-remaining-requests")) == 0:
        pauses.append(parse_duration(headers.get("x-ratelimit-reset-requests")))
    tokens = _whole_number(headers.get("x-ratelimit-remaining-tokens"))
    if tokens is not None and tokens < next_tokens:
        pauses.append(parse_duration(headers.get("x-ratelimit-reset-tokens")))
    known = [p for p in pauses if p]
    return max(known) if known else None


# Keywords that strict mode has not always accepted: the request carries them in words in the
# field's description instead, and the answer is checked against the full schema here.
_IN_WORDS = {
    "maxLength": "at most {} characters",
    "minLength": "at least {} characters",
}


def request_schema(schema: Any) -> Any:
    """The schema as the request sends it: the full schema less the keywords of `_IN_WORDS`,
    each said in the description of the field it bounded."""
    if isinstance(schema, list):
        return [request_schema(part) for part in schema]
    if not isinstance(schema, dict):
        return schema
    copy = {key: request_schema(value) for key, value in schema.items() if key not in _IN_WORDS}
    said = [text.format(schema[key]) for key, text in _IN_WORDS.items() if key in schema]
    if said:
        description = str(schema.get("description", "")).rstrip(". ")
        copy["description"] = "; ".join(([description] if description else []) + said) + "."
    return copy


def make_client(settings: Settings) -> openai.AsyncOpenAI:
    key = settings.openai_api_key
    return openai.AsyncOpenAI(
        api_key=key.get_secret_value() if key else "missing",
        base_url=settings.openai_base_url,
        max_retries=0,
        timeout=settings.openai_timeout_seconds,
    )


class ChatHandler:
    """Calls the chat completions API for the items of one kind."""

    def __init__(self, spec: KindSpec, settings: Settings, client: openai.AsyncOpenAI) -> None:
        self.spec = spec
        self.flex = FlexPolicy(settings.flex_fallback_seconds, settings.openai_flex_timeout_seconds)
        self.model = spec.model or settings.openai_model
        self.max_tokens = spec.max_tokens or settings.openai_max_tokens
        self.client = client
        self._validator = (
            jsonschema.Draft202012Validator(spec.schema) if spec.schema is not None else None
        )
        self._request_schema = request_schema(spec.schema)

    def estimate_tokens(self) -> int:
        """Reserved before the item is known; the budget is corrected with the real usage."""
        return 250 + self.max_tokens

    def messages(self, item: Item) -> list[dict[str, str]]:
        system = render(self.spec.system, system_context(item.options, item))
        user = render(self.spec.user, context(item))
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def request(self, item: Item) -> dict[str, Any]:
        """The request body: what a batch line would send too."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.messages(item),
            "max_tokens": self.max_tokens,
        }
        if self.spec.temperature is not None:
            body["temperature"] = self.spec.temperature
        if self.spec.schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": self.spec.schema_name or self.spec.name,
                    "strict": True,
                    "schema": self._request_schema,
                },
            }
        return body

    async def __call__(self, item: Item) -> Result:
        body = self.request(item)
        started = datetime.now(UTC)
        flex = self.flex.use_flex(item, started)
        if flex:
            # Flex answers are slower: OpenAI advises a long client timeout.
            body |= {"service_tier": FLEX, "timeout": self.flex.timeout_seconds}
        try:
            raw = await self.client.chat.completions.with_raw_response.create(**body)
            completion = raw.parse()
        except openai.RateLimitError as error:
            if flex and is_unavailable(error):
                raise self.flex.deferral(item, datetime.now(UTC)) from None
            error_body = error.body if isinstance(error.body, dict) else {}
            if error_body.get("code") == "insufficient_quota":
                raise StopWorker(
                    "OpenAI says the account has no quota left (429 insufficient_quota)"
                ) from None
            raise BudgetExhausted(_describe(error), retry_after(error.response.headers)) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            raise StopWorker(
                f"OpenAI rejected the API key ({error.status_code}): check OPENAI_API_KEY"
            ) from None
        except openai.NotFoundError as error:
            raise StopWorker(
                f"OpenAI does not know model {self.model!r} or the endpoint (404): "
                f"check OPENAI_MODEL and OPENAI_BASE_URL ({_describe(error)})"
            ) from None
        except (openai.BadRequestError, openai.UnprocessableEntityError) as error:
            raise FailItem(f"request rejected: {_describe(error)}") from None
        except openai.APITimeoutError:
            raise RetryItem("OpenAI request timed out") from None
        except openai.APIConnectionError as error:
            raise RetryItem(f"cannot reach OpenAI: {error}") from None
        except openai.APIStatusError as error:
            raise RetryItem(f"OpenAI error {error.status_code}: {_describe(error)}") from None
        except (ValueError, openai.APIResponseValidationError) as error:
            raise RetryItem(f"malformed response from OpenAI: {error}") from None
        pause = budget_pause(raw.headers, self.estimate_tokens())
        return self.answer(item, completion, pause, FLEX if flex else REALTIME)

    def answer(
        self,
        item: Item,
        completion: ChatCompletion,
        pause: float | None = None,
        requested: str = REALTIME,
    ) -> Result:
        """The completion checked and turned into the item's Result; a bad answer raises
        RetryItem or FailItem. A batch's output line goes through here too (listener.batches),
        so batch answers are checked exactly as real-time ones."""
        if not completion.choices:
            raise RetryItem("OpenAI answered without a completion")
        message = completion.choices[0].message
        usage = completion.usage
        total = usage.total_tokens if usage else self.estimate_tokens()
        result: dict[str, Any] = {
            "model": completion.model,
            "finish_reason": completion.choices[0].finish_reason,
            "usage": {
                "prompt_tokens": usage.prompt_tokens if usage else 0,
                "completion_tokens": usage.completion_tokens if usage else 0,
                "total_tokens": total,
            },
        }
        metered = partial(
            Result,
            cost=total,
            pause=pause,
            usage=_usage(usage),
            model=completion.model or self.model,
            served_tier=served_tier(completion.service_tier, requested),
        )
        if self._validator is None:
            if message.content is None:
                raise RetryItem("OpenAI answered without a completion")
            return metered({"text": message.content, **result})
        output = self._structured(item, message.content, message.refusal)
        return metered({"output": output, **result})

    def _structured(self, item: Item, content: str | None, refusal: str | None) -> Any:
        """The answer as data that fits the kind's schema. A refusal or an answer that does not
        fit is tried once more (the model's sampling may do better), then fails the item."""
        if refusal:
            self._bad_answer(item, f"the model refused: {one_line(refusal)}")
        if content is None:
            self._bad_answer(item, "the model answered without content")
        try:
            output = json.loads(content or "")
        except ValueError:
            self._bad_answer(item, "the answer is not JSON")
        assert self._validator is not None
        error = next(iter(self._validator.iter_errors(output)), None)
        if error is not None:
            where = "/".join(str(part) for part in error.absolute_path) or "(root)"
            self._bad_answer(
                item, f"the answer does not fit the schema at {where}: {one_line(error.message)}"
            )
        return output

    def _bad_answer(self, item: Item, reason: str) -> NoReturn:
        if item.attempt < 2 and item.attempt < item.max_attempts:
            raise RetryItem(reason, after=0.0)
        raise FailItem(reason)


def served_tier(reported: str | None, requested: str) -> str:
    """Our tier for the `service_tier` a response reports: "flex" is flex, any other answer
    ("default", "auto", "priority", ...) the standard price list, realtime; a response that
    says nothing was served as requested."""
    if reported is None:
        return requested
    return "flex" if reported == "flex" else "realtime"


def _usage(usage: CompletionUsage | None) -> dict[str, int] | None:
    """The response's usage as stored: prompt (cached included, as OpenAI counts them),
    cached and completion tokens."""
    if usage is None:
        return None
    details = usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None else None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": cached or 0,
    }


def _describe(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        message = body.get("message") or (body.get("error") or {}).get("message")
        if message:
            return one_line(str(message))
    return one_line(str(error.message))
