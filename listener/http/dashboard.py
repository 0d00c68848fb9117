"""The operators' dashboard: the page, its live fragment, sign-in, and the actions.

Server-rendered HTML (Jinja2, autoescaped: a store id is data, whatever it holds); a small script
of our own (`static/dashboard.js`) fetches the live fragment every REFRESH period and swaps it in.
Every request reads the one `SharedSnapshot`, so a hundred open pages cost the database what one
does. Nothing is loaded from another host: the page works on a machine without internet.
"""

from __future__ import annotations

import gzip
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import anyio
import jinja2
import psycopg
from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from listener.costs import money
from listener.errors import one_line
from listener.http.auth import session_cookie, token_matches
from listener.http.costs import DASHBOARD_STORES, CostReport, FleetCosts
from listener.http.figures import Snapshot
from listener.http.fleet import DB_ERRORS, DB_TIMEOUT_SECONDS
from listener.http.session import COOKIE, MAX_AGE_SECONDS, Sessions, same_origin
from listener.http.snapshot import REFRESH_SECONDS, SharedSnapshot
from listener.http.store import SessionStore
from listener.http.view import age, chart_bars, percent, progress_segments, store_page
from listener.redact import redact
from listener.settings import Settings
from listener.sqlfiles import queries

logger = logging.getLogger(__name__)

# Beside this module, in a checkout and in an installed wheel alike (pyproject's package-data).
_HERE = Path(__file__).resolve().parent
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters["age"] = age
_ENV.filters["percent"] = percent
_ENV.globals["money"] = money

# No script, style or image from anywhere but here; no framing (clickjacking on the buttons).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

# action -> (SQL block, what the form names, the confirmation's words, the done message)
ACTIONS: dict[str, tuple[str, str, str, str]] = {
    "pause": ("pause_store", "instance_id", "Pause store {}? No new item of it starts.", "paused"),
    "resume": ("resume_store", "instance_id", "Resume store {}?", "resumed"),
    "cancel": ("cancel_job", "job_id", "Cancel job {}? Its open items end CANCELLED.", "cancelled"),
    "retry": ("retry_job", "job_id", "Retry the failed items of job {}?", "retried"),
}


def _html(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    body = _ENV.get_template(name).render(**context)
    return HTMLResponse(body, status_code=status_code, headers=SECURITY_HEADERS)


# Views of one snapshot kept rendered; more distinct searches than this are rendered each time.
MAX_FRAGMENTS = 64
# A job id as a form sends it: ASCII digits within bigint (str.isdigit() also passes "²" and
# "١", which int() refuses or reads as another number).
_JOB_ID = re.compile(r"[0-9]{1,18}")


def _own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


def _secure(request: Request) -> bool:
    # Behind Render's router TLS ends before us: the router says so in X-Forwarded-Proto.
    forwarded = request.headers.get("x-forwarded-proto", "")
    return request.url.scheme == "https" or forwarded.split(",")[0].strip() == "https"


def _set_session(response: Response, request: Request, value: str) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=MAX_AGE_SECONDS,
        path="/",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


# A form of ours holds a token and an id: anything much larger is not one of ours.
MAX_FORM_BYTES = 16 * 1024


async def _form(request: Request) -> dict[str, str]:
    """The URL-encoded form every page of ours posts (no file uploads: no multipart parser)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return {}
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=16)
    except (UnicodeDecodeError, ValueError):
        return {}
    return dict(pairs)


def _int_param(value: str | None, default: int) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default


class Dashboard:
    """The dashboard's routes around one shared snapshot."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        settings: Settings,
        snapshot: SharedSnapshot | None = None,
        costs: CostReport | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        # What the stores cost (shared with /metrics); None: the page shows no costs.
        self.costs = costs
        self.sessions = Sessions(settings.api_token)
        self.store = SessionStore(pool)
        self._key_lock = anyio.Lock()
        # Without API_TOKEN anyone who reaches the port holds a session: read-only unless the
        # operator said otherwise.
        self.actions = (
            settings.api_token is not None or settings.dashboard_allow_actions_without_token
        )
        self.snapshot = snapshot or SharedSnapshot(pool, settings)
        # Live fragments served, against the snapshot's readings: the sharing, made visible.
        self.live_served = 0
        # Rendered fragments of the current snapshot by view (search, page, sort), gzipped too:
        # fifty pages on the same view cost one rendering, not fifty.
        self.fragments: dict[tuple[str, int, str], tuple[bytes, bytes]] = {}
        self.fragments_of: tuple[int, int] = (-1, -1)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.page, methods=["GET"]),
            Route("/dashboard/live", self.live, methods=["GET"]),
            Route("/dashboard/actions/{action}", self.act, methods=["POST"]),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
        ]

    # -- the page ---------------------------------------------------------------------------

    async def _ready(self) -> None:
        """The signing key loaded (no API_TOKEN: the fleet's, from PostgreSQL, once)."""
        if self.sessions.ready:
            return
        async with self._key_lock:
            if not self.sessions.ready:
                self.sessions.use_secret(await self.store.shared_secret())

    async def _session(self, scope: Scope, *, fresh: bool = False) -> str | None:
        """The nonce of the request's session when it is ours, unexpired and not signed out;
        `fresh` asks the database about the sign-out (for what changes state)."""
        await self._ready()
        nonce = self.sessions.verify(session_cookie(scope))
        if nonce is None or await self.store.revoked(nonce, fresh=fresh):
            return None
        return nonce

    async def signed_in(self, scope: Scope) -> bool:
        """For the token's middleware: whether the request carries a live session."""
        try:
            return await self._session(scope, fresh=scope.get("method") == "POST") is not None
        except DB_ERRORS as error:
            logger.warning("[Dashboard] session not checked: %s", one_line(error))
            return False

    def _context(
        self,
        request: Request,
        snapshot: Snapshot | None,
        costs: FleetCosts | None,
        csrf: str = "",
    ) -> dict[str, Any]:
        params = request.query_params
        page = None
        if snapshot is not None:
            page = store_page(
                snapshot.stores,
                params.get("q", ""),
                _int_param(params.get("page"), 1),
                params.get("sort", "backlog"),
            )
        return {
            "snapshot": snapshot,
            "costs": costs,
            "cost_error": self.costs.error if self.costs else None,
            "top_costs": costs.top(DASHBOARD_STORES) if costs else [],
            "stores": page,
            "chart": chart_bars(snapshot.fleet.per_minute, snapshot.now) if snapshot else None,
            "segments": progress_segments,
            "csrf": csrf,
            "signed_in": self.sessions.requires_sign_in,
            "actions": self.actions,
            "refresh_ms": int(REFRESH_SECONDS * 1000),
        }

    async def page(self, request: Request) -> Response:
        snapshot = await self.snapshot.get()
        costs = await self.costs.get() if self.costs else None
        try:
            nonce = await self._session(request.scope)
        except DB_ERRORS as error:
            return _unavailable(error)
        new_session = None
        if nonce is None and not self.sessions.requires_sign_in:
            # No API_TOKEN: hand out a session on the first visit, so actions carry a CSRF token.
            new_session = self.sessions.issue()
            nonce = self.sessions.verify(new_session)
        csrf = self.sessions.csrf_token(nonce) if nonce else ""
        response = _html(
            "dashboard.html",
            **self._context(request, snapshot, costs, csrf),
            flash=request.query_params.get("flash", ""),
        )
        if new_session is not None:
            _set_session(response, request, new_session)
        return response

    async def live(self, request: Request) -> Response:
        snapshot = await self.snapshot.get()
        costs = await self.costs.get() if self.costs else None
        self.live_served += 1
        generation = (self.snapshot.generation, self.costs.readings if self.costs else 0)
        if self.fragments_of != generation:
            self.fragments = {}
            self.fragments_of = generation
        params = request.query_params
        key = (params.get("q", ""), _int_param(params.get("page"), 1), params.get("sort", ""))
        rendered = self.fragments.get(key)
        if rendered is None:
            # No CSRF token in the shared fragment: the page's script adds its own on submit.
            context = self._context(request, snapshot, costs)
            body = _ENV.get_template("live.html").render(**context).encode()
            rendered = (body, gzip.compress(body, compresslevel=5))
            if len(self.fragments) < MAX_FRAGMENTS:
                self.fragments[key] = rendered
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers = {**SECURITY_HEADERS, "Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
            return Response(rendered[1], 200, headers, media_type="text/html")
        return Response(rendered[0], 200, SECURITY_HEADERS, media_type="text/html")

    # -- sign-in ----------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        if not self.sessions.requires_sign_in:
            return RedirectResponse("/", status_code=303)
        return _html("login.html", error="")

    async def login(self, request: Request) -> Response:
        if not self.sessions.requires_sign_in or self.settings.api_token is None:
            return RedirectResponse("/", status_code=303)
        if not same_origin(
            request.headers.get("origin"),
            request.headers.get("sec-fetch-site"),
            _own_origin(request),
        ):
            return _html("login.html", status_code=403, error="cross-site sign-in refused")
        form = await _form(request)
        presented = form.get("token", "").encode()
        if not token_matches(b"Bearer " + presented, self.settings.api_token):
            logger.warning("[Dashboard] sign-in refused: wrong token")
            return _html("login.html", status_code=401, error="wrong token")
        response = RedirectResponse("/", status_code=303)
        _set_session(response, request, self.sessions.issue())
        return response

    async def logout(self, request: Request) -> Response:
        if not self.actions:
            return _read_only()
        form = await _form(request)
        try:
            if not await self._csrf_ok(request, form):
                return _html("refused.html", status_code=403)
            cookie = session_cookie(request.scope)
            issued = self.sessions.issued_at(cookie)
            nonce = self.sessions.verify(cookie)
            if nonce is not None and issued is not None:
                # Ended in every process, not only in this browser: a copied cookie is dead too.
                await self.store.revoke(nonce, issued + MAX_AGE_SECONDS)
        except DB_ERRORS as error:
            return _unavailable(error)
        target = "/login" if self.sessions.requires_sign_in else "/"
        response = RedirectResponse(target, status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- actions ----------------------------------------------------------------------------

    async def _csrf_ok(self, request: Request, form: dict[str, str]) -> bool:
        """Raises one of DB_ERRORS when the session's sign-out cannot be looked up."""
        if request.scope.get("state", {}).get("auth") == "bearer":
            return True  # a header a foreign page cannot make a browser send
        if not same_origin(
            request.headers.get("origin"),
            request.headers.get("sec-fetch-site"),
            _own_origin(request),
        ):
            return False
        nonce = await self._session(request.scope, fresh=True)
        return nonce is not None and self.sessions.csrf_matches(nonce, form.get("csrf"))

    async def act(self, request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ACTIONS:
            return _html("refused.html", status_code=404)
        if not self.actions:
            return _read_only()
        form = await _form(request)
        try:
            if not await self._csrf_ok(request, form):
                return _html("refused.html", status_code=403)
            nonce = await self._session(request.scope)
        except DB_ERRORS as error:
            return _unavailable(error)
        block, field, question, done = ACTIONS[action]
        target = form.get(field, "").strip()
        if not target:
            return RedirectResponse("/?flash=" + _quote(f"{field} missing"), 303)
        if field == "job_id" and not _JOB_ID.fullmatch(target):
            reason = f"{target!r} is not a job id (a whole number, digits 0-9)."
            return _html("refused.html", status_code=400, reason=reason)
        if form.get("confirmed") != "yes":
            # Without the script's confirm(): ask on a page of its own.
            return _html(
                "confirm.html",
                question=question.format(target),
                action=action,
                field=field,
                target=target,
                csrf=self.sessions.csrf_token(nonce) if nonce else "",
            )
        message = await self._run(block, field, target, done)
        return RedirectResponse("/?flash=" + _quote(message), status_code=303)

    async def _run(self, block: str, field: str, target: str, done: str) -> str:
        value: int | str = int(target) if field == "job_id" else target
        what = f"job {target}" if field == "job_id" else f"store {target}"
        try:
            async with self.pool.connection(timeout=DB_TIMEOUT_SECONDS) as conn:
                cursor = await conn.execute(queries("dashboard")[block], {field: value})
                row = await cursor.fetchone() if cursor.description else None
        except psycopg.errors.NoDataFound:
            return f"{what}: not {done}: there is no such job"
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction) as error:
            logger.warning("[Dashboard] %s: %s", block, one_line(error))
            return f"{what}: not {done}: the database lacks this feature (listener migrate up?)"
        except DB_ERRORS as error:
            logger.warning("[Dashboard] %s failed: %s", block, one_line(error))
            return redact(f"{what}: not {done}: {one_line(error)}")
        # The lifecycle's functions answer {"changed": false, ...} when there was nothing to do.
        if row is not None and isinstance(row[0], dict) and row[0].get("changed") is False:
            status = row[0].get("status", "")
            return f"{what}: nothing to do (it is {status})" if status else f"{what}: unchanged"
        logger.info("[Dashboard] %s %s from the dashboard", what, done)
        self.snapshot.taken = float("-inf")  # the next page load shows the change
        return f"{what} {done}"


def _quote(text: str) -> str:
    return quote(text, safe="")


def _read_only() -> Response:
    reason = (
        "Without API_TOKEN the dashboard is read-only (anyone who reaches the port could act): "
        "set API_TOKEN, or DASHBOARD_ALLOW_ACTIONS_WITHOUT_TOKEN=true on a trusted network."
    )
    return _html("refused.html", status_code=403, reason=reason)


def _unavailable(error: BaseException) -> Response:
    logger.warning("[Dashboard] session store unreachable: %s", one_line(error))
    return _html("refused.html", status_code=503, reason="The database did not answer; try again.")
