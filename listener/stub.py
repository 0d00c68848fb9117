"""Local OpenAI-compatible stub with OpenAI-style rate limits and injectable faults.

Status codes, error bodies and retry-after / x-ratelimit-* headers mimic api.openai.com so
that the real ``openai`` client's parsing and retry logic are exercised unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import random
import re
import signal
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256  # what OpenAI reserves against TPM when max_tokens is absent
_BAD_BODY = "Invalid request body: expected JSON with a 'messages' list."
_MALFORMED_BODY = '{"id": "chatcmpl-broken", "choices": ['
_MODEL = {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "stub"}


@dataclass
class StubConfig:
    """Server behaviour; fault fields may be mutated while the server runs."""

    latency: float = 0.0
    rpm: int = 0  # 0 = unlimited
    tpm: int = 0  # 0 = unlimited
    window_seconds: float = 60.0
    required_api_key: str | None = None
    fail_next_status: list[int] = field(default_factory=list)
    fail_rate: float = 0.0
    seed: int = 0
    timeout_next: int = 0
    hang_seconds: float = 30.0
    malformed_next: int = 0


# What POST /stub/faults may change; not window_seconds, which would make the peak meaningless.
_RUNTIME_FIELDS = frozenset(f.name for f in fields(StubConfig)) - {
    "window_seconds",
    "required_api_key",
}


def _ceil(x: float) -> int:
    # Rounding first stops float noise such as (t + 60) - t == 60.0000000000018 from
    # turning into an extra second or millisecond.
    return math.ceil(round(x, 6))


def format_duration(seconds: float) -> str:
    """Format like OpenAI's x-ratelimit-reset-* headers (Go durations): 120ms, 1.5s, 6m0s."""
    total_ms = max(0, _ceil(seconds * 1000))
    if total_ms == 0:
        return "0s"
    if total_ms < 1000:
        return f"{total_ms}ms"
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class SlidingWindow:
    """Weighted events of the last ``length`` s (``now - t < length``) and the busiest window.

    ``peak`` is exact: the fullest window can be slid right until it ends on an event, and
    the total is measured at every event.
    """

    def __init__(self, length: float) -> None:
        self.length = length
        self.peak = 0
        self._events: deque[tuple[float, int]] = deque()
        self._total = 0

    def _prune(self, now: float) -> None:
        while self._events and now - self._events[0][0] >= self.length:
            self._total -= self._events.popleft()[1]

    def total(self, now: float) -> int:
        self._prune(now)
        return self._total

    def add(self, now: float, weight: int = 1) -> None:
        self._prune(now)
        self._events.append((now, weight))
        self._total += weight
        self.peak = max(self.peak, self._total)

    def wait_until_fits(self, now: float, weight: int, limit: int) -> float:
        """Seconds until ``weight`` more fits under ``limit`` (0 if it fits now)."""
        excess = self.total(now) + weight - limit
        if excess <= 0:
            return 0.0
        if weight > limit:
            return self.length  # never fits; OpenAI still answers with a finite wait
        for t, w in self._events:
            excess -= w
            if excess <= 0:
                return t + self.length - now
        return self.length

    def time_until_empty(self, now: float) -> float:
        self._prune(now)
        return self._events[-1][0] + self.length - now if self._events else 0.0

    def clear(self) -> None:
        self._events.clear()
        self._total = 0
        self.peak = 0


@dataclass
class Admission:
    """Outcome of a rate-limit check; ``headers`` go on the response either way."""

    allowed: bool
    headers: dict[str, str]
    limit_type: str = ""  # "requests" or "tokens" when refused
    message: str = ""


class StubState:
    """Counters, windows and faults of one stub server; safe because it is loop-confined."""

    def __init__(
        self, config: StubConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or StubConfig()
        self.clock = clock
        self.random = random.Random(self.config.seed)
        self.requests = SlidingWindow(self.config.window_seconds)
        self.tokens = SlidingWindow(self.config.window_seconds)
        self.requests_total = 0
        self.completed_total = 0
        self.rate_limited_total = 0
        self.errors_injected_total = 0
        self.unauthorized_total = 0
        # Created lazily: anyio.Event needs a running event loop.
        self._release: anyio.Event | None = None

    def reset(self) -> None:
        self.requests_total = self.completed_total = self.rate_limited_total = 0
        self.errors_injected_total = self.unauthorized_total = 0
        self.requests.clear()
        self.tokens.clear()

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "requests_total": self.requests_total,
            "completed_total": self.completed_total,
            "rate_limited_total": self.rate_limited_total,
            "errors_injected_total": self.errors_injected_total,
            "unauthorized_total": self.unauthorized_total,
            "window_seconds": self.requests.length,
            "max_requests_in_any_window": self.requests.peak,
            "max_tokens_in_any_window": self.tokens.peak,
            "requests_in_window": self.requests.total(now),
            "tokens_in_window": self.tokens.total(now),
        }

    def faults(self) -> dict[str, Any]:
        return {name: getattr(self.config, name) for name in sorted(_RUNTIME_FIELDS)}

    def set_faults(self, updates: dict[str, Any]) -> None:
        unknown = set(updates) - _RUNTIME_FIELDS
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        for name, value in updates.items():
            current = getattr(self.config, name)
            # Coerce now so that a bad JSON value fails this call, not later requests.
            if isinstance(current, list):
                setattr(self.config, name, [int(v) for v in value])
            else:
                setattr(self.config, name, type(current)(value))
        if "seed" in updates:
            self.random.seed(self.config.seed)

    def admit(self, model: str, cost: int) -> Admission:
        """Check both limits and record the request if admitted; must not await inside."""
        now = self.clock()
        for kind, limit, window, weight in self._limits(cost):
            wait = window.wait_until_fits(now, weight, limit) if limit > 0 else 0.0
            if wait > 0:
                headers = self.limit_headers(now)
                headers["retry-after"] = str(_ceil(wait))
                headers["retry-after-ms"] = str(_ceil(wait * 1000))
                message = (
                    f"Rate limit reached for {model} in organization org-stub on {kind} per "
                    f"min ({kind[0].upper()}PM): Limit {limit}, Used {window.total(now)}, "
                    f"Requested {weight}. Please try again in {format_duration(wait)}."
                )
                return Admission(False, headers, kind, message)
        self.requests.add(now, 1)
        self.tokens.add(now, cost)
        return Admission(True, self.limit_headers(now))

    def _limits(self, cost: int) -> list[tuple[str, int, SlidingWindow, int]]:
        return [
            ("requests", self.config.rpm, self.requests, 1),
            ("tokens", self.config.tpm, self.tokens, cost),
        ]

    def limit_headers(self, now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers; 'reset' is when the window fully drains."""
        headers: dict[str, str] = {}
        for kind, limit, window, _ in self._limits(0):
            if limit > 0:
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - window.total(now)))
                headers[f"x-ratelimit-reset-{kind}"] = format_duration(window.time_until_empty(now))
        return headers

    async def hang(self, seconds: float) -> None:
        """Sleep like a stuck upstream, but let server shutdown cut it short."""
        if self._release is None:
            self._release = anyio.Event()
        with anyio.move_on_after(seconds):
            await self._release.wait()

    def release_hung(self) -> None:
        if self._release is not None:
            self._release.set()


def _text_of(content: Any) -> str:
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
            texts = [_text_of(m.get("content")) for m in messages]
            last_user = next(
                (_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"),
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
        content = generate_description(last_user)
        completion_tokens = estimate_tokens(content)
        state.completed_total += 1
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        message = {"role": "assistant", "content": content, "refusal": None}
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


class _EmbeddedServer(uvicorn.Server):
    """Leaves signal handling to the host program (pytest, a bench harness, serve_forever)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        # Same as uvicorn's loop but polling should_exit every 10 ms instead of 100 ms,
        # because tests start and stop many stubs.
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864_000
            await anyio.sleep(0.01)


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
    # log_config=None keeps uvicorn off the host's logging setup.
    options: dict[str, Any] = {"log_config": None, "access_log": False, "lifespan": "off"}
    server = _EmbeddedServer(
        uvicorn.Config(build_app(state), host, port, timeout_graceful_shutdown=1, **options)
    )
    done = anyio.Event()

    async def serve() -> None:
        # uvicorn calls sys.exit() when it cannot bind; report that as a startup failure.
        with contextlib.suppress(SystemExit):
            await server.serve()
        done.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            try:
                while not server.started:
                    if done.is_set():
                        raise RuntimeError(f"stub server failed to start on {host}:{port}")
                    await anyio.sleep(0.005)
                real_port = int(server.servers[0].sockets[0].getsockname()[1])
                yield RunningStub(host, real_port, state)
            finally:
                state.release_hung()
                server.should_exit = True
                # Shielded so uvicorn closes its sockets even when the body raised.
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await done.wait()
    except BaseExceptionGroup as group:
        # Keep the body's own exception (e.g. a failed assert) recognisable to callers.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


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
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--rpm", type=int, default=0, help="requests per window, 0 = unlimited")
    parser.add_argument("--tpm", type=int, default=0, help="tokens per window, 0 = unlimited")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per completion")
    parser.add_argument("--window-seconds", type=float, default=60.0)
    parser.add_argument("--required-api-key", default=None)
    parser.add_argument("--fail-rate", type=float, default=0.0, help="probability of a 500")
    parser.add_argument("--seed", type=int, default=0)


def config_from_args(args: argparse.Namespace) -> StubConfig:
    known = {f.name for f in fields(StubConfig)}
    return StubConfig(**{k: v for k, v in vars(args).items() if k in known})


def main_from_args(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve_forever(args.host, args.port, config_from_args(args))
    return 0
