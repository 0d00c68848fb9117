"""API_TOKEN: every HTTP endpoint but /health wants `Authorization: Bearer <token>`.

/health stays open: a platform's health check (Render's) and a load balancer send no token, and
it tells nothing beyond up or down.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/health"})
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


class BearerTokenMiddleware:
    """Answers 401 (JSON, `WWW-Authenticate: Bearer`) to a request without the right token."""

    def __init__(self, app: ASGIApp, token: SecretStr) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Only lifespan passes untouched: any kind of request unknown here is refused, not let in.
        if scope["type"] == "lifespan" or scope.get("path") in OPEN_PATHS or self._allowed(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            response = JSONResponse(
                {"status": "error", "error": "a valid 'Authorization: Bearer <API_TOKEN>' needed"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
        else:
            await send({"type": "websocket.close", "code": _WS_POLICY_VIOLATION})

    def _allowed(self, scope: Scope) -> bool:
        # The first Authorization header, as Starlette's own `Headers.get` would read it.
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        return token_matches(header, self.token)
