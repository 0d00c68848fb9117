"""The dashboard behind a real TLS-terminating reverse proxy (issue 25, defect 4): Debian's nginx
in front of `listener api`, as Render's router is in front of the web service, and a real browser
(Debian's Chromium, driven by Playwright) signing in and pausing a store over https://.

The proxy connects from 127.0.0.2 (`proxy_bind`): an address the server trusts only because
FORWARDED_ALLOW_IPS says so, like the router's addresses on Render (uvicorn alone trusts
127.0.0.1). Without the setting the server's own origin would be http:// while the browser says
https://, and the sign-in would be refused as cross-site."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from playwright.async_api import async_playwright, expect

from tests.conftest import CHROMIUM_ARGS
from tests.support import SLACK, api_process, insert_job, query, wait_until

pytestmark = pytest.mark.anyio

NGINX = os.environ.get("LISTENER_TEST_NGINX", "/usr/sbin/nginx")
TOKEN = "proxy-test-token-0123456789abcdef"
WAIT_MS = int(20_000 * SLACK)
PROXY_ADDRESS = "127.0.0.2"  # where the proxy's connections come from: not uvicorn's default

NGINX_CONF = """
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {tmp}/cert.pem;
        ssl_certificate_key {tmp}/key.pem;
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_bind {proxy_address};
            # What Render's router sends: the browser's Host, the scheme TLS ended with.
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


@pytest.fixture
def nginx_path() -> str:
    """nginx's path; in CI its absence fails the test instead of skipping it."""
    if os.access(NGINX, os.X_OK):
        return NGINX
    if os.environ.get("CI"):
        pytest.fail(f"{NGINX} is missing: scripts/chromium installs it (apt-get install nginx)")
    pytest.skip(f"{NGINX} is missing (apt-get install nginx)")


def self_signed_certificate(folder: Path) -> None:
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
            "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip


async def accepts(port: int) -> bool:
    try:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


@asynccontextmanager
async def tls_proxy(nginx: str, folder: Path, port: int, upstream: int) -> AsyncIterator[None]:
    """nginx terminating TLS on 127.0.0.1:port, forwarding to 127.0.0.1:upstream."""
    await anyio.to_thread.run_sync(self_signed_certificate, folder)
    conf = folder / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=folder, port=port, upstream=upstream, proxy_address=PROXY_ADDRESS
        )
    )
    log = folder / "error.log"
    async with await anyio.open_process(
        [nginx, "-e", str(log), "-p", str(folder), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    ) as process:

        async def ready() -> bool:
            if process.returncode is not None:
                raise AssertionError(f"nginx ended: {log.read_text() if log.exists() else ''}")
            return await accepts(port)

        try:
            await wait_until(ready)
            yield
        finally:
            process.terminate()
            with anyio.CancelScope(shield=True), anyio.fail_after(30):
                await process.wait()


async def test_sign_in_and_pause_through_a_tls_terminating_proxy(
    database_url: str,
    chromium_path: str,
    nginx_path: str,
    free_tcp_port_factory: Callable[[], int],
    tmp_path: Path,
) -> None:
    api_port, proxy_port = free_tcp_port_factory(), free_tcp_port_factory()
    await insert_job(database_url, "store-tls", 3)  # no worker: it waits, with a Pause button
    # The setting in the service's `.env` (uvicorn alone reads only the environment).
    workdir = tmp_path / "service"
    workdir.mkdir()
    (workdir / ".env").write_text(f"FORWARDED_ALLOW_IPS={PROXY_ADDRESS}\n")
    base = f"https://localhost:{proxy_port}"
    async with (
        api_process(
            "--port", str(api_port), cwd=workdir, DATABASE_URL=database_url, API_TOKEN=TOKEN
        ),
        tls_proxy(nginx_path, tmp_path, proxy_port, api_port),
        async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_ARGS
        )
        try:
            context = await browser.new_context(ignore_https_errors=True)
            page = await context.new_page()
            page.on("dialog", lambda dialog: dialog.accept())  # the confirmation: yes
            await page.goto(base + "/")
            await expect(page).to_have_url(base + "/login", timeout=WAIT_MS)
            await page.fill("#token", TOKEN)
            await page.click("button[type=submit]")
            await expect(page).to_have_url(base + "/", timeout=WAIT_MS)
            await expect(page.get_by_role("heading", name="Workers")).to_be_visible()
            [cookie] = [c for c in await context.cookies() if c["name"] == "listener_session"]
            assert cookie["secure"] and cookie["httpOnly"]

            row = page.locator("tr[data-store='store-tls']")
            await row.get_by_role("button", name="Pause").click(timeout=WAIT_MS)
            await expect(page.get_by_role("status")).to_have_text(
                "store store-tls paused", timeout=WAIT_MS
            )
            paused = await query(
                database_url, "SELECT paused FROM stores WHERE instance_id = 'store-tls'"
            )
            assert paused == [(True,)]

            await page.get_by_role("button", name="Sign out").click()
            await expect(page).to_have_url(base + "/login", timeout=WAIT_MS)
        finally:
            await browser.close()
