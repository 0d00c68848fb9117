"""Local OpenAI-compatible stub with OpenAI-style rate limits and injectable faults.

Status codes, error bodies and retry-after / x-ratelimit-* headers mimic api.openai.com so
that the real ``openai`` client's parsing and retry logic are exercised unchanged.

The pieces: `stub_state` (configuration, counters, admission), `stub_window` (the sliding
window and the header durations), `stub_text` (what it answers); here the HTTP app, running it
in the caller's loop or as its own process, and its command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# An `X as X` import is a re-export: tests and the demo import those names from here.
from listener.http.serve import serving
from listener.stub.state import StubConfig as StubConfig
from listener.stub.state import StubState as StubState
from listener.stub.text import (
    INVALID_MARKER,
    REFUSE_MARKER,
    estimate_tokens,
    generate_description,
    object_for_schema,
    text_of,
)
from listener.stub.text import extract_product_name as extract_product_name
from listener.stub.window import SlidingWindow as SlidingWindow
from listener.stub.window import format_duration as format_duration

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256  # what OpenAI reserves against TPM when max_tokens is absent
_BAD_BODY = "Invalid request body: expected JSON with a 'messages' list."
_MALFORMED_BODY = '{"id": "chatcmpl-broken", "choices": ['
_MODEL = {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "stub"}


def _error(
    status: int, message: str, type_: str, code: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_FAULTS: dict[int, tuple[str, str, str | None]] = {
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    429: ("Rate limit reached (injected fault).", "requests", "rate_limit_exceeded"),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}
_SERVER_ERROR = ("The server had an error while processing your request.", "server_error", None)


def _injected_error(status: int, headers: dict[str, str]) -> JSONResponse:
    if status == 429:
        headers = {**headers, "retry-after": "1", "retry-after-ms": "1000"}
    return _error(status, *_FAULTS.get(status, _SERVER_ERROR), headers)


def _answer(response_format: Any, prompt: str) -> tuple[str | None, str | None]:
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


def build_app(state: StubState) -> Starlette:
    """ASGI app serving the OpenAI subset plus /stub/* control endpoints."""

    async def chat_completions(request: Request) -> Response:
        state.requests_total += 1
        cfg = state.config
        base = {"x-request-id": f"req_{uuid.uuid4().hex}"}
        if cfg.required_api_key is not None and (
            request.headers.get("authorization") != f"Bearer {cfg.required_api_key}"
        ):
            state.unauthorized_total += 1
            return _injected_error(401, base)
        try:
            payload = await request.json()
            messages = payload["messages"]
            model = str(payload.get("model", "gpt-4o-mini"))
            texts = [text_of(m.get("content")) for m in messages]
            last_user = next(
                (text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"),
                "",
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return _error(400, _BAD_BODY, "invalid_request_error", None, base)
        prompt_tokens = estimate_tokens("".join(texts))
        max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
        cost = prompt_tokens + int(max_tokens or DEFAULT_MAX_TOKENS)

        if cfg.fail_next_status:
            base.update(state.limit_headers(state.clock()))
            state.errors_injected_total += 1
            status = cfg.fail_next_status.pop(0)
            if status == 429:
                state.rate_limited_total += 1
            return _injected_error(status, base)
        if cfg.fail_rate > 0 and state.random.random() < cfg.fail_rate:
            state.errors_injected_total += 1
            return _injected_error(500, {**base, **state.limit_headers(state.clock())})
        if cfg.timeout_next > 0:
            cfg.timeout_next -= 1
            state.errors_injected_total += 1
            # Afterwards answer normally, like a slow upstream; the client has usually gone.
            await state.hang(cfg.hang_seconds)
        if cfg.malformed_next > 0:
            cfg.malformed_next -= 1
            state.errors_injected_total += 1
            return Response(_MALFORMED_BODY, 200, base, media_type="application/json")

        admission = state.admit(model, cost)
        headers = {**base, **admission.headers}
        if not admission.allowed:
            state.rate_limited_total += 1
            return _error(
                429, admission.message, admission.limit_type, "rate_limit_exceeded", headers
            )
        if cfg.latency > 0:
            await anyio.sleep(cfg.latency)
        content, refusal = _answer(payload.get("response_format"), last_user)
        completion_tokens = estimate_tokens(content or refusal or "")
        state.completed_total += 1
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        message = {"role": "assistant", "content": content, "refusal": refusal}
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": "fp_stub",
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
                ],
                "usage": usage,
            },
            headers=headers,
        )

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_MODEL]})

    async def stats(request: Request) -> Response:
        return JSONResponse(state.stats())

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse(state.stats())

    async def faults(request: Request) -> Response:
        if request.method == "POST":
            try:
                updates = await request.json()
                if not isinstance(updates, dict):
                    raise ValueError("expected a JSON object")
                state.set_faults(updates)
            except (ValueError, TypeError) as exc:
                return _error(400, str(exc), "invalid_request_error", None)
        return JSONResponse(state.faults())

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/stub/stats", stats, methods=["GET"]),
            Route("/stub/reset", reset, methods=["POST"]),
            Route("/stub/faults", faults, methods=["GET", "POST"]),
        ]
    )


@dataclass
class RunningStub:
    host: str
    port: int
    state: StubState

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


@contextlib.asynccontextmanager
async def _running(state: StubState, host: str, port: int) -> AsyncIterator[RunningStub]:
    # A stub starts and stops once per test: it checks for a stop every 10 ms, not 100.
    async with serving(build_app(state), host, port, stop_poll_seconds=0.01) as server:
        try:
            yield RunningStub(host, server.port, state)
        finally:
            # Hung requests would hold uvicorn's graceful shutdown for its whole timeout.
            state.release_hung()


@contextlib.asynccontextmanager
async def run_stub(
    config: StubConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningStub]:
    """Run a stub in the current event loop (asyncio only) for the duration of the block."""
    async with _running(StubState(config), host, port) as stub:
        yield stub


async def _serve_until_signal(host: str, port: int, config: StubConfig) -> None:
    # Handling signals here rather than in uvicorn makes SIGTERM a clean exit (status 0).
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with _running(StubState(config), host, port) as stub:
            logger.info("openai stub listening on %s (base_url %s)", stub.url, stub.base_url)
            async for signum in signals:
                logger.info("openai stub stopping on signal %d", signum)
                return


def serve_forever(host: str, port: int, config: StubConfig) -> None:
    """Blocking server for a separate process; returns after SIGINT/SIGTERM."""
    anyio.run(_serve_until_signal, host, port, config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8001, help="port to listen on")
    parser.add_argument("--rpm", type=int, default=0, help="requests per window, 0 = unlimited")
    parser.add_argument("--tpm", type=int, default=0, help="tokens per window, 0 = unlimited")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per completion")
    parser.add_argument(
        "--window-seconds", type=float, default=60.0, help="the window --rpm and --tpm count in"
    )
    parser.add_argument(
        "--required-api-key", default=None, help="answer 401 to any other key (default: any key)"
    )
    parser.add_argument("--fail-rate", type=float, default=0.0, help="probability of a 500")
    parser.add_argument("--seed", type=int, default=0, help="seed of the failures' randomness")


def config_from_args(args: argparse.Namespace) -> StubConfig:
    known = {f.name for f in fields(StubConfig)}
    return StubConfig(**{k: v for k, v in vars(args).items() if k in known})


def main_from_args(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve_forever(args.host, args.port, config_from_args(args))
    return 0
