"""The Host a request names must be one of ours: the defence against DNS rebinding.

A page on any site can make its own name resolve to 127.0.0.1 (or any address of the machine)
after it loaded, then read and post to this server as "its own" origin: the browser sends that
name in Host. So a request whose Host names something this server does not answer for gets 421.

Allowed without configuration: every IP address literal (a browser that sends one is talking to
that address itself, so no name was rebound), `localhost` and `*.localhost` (browsers resolve
them to loopback themselves), and on Render the service's own name (RENDER_EXTERNAL_HOSTNAME,
which Render sets). ALLOWED_HOSTS adds names (`dash.example.com`, `*.example.com`; `*` turns the
check off). /health is exempt: a platform's health check may name an internal address, and it
tells nothing beyond up or down. starlette's TrustedHostMiddleware has no exemption and splits
`[::1]:3000` at the first colon, hence this one.
"""

from __future__ import annotations

import ipaddress
import os

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from listener.settings import split_list

EXEMPT_PATHS = frozenset({"/health"})
LOOPBACK_NAMES = ("localhost", "*.localhost")
# RFC 7540 9.1.2 "Misdirected Request": this server does not answer for that authority.
MISDIRECTED = 421
_WS_POLICY_VIOLATION = 1008


def host_name(header: str) -> str:
    """The name or address of a Host header, without its port, lower-case, without the final
    dot (`[::1]:3000` -> `::1`, `Example.COM.:443` -> `example.com`)."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.removesuffix(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class AllowedHosts:
    """The names this server answers for."""

    def __init__(self, configured: str, render_hostname: str | None = None) -> None:
        names = [*LOOPBACK_NAMES, *split_list(configured.lower())]
        if render_hostname:
            names.append(render_hostname.lower())
        self.any = "*" in names
        cleaned = [n.removeprefix("[").removesuffix("]").removesuffix(".") for n in names]
        self.exact = frozenset(n for n in cleaned if not n.startswith("*."))
        self.suffixes = tuple(n[1:] for n in cleaned if n.startswith("*."))

    @classmethod
    def from_settings(cls, allowed_hosts: str) -> AllowedHosts:
        return cls(allowed_hosts, os.environ.get("RENDER_EXTERNAL_HOSTNAME"))

    def allows(self, header: str | None) -> bool:
        # No Host at all is not a browser (every browser sends one): nothing was rebound.
        if self.any or header is None:
            return True
        name = host_name(header)
        return name in self.exact or name.endswith(self.suffixes) or _is_address(name)


class AllowedHostsMiddleware:
    """Answers 421 to a request naming a Host that `AllowedHosts` does not allow."""

    def __init__(self, app: ASGIApp, hosts: AllowedHosts) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or scope.get("path") in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        raw = next((v for k, v in scope.get("headers", ()) if k == b"host"), None)
        header = raw.decode("latin-1") if raw is not None else None
        if self.hosts.allows(header):
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            response = JSONResponse(
                {
                    "status": "error",
                    "error": f"this server does not answer for host {header!r}: "
                    "add its name to ALLOWED_HOSTS",
                },
                status_code=MISDIRECTED,
            )
            await response(scope, receive, send)
        else:
            await send({"type": "websocket.close", "code": _WS_POLICY_VIOLATION})
