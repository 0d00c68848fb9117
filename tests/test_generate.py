"""The handler's pure parts: the prompt from a payload, and reading the API's rate headers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from listener.errors import PermanentItemError
from listener.generate import (
    MAX_WAIT_SECONDS,
    budget_pause,
    build_messages,
    parse_duration,
    prompt_for,
    retry_after,
)
from listener.items import ClaimedItem


def test_the_prompt_carries_the_product_s_name_and_data() -> None:
    messages = build_messages(
        {
            "name": "Blue Teapot",
            "description": "Holds 1 l.",
            "price": 24.5,
            "language": "French",
            "attributes": {"material": "porcelain"},
            "weight_g": 800,
        }
    )
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    for fragment in (
        "Product name: Blue Teapot",
        "Description: Holds 1 l.",
        "Price: 24.5",
        "- material: porcelain",
        "- weight_g: 800",
        "Write the description in French.",
    ):
        assert fragment in user


def test_a_json_text_payload_is_accepted() -> None:
    assert "Product name: Lamp" in build_messages('{"name": "Lamp"}')[1]["content"]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (None, "payload must be a JSON object"),
        ([1, 2], "payload must be a JSON object"),
        ("not json", "got a string"),
        (None, "got null"),
        (3.5, "got a number"),
        (True, "got a boolean"),
        ({}, "no product 'name'"),
        ({"name": "   "}, "no product 'name'"),
        ({"name": 42}, "no product 'name'"),
    ],
)
def test_a_payload_the_prompt_cannot_use_is_a_permanent_error(payload: Any, reason: str) -> None:
    with pytest.raises(PermanentItemError, match=reason):
        build_messages(payload)


def _item(payload_text: str | None, payload_bytes: int | None) -> ClaimedItem:
    return ClaimedItem(1, 1, "store", "p1", payload_text, payload_bytes, 1)


@pytest.mark.parametrize(
    ("payload_text", "payload_bytes", "reason"),
    [
        (None, None, r"payload is missing \(NULL\)"),
        (None, 10_485_760, r"payload is 10,485,760 bytes, over the limit of 65,536"),
        ("[" * 100_000 + "]" * 100_000, 200_000, "nested too deeply"),
        ('{"name": "x", "a": ' + "[" * 5_000 + "]" * 5_000 + "}", 10_019, "nested too deeply"),
    ],
)
def test_a_payload_that_cannot_be_read_is_a_permanent_error(
    payload_text: str | None, payload_bytes: int | None, reason: str
) -> None:
    with pytest.raises(PermanentItemError, match=reason):
        prompt_for(_item(payload_text, payload_bytes), 65_536)


def test_odd_unicode_is_product_data() -> None:
    name = "Te\u0301a \u202eeman\u202c \U0001f375 \u200d\u00a0\ufeff"
    messages = prompt_for(_item(json.dumps({"name": name}), 64), 65_536)
    assert name.strip() in messages[1]["content"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("120ms", 0.12),
        ("1h2m3.5s", 3723.5),
        ("2", 2.0),
        ("0.5", 0.5),
        (None, None),
        ("soon", None),
        ("5x", None),
    ],
)
def test_reset_durations_in_openai_s_format(text: str | None, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_retry_after_prefers_the_most_precise_header() -> None:
    assert retry_after({"retry-after-ms": "1500", "retry-after": "2"}) == 1.5
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"x-ratelimit-reset-requests": "250ms"}) == 0.25
    assert retry_after({}) == 1.0


def test_a_spent_budget_in_the_headers_pauses_until_its_reset() -> None:
    spent = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}
    assert budget_pause(spent, next_tokens=500) == 2.0
    low_tokens = {
        "x-ratelimit-remaining-requests": "40",
        "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "750ms",
    }
    assert budget_pause(low_tokens, next_tokens=500) == 0.75
    plenty = {"x-ratelimit-remaining-requests": "40", "x-ratelimit-remaining-tokens": "90000"}
    assert budget_pause(plenty, next_tokens=500) is None


@pytest.mark.parametrize("header", ["inf", "Infinity", "nan", "-inf", "1e400", "9" * 400 + "s"])
def test_a_retry_header_that_is_no_finite_duration_falls_back_to_the_default(
    header: str,
) -> None:
    assert parse_duration(header) is None
    assert retry_after({"retry-after": header}) == 1.0
    assert retry_after({"retry-after-ms": header, "retry-after": "2"}) == 2.0


def test_a_huge_retry_header_is_cut_to_a_day() -> None:
    assert retry_after({"retry-after": "1e300"}) == MAX_WAIT_SECONDS
    assert retry_after({"retry-after-ms": "1e300"}) == MAX_WAIT_SECONDS
    spent = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "99999h"}
    assert budget_pause(spent, next_tokens=500) == MAX_WAIT_SECONDS


@pytest.mark.parametrize("tokens", ["²", "٣", "1²"])
def test_a_remaining_tokens_header_of_other_digits_is_ignored(tokens: str) -> None:
    # "²".isdigit() is true and int("²") raises: the answer in hand must not be lost to it.
    headers = {"x-ratelimit-remaining-tokens": tokens, "x-ratelimit-reset-tokens": "2s"}
    assert budget_pause(headers, next_tokens=500) is None
