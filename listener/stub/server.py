"""Local OpenAI-compatible stub with OpenAI-style rate limits and injectable faults.

Status codes, error bodies and retry-after / x-ratelimit-* headers mimic api.openai.com so
that the real ``openai`` client's parsing and retry logic are exercised unchanged.

The pieces: `state` (configuration, counters, admission), `window` (the sliding window and
the header durations), `text` and `answer` (what it answers), `batch_api` (the Files and
Batches API, over `files`, `batch_input` and `batches`); here the HTTP app with the chat
endpoint and its flex tier, running it in the caller's loop or as its own process, and its
command line.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# An `X as X` import is a re-export: tests and the demo import those names from here.
from listener.http.serve import serving
from listener.stub.answer import BAD_BODY, completion_body, read_chat_request
from listener.stub.batch_api import batch_routes
from listener.stub.state import StubConfig as StubConfig
from listener.stub.state import StubState as StubState
from listener.stub.text import extract_product_name as extract_product_name
from listener.stub.window import SlidingWindow as SlidingWindow
from listener.stub.window import format_duration as format_duration

logger = logging.getLogger(__name__)

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
# What OpenAI answers when flex processing has no capacity for a request: a 429 that is not a
# rate limit (no retry-after); the usual handling is to retry later or on the default tier.
FLEX_UNAVAILABLE = (
    "Resource unavailable: flex processing has no capacity for this request right now. "
    "Please retry later, or use the default service tier.",
    "resource_unavailable",
    "resource_unavailable",
)
_SERVER_ERROR = ("The server had an error while processing your request.", "server_error", None)


def _injected_error(status: int, headers: dict[str, str]) -> JSONResponse:
    if status == 429:
        headers = {**headers, "retry-after": "1", "retry-after-ms": "1000"}
    return _error(status, *_FAULTS.get(status, _SERVER_ERROR), headers)


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
            chat = read_chat_request(await request.json())
        except ValueError:  # BadChatRequest, or a body that is not JSON
            return _error(400, BAD_BODY, "invalid_request_error", None, base)

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
        if chat.flex:
            state.flex_total += 1
            if state.flex_unavailable(chat.last_user):
                # Before admission: a refused flex request uses none of the per-minute budget.
                state.flex_unavailable_total += 1
                return _error(
                    429, *FLEX_UNAVAILABLE, {**base, **state.limit_headers(state.clock())}
                )

        admission = state.admit(chat.model, chat.cost)
        headers = {**base, **admission.headers}
        if not admission.allowed:
            state.rate_limited_total += 1
            return _error(
                429, admission.message, admission.limit_type, "rate_limit_exceeded", headers
            )
        latency = cfg.latency + (cfg.flex_latency if chat.flex else 0.0)
        if latency > 0:
            await anyio.sleep(latency)
        state.completed_total += 1
        return JSONResponse(completion_body(chat), headers=headers)

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
            *batch_routes(state),
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
    batch = parser.add_argument_group("the Batch API (/v1/files, /v1/batches)")
    for status, default in (("validating", 1.0), ("processing", 5.0), ("finalizing", 1.0)):
        batch.add_argument(
            f"--batch-{status}-seconds",
            type=_seconds,
            default=default,
            help=f"seconds a batch spends {status.replace('processing', 'in progress')}",
        )
    batch.add_argument(
        "--batch-cancelling-seconds",
        type=_seconds,
        default=1.0,
        help="seconds a cancelled batch stays cancelling",
    )
    batch.add_argument(
        "--batch-completion-window-seconds",
        type=_seconds,
        default=86_400.0,
        help="a batch not finished this long after its creation expires (OpenAI: 24h)",
    )
    batch.add_argument(
        "--batch-error-rate",
        type=_rate,
        default=0.0,
        help="share of a batch's requests answered 500 in its error file (seeded by --seed)",
    )
    batch.add_argument(
        "--batch-enqueued-token-limit",
        type=_count,
        default=0,
        help="prompt tokens of unfinished batches per model; a batch past it fails, 0 = unlimited",
    )
    batch.add_argument(
        "--batch-max-requests", type=_count, default=50_000, help="requests in one input file"
    )
    batch.add_argument(
        "--batch-max-bytes", type=_count, default=200 * 1024 * 1024, help="bytes of one input file"
    )
    flex = parser.add_argument_group('service_tier="flex"')
    flex.add_argument(
        "--flex-unavailable-rate",
        type=_rate,
        default=0.0,
        help='share of flex requests answered 429 "resource unavailable" (seeded by --seed)',
    )
    flex.add_argument(
        "--flex-latency", type=_seconds, default=0.0, help="extra seconds per flex answer"
    )


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate from 0 to 1")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def config_from_args(args: argparse.Namespace) -> StubConfig:
    known = {f.name for f in fields(StubConfig)}
    return StubConfig(**{k: v for k, v in vars(args).items() if k in known})


def main_from_args(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve_forever(args.host, args.port, config_from_args(args))
    return 0
