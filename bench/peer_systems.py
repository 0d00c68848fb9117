"""The peer systems as the benchmarks run them: each one's tables (installed, loaded, reset,
counted) and its worker processes (`python -m bench.peer_workers`, or for Graphile Worker
`node bench/graphile_worker.mjs`), and the CPU they use. Shared by bench.peers, bench.db_work
and bench.fleet_budget."""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from bench.common import ROOT, add_backlog, sql
from bench.peer_workers import PGQUEUER_ENTRYPOINT, PROCRASTINATE_TASK

SYSTEMS = ("listener", "pgqueuer", "procrastinate", "graphile")
# Graphile Worker, Node: installed by npm into a scratch folder of the temporary directory
# (kept between runs). 0.18.0 declares `engines: node >= 22.18`; npm warns on an older node
# and the worker runs regardless (checked on node 20.20).
GRAPHILE_VERSION = "0.18.0"
GRAPHILE_SCRIPT = ROOT / "bench" / "graphile_worker.mjs"
GRAPHILE_PRESETS = ("performance", "defaults")
STORES = [f"store-{n:03d}" for n in range(100)]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- each system's tables ---------------------------------------------------------------------


def install(system: str, url: str) -> None:
    """listener's schema comes with the scratch database; the peers install theirs."""
    if system == "pgqueuer":
        from pgqueuer import Queries

        async def go() -> None:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await Queries.from_psycopg_connection(conn).install()

        asyncio.run(go())
    elif system == "procrastinate":
        app = procrastinate_app(url)

        async def go_app() -> None:
            async with app.open_async():
                await app.schema_manager.apply_schema_async()

        asyncio.run(go_app())
    elif system == "graphile":
        subprocess.run(
            ["node", str(GRAPHILE_SCRIPT), str(graphile_modules()), "migrate", node_url(url)],
            check=True,
            timeout=120,
        )


def graphile_modules() -> Path:
    """The scratch folder holding `node_modules/graphile-worker` at GRAPHILE_VERSION."""
    folder = Path(tempfile.gettempdir()) / f"listener-bench-graphile-{GRAPHILE_VERSION}"
    if not (folder / "node_modules" / "graphile-worker" / "package.json").exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("graphile: npm (and node) are needed to install graphile-worker")
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", f"graphile-worker@{GRAPHILE_VERSION}"],
            cwd=folder,
            check=True,
            timeout=600,
        )
    return folder


def node_url(conninfo: str) -> str:
    """A libpq connection string as the URL node-postgres reads (it takes no key=value form)."""
    parts = conninfo_to_dict(conninfo)
    user = quote(str(parts.get("user", "postgres")))
    password = parts.get("password")
    auth = f"{user}:{quote(str(password))}" if password else user
    host, port = parts.get("host", "127.0.0.1"), parts.get("port", "5432")
    return f"postgresql://{auth}@{host}:{port}/{quote(str(parts.get('dbname', 'postgres')))}"


def node_version() -> str:
    done = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def procrastinate_app(url: str) -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    app.task(name=PROCRASTINATE_TASK)(_noop)
    return app


async def _noop(key: str) -> None:
    return None


def block(kind: str, system: str) -> str:
    """`reset`, `done` or `last_done` of one system, from `bench/peers.sql`."""
    return sql("peers")[f"{kind}_{system}"]


def scalar(url: str, statement: str) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(statement).fetchone()  # type: ignore[arg-type]
    return row[0] if row else None


def load(system: str, url: str, jobs: int, reset: bool = True, analyze: bool = True) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        if reset:
            conn.execute(block("reset", system))
        if system == "listener" and jobs:
            add_backlog(conn, STORES, jobs // len(STORES))
    if system == "pgqueuer" and jobs:
        asyncio.run(_pgqueuer_enqueue(url, [b"x"] * jobs))
    elif system == "procrastinate" and jobs:
        asyncio.run(_procrastinate_defer(url, ["x"] * jobs))
    elif system == "graphile" and jobs:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql("peers")["add_jobs_graphile"], {"keys": ["x"] * jobs})
    if analyze:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE")


async def _pgqueuer_enqueue(url: str, payloads: list[bytes | None]) -> None:
    from pgqueuer import Queries

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        entrypoints = [PGQUEUER_ENTRYPOINT] * len(payloads)
        await Queries.from_psycopg_connection(conn).enqueue(
            entrypoints, payloads, [0] * len(payloads)
        )


async def _procrastinate_defer(url: str, keys: list[str]) -> None:
    app = procrastinate_app(url)
    async with app.open_async():
        await app.tasks[PROCRASTINATE_TASK].batch_defer_async(*({"key": k} for k in keys))


# -- worker processes -------------------------------------------------------------------------


class PeerProcess:
    """`python -m bench.peer_workers` with its stdout read line by line on a thread."""

    def __init__(
        self,
        system: str,
        url: str,
        concurrency: int | None,
        source: str | None = None,
        preset: str | None = None,
        **settings: str,
    ) -> None:
        command = [sys.executable, "-m", "bench.peer_workers", system, url]
        if system == "graphile":
            modules = str(graphile_modules())
            target = node_url(url)
            command = ["node", str(GRAPHILE_SCRIPT), modules, "work", target, preset or "defaults"]
        elif concurrency is not None:
            command += ["--concurrency", str(concurrency)]
        env = {
            "DATABASE_URL": url,
            "OPENAI_API_KEY": "bench-key",
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",  # the no-op handler never calls it
            "RATE_LIMIT_RPM": "0",
            "RATE_LIMIT_TPM": "0",
            "LOG_LEVEL": "WARNING",
            **settings,
        }
        # `python -m` puts the working directory first on sys.path: run in `source` so its
        # `listener` package is the one imported, and find this checkout's `bench` after it.
        cwd = ROOT
        if source is not None:
            cwd = Path(source)
            env["PYTHONPATH"] = str(ROOT)
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.first: float | None = None
        self.probes: dict[str, float] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no {prefix!r} line in {timeout} s") from None
            self._note(line)
            if line.startswith(prefix):
                return line

    def drain(self) -> None:
        while True:
            try:
                self._note(self.lines.get_nowait())
            except queue.Empty:
                return

    def _note(self, line: str) -> None:
        words = line.split()
        if words and words[0] == "first" and self.first is None:
            self.first = float(words[1])
        elif words and words[0] == "probe":
            self.probes[words[1]] = float(words[2])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes so far (Linux /proc)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone: a session that ended (its CPU is lost to the count)
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def backend_cpu(url: str) -> dict[int, float]:
    """CPU so far of each session on this database but the asking one."""
    with psycopg.connect(url, autocommit=True) as conn:
        pids = [int(pid) for (pid,) in conn.execute(sql("peers")["other_sessions"])]
    return {pid: cpu_seconds([pid]) for pid in pids}
