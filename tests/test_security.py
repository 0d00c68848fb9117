"""HTTP_HOST, API_TOKEN and secrets, against real processes: the worker serving on PORT,
`listener api`, `listener settings`, the CLI's error lines."""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from psycopg.conninfo import conninfo_to_dict

from listener.db import open_pool
from listener.http import app as http
from listener.http.serve import serving
from listener.stub.server import StubConfig, run_stub
from tests.support import (
    api_process,
    communicate,
    insert_job,
    make_settings,
    query,
    run_listener,
    spawn_worker,
    wait_for_counts,
    wait_until,
    worker_is_ready,
)

pytestmark = pytest.mark.anyio

DB_PASSWORD = "S3cretDbPass"
KEY = "sk-live-Zq9xW3vK7mN2pL5r"
TOKEN = "tok-Hb4Jd8Ls2Pq6Wv9Xy3Zk"
PROXY_PASSWORD = "Pr0xyPa55w0rd"
PG_ENV_PASSWORD = "EnvPgPa55"
NO_ADDRESS = "http://127.0.0.1:9/v1"  # OpenAI never called: no item is enqueued

needs_proc = pytest.mark.skipif(
    not Path("/proc/self/net/tcp").exists(), reason="reads listening sockets from Linux's /proc"
)


def _address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # /proc prints each 32-bit word of the address in the machine's (little-endian) byte order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, words), int(port, 16)


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses process `pid` listens on, as the kernel bound them."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for fields in (line.split() for line in lines):
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(_address(fields[1]))
    return found


def _client_host(bound: str) -> str:
    return "127.0.0.1" if bound == "0.0.0.0" else bound


@needs_proc
@pytest.mark.parametrize(
    ("env", "bound"), [({}, "127.0.0.1"), ({"HTTP_HOST": "0.0.0.0"}, "0.0.0.0")]
)
async def test_the_worker_serves_on_loopback_unless_http_host_says_otherwise(
    database_url: str, free_tcp_port: int, env: dict[str, str], bound: str
) -> None:
    port = free_tcp_port
    worker = spawn_worker(database_url, NO_ADDRESS, PORT=str(port), **env)
    try:
        # HTTP starts before the worker beats: ready means serving too.
        await wait_until(lambda: worker_is_ready(database_url, worker.pid))
        assert listening_addresses(worker.pid) == {(bound, port)}
        async with httpx.AsyncClient() as client:
            health = await client.get(f"http://{_client_host(bound)}:{port}/health")
        assert health.status_code == 200
    finally:
        worker.send_signal(signal.SIGTERM)
        output = await communicate(worker, 30)
    assert worker.returncode == 0, output
    assert f"on port {port} ({bound}; no API_TOKEN)" in output
    exposed = "is reachable from other machines and API_TOKEN is unset" in output
    assert exposed == (bound == "0.0.0.0"), output


@needs_proc
@pytest.mark.parametrize(
    ("args", "env", "bound"),
    [
        ([], {}, "127.0.0.1"),
        ([], {"HTTP_HOST": "127.0.0.2"}, "127.0.0.2"),
        (["--host", "0.0.0.0"], {"HTTP_HOST": "127.0.0.2"}, "0.0.0.0"),  # --host wins
    ],
)
async def test_listener_api_serves_on_loopback_unless_http_host_or_host_says_otherwise(
    database_url: str, free_tcp_port: int, args: list[str], env: dict[str, str], bound: str
) -> None:
    port = free_tcp_port
    async with api_process("--port", str(port), *args, DATABASE_URL=database_url, **env) as (
        pid,
        output,
    ):
        assert listening_addresses(pid) == {(bound, port)}, output.decode()
        async with httpx.AsyncClient() as client:
            health = await client.get(f"http://{_client_host(bound)}:{port}/health")
        assert health.status_code == 200
    assert f"on port {port} ({bound}; no API_TOKEN)".encode() in output


def test_a_bad_http_host_or_api_token_is_one_line_and_exit_2() -> None:
    for env in ({"HTTP_HOST": "http://0.0.0.0"}, {"API_TOKEN": "short-secret"}):
        result = run_listener("settings", **env)
        assert result.returncode == 2, result.stdout + result.stderr
        [line] = result.stderr.splitlines()
        [name] = env
        assert line.startswith(f"listener: invalid setting {name}: "), line
        assert "short-secret" not in result.stdout + result.stderr
    bad_flag = run_listener("api", "--host", "")
    assert bad_flag.returncode == 2
    assert "--host: must not be empty" in bad_flag.stderr


async def _check_guard(client: httpx.AsyncClient) -> None:
    """/health open; everything else 401 without the right token, 200 with it."""
    assert (await client.get("/health")).status_code == 200
    wrong = {"Authorization": "Bearer not-the-token-at-all"}
    assert (await client.get("/health", headers=wrong)).status_code == 200
    refused = [
        {},
        wrong,
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ]
    for path in ("/metrics", "/api/rate-limiter/stats"):
        for headers in refused:
            response = await client.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.headers["www-authenticate"] == "Bearer"
            body = response.json()
            assert body["status"] == "error" and "Bearer" in body["error"]
            assert TOKEN not in response.text
        for scheme in ("Bearer", "bearer"):
            granted = await client.get(path, headers={"Authorization": f"{scheme} {TOKEN}"})
            assert granted.status_code == 200, (path, granted.text)
    # Paths that do not exist say nothing without the token either.
    assert (await client.get("/nowhere")).status_code == 401
    assert (
        await client.get("/nowhere", headers={"Authorization": f"Bearer {TOKEN}"})
    ).status_code == 404


async def test_api_token_guards_every_endpoint_but_health(database_url: str) -> None:
    guarded = make_settings(NO_ADDRESS, api_token=TOKEN)
    pool = await open_pool(database_url, guarded, name="test-auth")
    try:
        async with (
            serving(http.build_app(pool, guarded), "127.0.0.1", 0) as server,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
        ):
            await _check_guard(client)
        # Without API_TOKEN nothing asks for one.
        async with (
            serving(http.build_app(pool, make_settings(NO_ADDRESS)), "127.0.0.1", 0) as server,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
        ):
            assert (await client.get("/metrics")).status_code == 200
            assert (await client.get("/api/rate-limiter/stats")).status_code == 200
    finally:
        await pool.close()


async def test_listener_api_asks_for_api_token(database_url: str, free_tcp_port: int) -> None:
    port = free_tcp_port
    async with (
        api_process("--port", str(port), DATABASE_URL=database_url, API_TOKEN=TOKEN) as (
            _pid,
            output,
        ),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        await _check_guard(client)
    text = output.decode()
    assert "(127.0.0.1; API_TOKEN required but for /health)" in text
    assert TOKEN not in text


def _with_password(conninfo: str, password: str) -> str:
    """The test database's URL, carrying a password (trust authentication accepts any)."""
    parts = conninfo_to_dict(conninfo)
    host = quote(str(parts.get("host") or "localhost"), safe="")  # maybe a socket folder
    port = parts.get("port") or 5432
    return f"postgresql://{parts['user']}:{password}@{host}:{port}/{parts['dbname']}"


async def test_no_secret_reaches_logs_http_errors_or_settings_output(
    database_url: str, free_tcp_port: int
) -> None:
    port = free_tcp_port
    secret_url = _with_password(database_url, DB_PASSWORD)
    seen: list[str] = []
    # The stub insists on the key: the worker really sends it, and still never prints it.
    async with run_stub(StubConfig(required_api_key=KEY)) as stub:
        # libpq's own password variable too (trust authentication never asks for it).
        secrets = {
            "DATABASE_URL": secret_url,
            "OPENAI_API_KEY": KEY,
            "API_TOKEN": TOKEN,
            "PGPASSWORD": PG_ENV_PASSWORD,
        }
        worker = spawn_worker(
            secret_url, stub.base_url, **secrets, PORT=str(port), LOG_LEVEL="DEBUG"
        )
        try:
            await wait_until(lambda: worker_is_ready(database_url, worker.pid))
            await insert_job(database_url, "store-secrets", 3)
            await wait_for_counts(database_url, lambda c: c == {"COMPLETED": 3})
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                for path in ("/health", "/metrics", "/api/rate-limiter/stats"):
                    response = await client.get(path, headers=bearer)
                    assert response.status_code == 200, (path, response.text)
                    seen.append(f"{response.headers}\n{response.text}")
                refused = await client.get("/metrics", headers={"Authorization": "Bearer x"})
                assert refused.status_code == 401
                seen.append(f"{refused.headers}\n{refused.text}")
        finally:
            worker.send_signal(signal.SIGTERM)
            output = await communicate(worker, 30)
    assert worker.returncode == 0, output
    assert stub.state.completed_total == 3
    assert " DEBUG " in output and "[Worker] Claimed" in output  # it did log, at length
    seen.append(output)

    shown = run_listener("settings", **secrets)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert f"DATABASE_URL={_with_password(database_url, '***')}" in lines
    assert {"OPENAI_API_KEY=***", "API_TOKEN=***"} <= set(lines)
    seen += [shown.stdout, shown.stderr]

    # libpq quotes these malformed URLs whole in its errors, password included.
    for malformed in (
        f"postgresql://postgres:{DB_PASSWORD}%zz@127.0.0.1/db",
        f"postgresql://postgres:{DB_PASSWORD}@[::1/db",
    ):
        for command in (["worker"], ["migrate", "status"]):
            failed = run_listener(*command, **(secrets | {"DATABASE_URL": malformed}))
            # Refused when the settings load, or at the first connection: masked either way.
            assert failed.returncode != 0 and failed.stderr, failed.stdout
            seen += [failed.stdout, failed.stderr]

    everything = "\n".join(seen)
    for secret in (DB_PASSWORD, KEY, TOKEN, PG_ENV_PASSWORD):
        assert secret not in everything


async def test_a_gateway_s_credentials_in_openai_base_url_are_never_printed(
    database_url: str,
) -> None:
    # An OpenAI-compatible gateway reached with credentials in its URL (httpx sends them as
    # basic authentication): its request lines and `listener settings` show the URL, masked.
    async with run_stub(StubConfig()) as stub:
        proxied = stub.base_url.replace("://", f"://gateway:{PROXY_PASSWORD}@", 1)
        worker = spawn_worker(database_url, proxied, LOG_LEVEL="DEBUG")
        try:
            await wait_until(lambda: worker_is_ready(database_url, worker.pid))
            await insert_job(database_url, "store-gateway", 2)
            await wait_for_counts(database_url, lambda c: c == {"COMPLETED": 2})
        finally:
            worker.send_signal(signal.SIGTERM)
            output = await communicate(worker, 30)
    assert worker.returncode == 0, output
    masked = proxied.replace(PROXY_PASSWORD, "***")
    assert f"POST {masked}/chat/completions" in output  # it did print the URL
    shown = run_listener("settings", OPENAI_BASE_URL=proxied)
    assert f"OPENAI_BASE_URL={masked}" in shown.stdout.splitlines()
    assert PROXY_PASSWORD not in output + shown.stdout + shown.stderr


# -- DNS rebinding (issue 25, defect 3) ------------------------------------------------------


async def test_a_request_naming_a_foreign_host_is_refused_but_health(database_url: str) -> None:
    """A page whose name rebinds to this machine sends its own name in Host: 421 for it."""
    settings = make_settings(NO_ADDRESS, allowed_hosts="dash.example.com, *.example.org")
    pool = await open_pool(database_url, settings, name="test-hosts")
    try:
        async with (
            serving(http.build_app(pool, settings), "127.0.0.1", 0) as server,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
        ):
            port = server.port
            for host in (f"rebind.attacker.example:{port}", "example.org", "localhost.evil.test"):
                for path in ("/", "/metrics", "/api/rate-limiter/stats", "/dashboard/live"):
                    response = await client.get(path, headers={"Host": host})
                    assert response.status_code == 421, (host, path)
                    assert "ALLOWED_HOSTS" in response.json()["error"]
                refused = await client.post(
                    "/dashboard/actions/pause", data={"instance_id": "s"}, headers={"Host": host}
                )
                assert refused.status_code == 421
                # A platform's health check may name an internal address: /health answers.
                assert (await client.get("/health", headers={"Host": host})).status_code == 200
            allowed = (
                f"localhost:{port}",
                f"LOCALHOST.:{port}",
                "app.localhost",
                f"127.0.0.1:{port}",
                f"[::1]:{port}",
                "10.1.2.3",  # an address literal: no name to rebind
                "dash.example.com",
                "eu.example.org:443",
            )
            for host in allowed:
                response = await client.get("/metrics", headers={"Host": host})
                assert response.status_code == 200, host
    finally:
        await pool.close()


async def test_without_api_token_the_dashboard_is_read_only_unless_allowed(
    database_url: str,
) -> None:
    """No API_TOKEN: whoever reaches the port gets a session, so a session proves nothing; the
    actions are refused (403, nothing changed) and not offered, unless a setting says so."""
    job_id = await insert_job(database_url, "store-ro", 2)
    settings = make_settings(NO_ADDRESS)
    pool = await open_pool(database_url, settings, name="test-read-only")
    try:
        async with (
            serving(http.build_app(pool, settings), "127.0.0.1", 0) as server,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
        ):
            page = await client.get("/")
            assert page.status_code == 200 and "store-ro" in page.text
            assert "Read-only" in page.text
            assert "/dashboard/actions/" not in page.text  # no button to press
            csrf = re.search(r'data-csrf="([0-9a-f]+)"', page.text)
            assert csrf, "the page still carries its CSRF token"
            for action, form in (
                ("cancel", {"job_id": str(job_id)}),
                ("pause", {"instance_id": "store-ro"}),
            ):
                response = await client.post(
                    f"/dashboard/actions/{action}",
                    data={**form, "confirmed": "yes", "csrf": csrf.group(1)},
                )
                assert response.status_code == 403, action
                assert "DASHBOARD_ALLOW_ACTIONS_WITHOUT_TOKEN" in response.text
            assert (await client.post("/logout", data={"csrf": csrf.group(1)})).status_code == 403
        rows = await query(database_url, "SELECT status FROM jobs WHERE id = %s", (job_id,))
        assert rows == [("PENDING",)]
        assert await query(database_url, "SELECT count(*) FROM stores") == [(0,)]
    finally:
        await pool.close()


def test_bad_allowed_hosts_or_forwarded_allow_ips_is_one_line_and_exit_2() -> None:
    for env in (
        {"ALLOWED_HOSTS": "dash.example.com, http://x"},
        {"FORWARDED_ALLOW_IPS": "10.0.0.1/8"},  # host bits set: uvicorn would match nothing
        {"FORWARDED_ALLOW_IPS": "render"},
        {"DASHBOARD_ALLOW_ACTIONS_WITHOUT_TOKEN": "maybe"},
    ):
        result = run_listener("settings", **env)
        assert result.returncode == 2, result.stdout + result.stderr
        [line] = result.stderr.splitlines()
        [name] = env
        assert line.startswith(f"listener: invalid setting {name}: "), line


# -- behind a TLS-terminating proxy (issue 25, defect 4) -------------------------------------


async def test_sign_in_behind_a_proxy_uses_the_scheme_it_reports(
    database_url: str, free_tcp_port: int, tmp_path: Path
) -> None:
    """A proxy at 127.0.0.2 (not loopback's 127.0.0.1, like Render's router) terminates TLS and
    says `X-Forwarded-Proto: https`; the browser's Origin is https://. FORWARDED_ALLOW_IPS, read
    from `.env` like every setting, makes the server believe it: the sign-in is same-origin."""
    port = free_tcp_port
    (tmp_path / ".env").write_text("FORWARDED_ALLOW_IPS=127.0.0.2\n")
    env = {"DATABASE_URL": database_url, "API_TOKEN": TOKEN}
    # `listener api` from a folder holding the `.env` (as a deployment's working directory).
    async with api_process("--port", str(port), cwd=tmp_path, **env):
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(
            transport=transport, base_url=f"http://127.0.0.1:{port}"
        ) as proxy:
            origin = f"https://localhost:{port}"
            headers = {
                "Host": f"localhost:{port}",
                "Origin": origin,
                "X-Forwarded-Proto": "https",
                "X-Forwarded-For": "203.0.113.7",
            }
            signed = await proxy.post("/login", data={"token": TOKEN}, headers=headers)
            assert signed.status_code == 303, signed.text
            assert "Secure" in signed.headers["set-cookie"]
            # Not from the trusted address: the header is not believed, the origin is http://.
        untrusted = httpx.AsyncHTTPTransport(local_address="127.0.0.3")
        async with httpx.AsyncClient(
            transport=untrusted, base_url=f"http://127.0.0.1:{port}"
        ) as other:
            refused = await other.post("/login", data={"token": TOKEN}, headers=headers)
        assert refused.status_code == 403
