"""examples/node: a Node.js program with node-postgres creates a job with one multi-row insert,
LISTENs on job_finished and reads the results, against a real worker and the stub."""

from __future__ import annotations

import json
import os
import shutil
import signal
from urllib.parse import quote

import anyio
import pytest
from psycopg.conninfo import conninfo_to_dict

from listener.stub.server import StubConfig, run_stub
from tests.support import ROOT, communicate, spawn_worker, wait_until, worker_is_ready

EXAMPLE = ROOT / "examples" / "node"


def as_url(conninfo: str) -> str:
    """node-postgres takes a URL; the fixtures give `host=… dbname=…`."""
    parts = conninfo_to_dict(conninfo)
    host, dbname = str(parts.get("host", "")), quote(str(parts["dbname"]))
    user = quote(str(parts.get("user", "postgres")))
    if host.startswith("/"):  # the embedded fallback's socket folder
        return f"postgresql://{user}@/{dbname}?host={quote(host)}"
    return f"postgresql://{user}@{host}:{parts.get('port', 5432)}/{dbname}"


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    if found is None and not os.environ.get("CI"):
        pytest.skip("node is not installed")
    assert found, "node is not installed"
    # scripts/test runs `npm ci` in examples/node (package-lock.json pins pg).
    assert (EXAMPLE / "node_modules" / "pg").is_dir(), "run: npm ci --prefix examples/node"
    return found


def test_the_example_stays_small() -> None:
    assert len((EXAMPLE / "enqueue.mjs").read_text(encoding="utf-8").splitlines()) <= 60
    assert (EXAMPLE / "package-lock.json").exists()


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_node_example_creates_a_job_and_hears_its_results(
    node: str, database_url: str
) -> None:
    async with run_stub(StubConfig()) as stub:
        worker = spawn_worker(database_url, stub.base_url)
        try:
            await wait_until(lambda: worker_is_ready(database_url, worker.pid))
            env = {**os.environ, "DATABASE_URL": as_url(database_url), "TIMEOUT_SECONDS": "60"}
            done = await anyio.run_process(
                [node, str(EXAMPLE / "enqueue.mjs")], env=env, cwd=EXAMPLE, check=False
            )
        finally:
            worker.send_signal(signal.SIGTERM)
            output = await communicate(worker, 30)
    assert done.returncode == 0, done.stderr.decode() + output
    report = json.loads(done.stdout)
    assert report["job"]["status"] == "COMPLETED"
    assert (report["job"]["completed"], report["job"]["failed"]) == (3, 0)
    assert [item["product_id"] for item in report["items"]] == ["mug-1", "tee-2", "lamp-3"]
    assert all(item["status"] == "COMPLETED" and item["result"] for item in report["items"])
    assert stub.state.completed_total == 3
