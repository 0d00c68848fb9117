"""The dashboard's sign-in session and its protection against cross-site requests.

A browser cannot send `Authorization: Bearer` by itself, so the dashboard signs in once with the
token (a form) and gets a session cookie: `<nonce>.<issued>.<signature>`, signed with HMAC-SHA256
under a key derived from API_TOKEN (rotating the token ends every session; the cookie never holds
the token). Without API_TOKEN the key derives from a random secret stored once in PostgreSQL
(`store.py`), the same for every process of the fleet, so a session and its CSRF token hold behind
a load balancer; a session is handed out on the first visit, so the actions carry a CSRF token.
A sign-out ends the session in every process (its nonce is kept in PostgreSQL until the cookie
would have expired).

Cross-site requests: the cookie is `SameSite=Strict` and `HttpOnly`, and every POST also needs a
form field `csrf` equal to HMAC(key, "csrf:" + nonce) (a synchronizer token a foreign page cannot
read) and, when the browser says where it comes from (`Origin`, `Sec-Fetch-Site`), this origin.

Pure but for the clock, which is injected.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable

from pydantic import SecretStr

COOKIE = "listener_session"
MAX_AGE_SECONDS = 12 * 3600  # a working day of watching a deploy; then sign in again
_CONTEXT = b"listener dashboard session v1"
# The cookie's issue time: ASCII digits only (str.isdigit() also passes "²", which int() refuses).
_ISSUED = re.compile(r"[0-9]{1,12}")


class SessionKeyMissing(RuntimeError):
    """The key was asked for before `use_secret` gave one (no API_TOKEN, not yet loaded)."""


class Sessions:
    """Issues and checks session cookies and the CSRF token tied to each."""

    def __init__(self, token: SecretStr | None, *, clock: Callable[[], float] = time.time) -> None:
        self._key: bytes | None = None
        if token is not None:
            self.use_secret(token.get_secret_value().encode())
        self._clock = clock
        self.requires_sign_in = token is not None

    @property
    def ready(self) -> bool:
        return self._key is not None

    def use_secret(self, secret: bytes) -> None:
        # A derived key: a leaked signature tells nothing about the token (or stored secret).
        self._key = hmac.new(_CONTEXT, secret, hashlib.sha256).digest()

    def _sign(self, purpose: str, payload: str) -> str:
        if self._key is None:
            raise SessionKeyMissing("the dashboard's session key is not loaded yet")
        message = f"{purpose}:{payload}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def issue(self) -> str:
        """A new session cookie's value."""
        payload = f"{secrets.token_urlsafe(16)}.{int(self._clock())}"
        return f"{payload}.{self._sign('session', payload)}"

    def verify(self, cookie: str | None) -> str | None:
        """The session's nonce when the cookie is ours and not expired, else None."""
        issued = self.issued_at(cookie)
        if issued is None or cookie is None:
            return None
        age = self._clock() - issued
        return cookie.split(".")[0] if -60 <= age <= MAX_AGE_SECONDS else None

    def issued_at(self, cookie: str | None) -> int | None:
        """When a cookie of ours was issued (epoch seconds); None for anything not ours."""
        if not cookie or cookie.count(".") != 2 or self._key is None:
            return None
        nonce, issued, signature = cookie.split(".")
        expected = self._sign("session", f"{nonce}.{issued}")
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            return None
        if not _ISSUED.fullmatch(issued):
            return None
        return int(issued)

    def csrf_token(self, nonce: str) -> str:
        return self._sign("csrf", nonce)

    def csrf_matches(self, nonce: str, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(
            presented.encode(), self.csrf_token(nonce).encode()
        )


def same_origin(origin: str | None, fetch_site: str | None, own_origin: str) -> bool:
    """Whether the browser's own account of a request's source allows it. A request without
    either header (curl, an old browser) passes here; the CSRF token still guards it."""
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    return origin is None or origin == own_origin
