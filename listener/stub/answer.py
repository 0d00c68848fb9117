"""The stub's chat completion: a request body read into what the answer depends on, and the
answer's JSON body. One place, so that a batch line and a synchronous call of the same request
produce the same body (ids and `created` aside).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from listener.stub.text import (
    INVALID_MARKER,
    REFUSE_MARKER,
    estimate_tokens,
    generate_description,
    object_for_schema,
    text_of,
)

DEFAULT_MAX_TOKENS = 256  # what OpenAI reserves against TPM when max_tokens is absent
DEFAULT_MODEL = "gpt-4o-mini"
BAD_BODY = "Invalid request body: expected JSON with a 'messages' list."
# Tiers a response names as given; anything else (absent, "auto") is served by "default".
_NAMED_TIERS = frozenset({"flex", "priority", "default"})


class BadChatRequest(ValueError):
    """The body is not a chat completion request the stub can answer (a 400)."""


@dataclass(frozen=True)
class ChatRequest:
    """What a chat completion's answer and its cost depend on."""

    model: str
    last_user: str  # the last user message's text: the prompt the answer is made from
    prompt_tokens: int
    max_tokens: int | None
    response_format: Any
    service_tier: str  # the tier the answer says served it

    @property
    def cost(self) -> int:
        """Tokens counted against TPM: the prompt plus what the answer may use."""
        return self.prompt_tokens + (self.max_tokens or DEFAULT_MAX_TOKENS)

    @property
    def flex(self) -> bool:
        return self.service_tier == "flex"


def read_chat_request(payload: Any) -> ChatRequest:
    """The request in a JSON body; `BadChatRequest` when it has no list of messages."""
    try:
        messages = payload["messages"]
        if not isinstance(messages, list):
            raise TypeError("messages is not a list")
        model = str(payload.get("model", DEFAULT_MODEL))
        texts = [text_of(m.get("content")) for m in messages]
        last_user = next(
            (text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"),
            "",
        )
        max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
        tier = payload.get("service_tier")
        return ChatRequest(
            model=model,
            last_user=last_user,
            prompt_tokens=estimate_tokens("".join(texts)),
            max_tokens=int(max_tokens) if max_tokens else None,
            response_format=payload.get("response_format"),
            service_tier=tier if tier in _NAMED_TIERS else "default",
        )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise BadChatRequest(BAD_BODY) from exc


def message_of(response_format: Any, prompt: str) -> tuple[str | None, str | None]:
    """The message's content and refusal: plain text, or a JSON object fitting the request's
    `json_schema` (refused, or made not to fit, when the prompt asks the stub to)."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return generate_description(prompt), None
    if REFUSE_MARKER in prompt:
        return None, "I'm sorry, I can't help with that request."
    if INVALID_MARKER in prompt:
        return json.dumps({"unexpected": prompt[:40]}), None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return json.dumps(object_for_schema(schema, prompt), ensure_ascii=False), None


def completion_body(request: ChatRequest, created: int | None = None) -> dict[str, Any]:
    """The chat.completion object answering `request`, with its usage."""
    content, refusal = message_of(request.response_format, request.last_user)
    completion_tokens = estimate_tokens(content or refusal or "")
    message = {"role": "assistant", "content": content, "refusal": refusal}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": request.model,
        "service_tier": request.service_tier,
        "system_fingerprint": "fp_stub",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": request.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": request.prompt_tokens + completion_tokens,
        },
    }


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> Any:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
