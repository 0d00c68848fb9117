"""The README's dashboard screenshots, from a real run: a worker in this process, the stub, and
stores in every state the page explains (busy, paused, capped, in backoff, a failed job, a
255-byte store id), photographed by the system's Chromium at 1280 and 390 px wide.

    python -m bench.dashboard_screens [--seconds 70]   # writes docs/dashboard-{1280,390}.png
"""

from __future__ import annotations

import argparse
import asyncio

import anyio
import psycopg
from playwright.async_api import async_playwright

from bench.common import ROOT, console, scratch_database
from listener import assembly
from listener.http import app as http
from listener.http.serve import serving
from listener.producer import enqueue
from listener.settings import load_settings
from listener.stub.server import StubConfig, run_stub

DOCS = ROOT / "docs"
TOKEN = "screenshot-token-0123456789abcdef"
CHROMIUM = "/usr/bin/chromium"
LONG_STORE = "merchant-" + "0123456789abcdef" * 15  # 249 bytes, no space to wrap at


def products(store: str, count: int) -> list[dict[str, object]]:
    return [{"name": f"Product {n} of {store[:20]}", "price": n} for n in range(count)]


def scene(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO stores (instance_id, paused, weight) VALUES ('store-paused', true, 1),"
            " ('store-capped', false, 1)"
        )
        conn.execute(
            "UPDATE stores SET max_in_flight = 1 WHERE instance_id = 'store-capped'"
        )
        conn.execute("INSERT INTO stores (instance_id, weight) VALUES ('store-vip', 3)")
    enqueue(url, "store-big", products("store-big", 3000))
    for n in range(1, 7):
        enqueue(url, f"store-{n:02}", products(f"store-{n:02}", 400))
    for store in ("store-paused", "store-capped", "store-vip", LONG_STORE):
        enqueue(url, store, products(store, 400))
    backoff = enqueue(url, "store-backoff", products("store-backoff", 30))
    failed = enqueue(url, "store-failed", products("store-failed", 8))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE job_items SET run_after = now() + interval '4 minutes', attempts = 2,"
            " error = 'OpenAI 503' WHERE job_id = %s",
            (backoff,),
        )
        conn.execute(
            "UPDATE job_items SET status = 'FAILED', completed_at = now(), attempts = 5,"
            " error = 'gave up after 5 attempt(s): OpenAI request timed out'"
            " WHERE job_id = %s AND id %% 3 = 0",
            (failed,),
        )
        conn.execute(
            "UPDATE job_items SET status = 'COMPLETED', completed_at = now(),"
            " result = '{\"text\": \"ok\"}' WHERE job_id = %s AND status = 'PENDING'",
            (failed,),
        )
        conn.execute(
            "UPDATE jobs SET status = 'COMPLETED_WITH_ERRORS', completed_at = now()"
            " WHERE id = %s",
            (failed,),
        )


async def shoot(url: str, seconds: float) -> None:
    async with run_stub(StubConfig(latency=0.5, rpm=0)) as stub:
        settings = load_settings(
            openai_api_key="sk-screenshot",
            openai_base_url=stub.base_url,
            rate_limit_rpm=600,
            rate_limit_tpm=0,
            worker_concurrency=8,
            api_token=TOKEN,
            lease_seconds=30,
        )
        async with (
            assembly.running_worker(settings, url, None, name="screens") as worker,
            serving(http.build_app(worker.pool, settings, worker), "127.0.0.1", 0) as server,
            async_playwright() as playwright,
        ):
            base = f"http://127.0.0.1:{server.port}"
            console.print(f"running {seconds:.0f} s so the chart has a few minutes …")
            await anyio.sleep(seconds)
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
            )
            try:
                for width, height in ((1280, 900), (390, 844)):
                    page = await browser.new_page(viewport={"width": width, "height": height})
                    await page.goto(base + "/")
                    await page.fill("#token", TOKEN)
                    await page.click("button[type=submit]")
                    await page.wait_for_selector("tr[data-store]")
                    path = DOCS / f"dashboard-{width}.png"
                    await page.screenshot(path=str(path), full_page=True)
                    console.print(f"wrote {path.relative_to(ROOT)}")
                    await page.close()
            finally:
                await browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=70.0)
    args = parser.parse_args()
    DOCS.mkdir(exist_ok=True)
    with scratch_database("screens") as url:
        scene(url)
        asyncio.run(shoot(url, args.seconds))


if __name__ == "__main__":
    main()
