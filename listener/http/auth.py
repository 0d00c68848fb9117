"""API_TOKEN: every HTTP endpoint but /health wants `Authorization: Bearer <token>`.

/health stays open: a platform's health check (Render's) and a load balancer send no token, and
it tells nothing beyond up or down. So do the dashboard's sign-in form and its static files (a
stylesheet and a script, no data). The dashboard's own paths also accept its session cookie
(`session.py`), which only the sign-in form hands out; a browser that has none is sent there.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from pydantic import SecretStr
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from listener.http.session import COOKIE

OPEN_PATHS = frozenset({"/health", "/login"})
OPEN_PREFIXES = ("/static/",)
# Where the session cookie counts: the page, its live fragment and its actions.
DASHBOARD_PATHS = frozenset({"/", "/logout"})
DASHBOARD_PREFIXES = ("/dashboard/",)
# RFC 6750: the scheme is case-insensitive; the token follows after one space.
_SCHEME = b"bearer "
# RFC 6455 "policy violation": a WebSocket without the token is refused before it opens.
_WS_POLICY_VIOLATION = 1008


def _digest(token: bytes) -> bytes:
    # Comparing digests, not the tokens: compare_digest is constant-time only for inputs of the
    # same length, and a token's length is also worth hiding.
    return hashlib.sha256(token).digest()


def presented_token(authorization: bytes | None) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header value, None for anything else."""
    if authorization is None or authorization[: len(_SCHEME)].lower() != _SCHEME:
        return None
    token = authorization[len(_SCHEME) :].strip()
    return token or None


def token_matches(authorization: bytes | None, expected: SecretStr) -> bool:
    """Whether the header carries the expected token, in time independent of the token."""
    token = presented_token(authorization)
    wanted = _digest(expected.get_secret_value().encode())
    # Compared even without a token, so a request without one costs as long as a wrong one.
    return hmac.compare_digest(_digest(token or b""), wanted) and token is not None


def is_dashboard_path(path: str) -> bool:
    return path in DASHBOARD_PATHS or path.startswith(DASHBOARD_PREFIXES)


def session_cookie(scope: Scope) -> str | None:
    """The dashboard's session cookie of a request, if it sent one."""
    # Starlette's own parser, as `Request.cookies` reads them (it never raises).
    for key, value in scope.get("headers", ()):
        if key == b"cookie":
            found = cookie_parser(value.decode("latin-1")).get(COOKIE)
            if found:
                return found
    return None


def _wants_html(scope: Scope) -> bool:
    accept = next((v for k, v in scope.get("headers", ()) if k == b"accept"), b"")
    return scope.get("method") == "GET" and b"text/html" in accept


class BearerTokenMiddleware:
    """Answers 401 (JSON, `WWW-Authenticate: Bearer`) to a request without the right token; a
    browser asking for the dashboard without a session is sent to the sign-in form instead."""

    def __init__(
        self,
        app: ASGIApp,
        token: SecretStr,
        signed_in: Callable[[Scope], Awaitable[bool]] | None = None,
    ) -> None:
        self.app = app
        self.token = token
        self.signed_in = signed_in

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Only lifespan passes untouched: any kind of request unknown here is refused, not let in.
        path = str(scope.get("path", ""))
        if scope["type"] == "lifespan" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
        elif self._allowed(scope):
            scope.setdefault("state", {})["auth"] = "bearer"
            await self.app(scope, receive, send)
        elif scope["type"] == "http" and await self._signed_in(scope):
            scope.setdefault("state", {})["auth"] = "session"
            await self.app(scope, receive, send)
        elif scope["type"] == "http" and is_dashboard_path(path) and _wants_html(scope):
            await RedirectResponse("/login", status_code=303)(scope, receive, send)
        elif scope["type"] == "http":
            response = JSONResponse(
                {"status": "error", "error": "a valid 'Authorization: Bearer <API_TOKEN>' needed"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
        else:
            await send({"type": "websocket.close", "code": _WS_POLICY_VIOLATION})

    async def _signed_in(self, scope: Scope) -> bool:
        if self.signed_in is None or not is_dashboard_path(str(scope.get("path", ""))):
            return False
        return await self.signed_in(scope)

    def _allowed(self, scope: Scope) -> bool:
        # The first Authorization header, as Starlette's own `Headers.get` would read it.
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        return token_matches(header, self.token)
