"""uvicorn embedded in the caller's event loop: the one serving loop of the worker's HTTP,
`listener api` and the OpenAI stub.

uvicorn normally owns the process: it installs signal handlers and exits on SIGTERM. Here the host
program (the worker, `listener api`, pytest) owns signals and shutdown, so the server only serves.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import uvicorn

from listener.errors import ListenerError

# An in-flight request gets this long to finish when the server stops.
GRACEFUL_SHUTDOWN_SECONDS = 1.0


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the host program.

    `capture_signals` and `main_loop`/`on_tick` are uvicorn internals (pyproject pins uvicorn's
    minor version): the first keeps uvicorn's handlers off the host's signals, the second lets a
    short-lived server (the stub in tests) notice a stop every `stop_poll_seconds`.
    """

    stop_poll_seconds = 0.1

    async def main_loop(self) -> None:
        if self.stop_poll_seconds >= 0.1:
            await super().main_loop()
            return
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864_000
            await anyio.sleep(self.stop_poll_seconds)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    @property
    def port(self) -> int:
        """The bound port (the real one when asked for port 0)."""
        return int(self.servers[0].sockets[0].getsockname()[1])

    @property
    def host(self) -> str:
        """The bound address (a host name resolved)."""
        return str(self.servers[0].sockets[0].getsockname()[0])


@contextlib.asynccontextmanager
async def serving(
    app: Any,
    host: str,
    port: int,
    *,
    stop_poll_seconds: float = 0.1,
    forwarded_allow_ips: list[str] | None = None,
) -> AsyncIterator[EmbeddedServer]:
    """Serve `app` on host:port for the duration of the block; started when the block starts.

    X-Forwarded-Proto and X-Forwarded-For are believed from `forwarded_allow_ips` only (loopback
    when not given; never uvicorn's own reading of the environment, so that FORWARDED_ALLOW_IPS
    is one setting, checked at start, also read from `.env`)."""
    trusted = forwarded_allow_ips or ["127.0.0.1", "::1"]
    config = uvicorn.Config(
        app,
        host,
        port,
        # log_config=None keeps uvicorn off the host's logging setup; its own lines (started,
        # finished) are noise next to ours, so only warnings and errors pass.
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_SECONDS),
        proxy_headers=True,
        # uvicorn trusts everyone only for the string "*" alone, not for a list holding it.
        forwarded_allow_ips="*" if "*" in trusted else trusted,
    )
    server = EmbeddedServer(config)
    server.stop_poll_seconds = stop_poll_seconds
    done = anyio.Event()
    serve_scope = anyio.CancelScope(shield=True)

    async def serve() -> None:
        # Shielded so that cancelling the host still lets uvicorn close its sockets and
        # connections (its shutdown() runs only when main_loop returns, not when cancelled);
        # the finally below asks it to stop, and cancels this scope if it does not.
        with serve_scope, contextlib.suppress(SystemExit):
            # uvicorn calls sys.exit() when it cannot bind; `done` before `started` says so.
            await server.serve()
        done.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            try:
                while not server.started:
                    if done.is_set():
                        raise ListenerError(f"cannot serve HTTP on {host}:{port} (in use?)")
                    await anyio.sleep(0.005)
                yield server
            finally:
                server.should_exit = True
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(GRACEFUL_SHUTDOWN_SECONDS + 2),
                ):
                    await done.wait()
                serve_scope.cancel()
    except BaseExceptionGroup as group:
        # Keep the body's own exception (a failed assert, a startup error) recognisable.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
