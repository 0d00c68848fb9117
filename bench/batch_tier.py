"""The batch tier (issue 27): `python -m bench.batch_tier [--quick]`.

- side by side, interleaved in one run: a 10,000-item import beside 20 small stores clicking
  (one-item real-time jobs at random moments), the import on the batch tier, on the real-time
  tier, and no import at all. Measured: the small stores' first-item latency (the job's
  `started_at - created_at`), the real-time requests the import took from the shared budget
  (batch: 0), and the import's cost from the tokens its items used (OpenAI's list prices for
  the model, the batch tier at half price; a real-time import still running at the end of its
  window is priced per item from the items it finished, which asked the same requests);
- writing a 50,000-line output file: the batch path's outcome writer (lines read, each checked
  by ChatHandler.answer, written through finish_items in chunks) against a real PostgreSQL,
  items per second, paced as the poll step paces it (listener/batches/pace.py: at most half the
  time, so a worker's claims go on beside it).

One `listener worker` process and the stub in its own process (real HTTP, the stub's batch
clock on the wall: validating 1 s, processing 5 s, finalizing 1 s). The machine is shared, so
only the ratios of figures taken in the same run mean anything.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import anyio
import psycopg

from bench.common import (
    console,
    markdown_table,
    new_figure,
    parse_args,
    percentile,
    publish,
    save_figure,
    scratch_database,
    spawn_worker,
    stop_processes,
    stub_process,
    table,
    timed,
    wait_workers_ready,
)
from listener import enqueue

NAME = "batch_tier"
RPM = 1200  # the shared real-time budget: 20 requests a second
IMPORT_ITEMS = 10_000
SMALL_STORES = [f"small-{n:02d}" for n in range(20)]
OUTPUT_LINES = 50_000
# gpt-4o-mini's list prices per million tokens (OpenAI's pricing page as read for
# docs/shared/OPENAI-FACTS.md; not fetched here): input, output. The Batch API: half.
PRICE_PER_MILLION = (0.15, 0.60)
BATCH_DISCOUNT = 0.5
WORKER_ENV = {
    "RATE_LIMIT_RPM": str(RPM),
    "WORKER_CONCURRENCY": "16",
    "BATCH_POLL_SECONDS": "1",
    "LOG_LEVEL": "WARNING",
}


def products(count: int, prefix: str) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-{n}", "name": f"{prefix} product {n}"} for n in range(count)]


def clicks(url: str, seconds: float, rng: random.Random) -> list[int]:
    """The small stores' one-item jobs, each store clicking every 1 to 3 s."""
    jobs = []
    due = {store: time.monotonic() + rng.uniform(0, 2) for store in SMALL_STORES}
    end = time.monotonic() + seconds
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < end:
            store, at = min(due.items(), key=lambda pair: pair[1])
            time.sleep(max(0.0, at - time.monotonic()))
            jobs.append(enqueue(conn, store, products(1, store), tier="realtime"))
            due[store] = time.monotonic() + rng.uniform(1, 3)
    return jobs


def wait_done(url: str, jobs: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM jobs WHERE id = ANY(%s) AND completed_at IS NULL", (jobs,)
            ).fetchone()
            if row == (0,):
                return
            time.sleep(0.2)


def cost(prompt: int, completion: int, tier: str) -> float:
    dollars = (prompt * PRICE_PER_MILLION[0] + completion * PRICE_PER_MILLION[1]) / 1e6
    return dollars * (BATCH_DISCOUNT if tier == "batch" else 1.0)


def scenario(label: str, import_tier: str | None, seconds: float, seed: int) -> dict[str, Any]:
    with stub_process(latency=0.05) as stub, scratch_database(f"{NAME}_{label}") as url:
        worker = spawn_worker(url, stub.base_url, **WORKER_ENV)
        try:
            wait_workers_ready(url, [worker])
            import_job = None
            if import_tier is not None:
                import_job = enqueue(url, "import", products(IMPORT_ITEMS, "import"),
                                     tier=import_tier)  # fmt: skip
            small = clicks(url, seconds, random.Random(seed))
            wait_done(url, small, 30)
            if import_tier == "batch" and import_job is not None:
                wait_done(url, [import_job], 120)
            requests = int(stub.stats()["requests_total"])
        finally:
            stop_processes([worker])
        with psycopg.connect(url, autocommit=True) as conn:
            latency = [
                float(s)
                for (s,) in conn.execute(
                    "SELECT extract(epoch FROM started_at - created_at) FROM jobs"
                    " WHERE id = ANY(%s) AND started_at IS NOT NULL",
                    (small,),
                ).fetchall()
            ]
            imported: dict[str, Any] = {}
            if import_job is not None:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'COMPLETED'),"
                    " count(*) FILTER (WHERE claimed_by NOT LIKE 'batch:%%'),"
                    " coalesce(sum((result->'usage'->>'prompt_tokens')::bigint), 0),"
                    " coalesce(sum((result->'usage'->>'completion_tokens')::bigint), 0)"
                    " FROM job_items WHERE job_id = %s",
                    (import_job,),
                ).fetchone()
                assert row is not None
                done, by_workers, prompt, completion = (int(v) for v in row)
                per_item = cost(prompt, completion, import_tier or "") / max(1, done)
                imported = {
                    "completed": done,
                    "claimed_by_workers": by_workers,
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "cost_usd": per_item * IMPORT_ITEMS,
                    "extrapolated": done < IMPORT_ITEMS,
                }
    realtime_of_import = requests - len(small)
    return {
        "label": label,
        "import_tier": import_tier,
        "small_jobs": len(small),
        "first_item_p50_s": percentile(latency, 50),
        "first_item_p95_s": percentile(latency, 95),
        "first_item_max_s": max(latency, default=0.0),
        "realtime_requests": requests,
        "realtime_requests_of_import": realtime_of_import,
        "import": imported,
    }


async def _output_write(url: str) -> dict[str, Any]:
    """50,000 items collected into one batch, then an output file of 50,000 lines written."""
    from listener.assembly import served_app
    from listener.batches.collect import collect_kind
    from listener.batches.context import Context
    from listener.batches.outcome import ReadLines, line_outcome, write_outcomes
    from listener.batches.poll import decide_all, read_file
    from listener.batches.store import batch_items
    from listener.settings import load_settings

    settings = load_settings(
        database_url=url, openai_api_key="k", openai_base_url="http://127.0.0.1:9/v1"
    )
    app = served_app(settings)
    handler = app["product_description"].handler
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        taken = await collect_kind(conn, "product_description", "gpt-4o-mini", OUTPUT_LINES,
                                   OUTPUT_LINES)  # fmt: skip
        assert taken is not None
        batch_id = taken[0]
        items = await batch_items(conn, batch_id, settings.max_payload_bytes)
        lines = "\n".join(_output_line(item.id, n) for n, item in enumerate(items))
        ctx = Context(conn, None, settings, app)  # type: ignore[arg-type]
        rng = random.Random(1)
        kind = app["product_description"]
        started = time.perf_counter()
        read = ReadLines()
        await read_file(lines, read)  # what the poll step does, paced as it is
        decided = await decide_all(
            items,
            read,
            lambda item, line: line_outcome(item, line, batch="batch_bench", kind=kind,
                                            handler=handler, settings=settings, rng=rng),  # type: ignore[arg-type]
            "bench",
        )  # fmt: skip
        checked = time.perf_counter()
        written = await write_outcomes(ctx.conn, batch_id, decided)
        done = time.perf_counter()
    await app.aclose()
    return {
        "lines": len(items),
        "written": written,
        "bytes": len(lines),
        "read_and_check_s": checked - started,
        "write_s": done - checked,
        "items_per_second": len(items) / (done - started),
        "write_items_per_second": len(items) / (done - checked),
    }


def _output_line(item_id: int, n: int) -> str:
    body = {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": 1_760_000_000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"A fine product, number {n}."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 60, "completion_tokens": 12, "total_tokens": 72},
    }
    line = {
        "id": f"batch_req_{n}",
        "custom_id": str(item_id),
        "response": {"status_code": 200, "request_id": f"req_{n}", "body": body},
        "error": None,
    }
    return json.dumps(line)


def output_write() -> dict[str, Any]:
    with scratch_database(f"{NAME}_output") as url:
        enqueue(url, "import", products(OUTPUT_LINES, "out"), tier="batch")
        return anyio.run(_output_write, url)


def run(quick: bool) -> dict[str, Any]:
    seconds = 15.0 if quick else 60.0
    rounds = 2 if quick else 3
    plan = [("batch", "batch"), ("realtime", "realtime"), ("none", None)]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in plan}
    for round_ in range(rounds):
        for label, tier in plan:  # interleaved: each round runs the three one after the other
            console.print(f"[bold]{NAME}[/bold]: round {round_ + 1}, import on {label}")
            runs[label].append(scenario(label, tier, seconds, seed=round_))
    console.print(f"[bold]{NAME}[/bold]: writing a {OUTPUT_LINES:,}-line output file")
    written = output_write()

    def pooled(label: str, key: str) -> float:
        values = [r[key] for r in runs[label]]
        return sum(values) / len(values)

    batch_cost = pooled_import(runs["batch"], "cost_usd")
    realtime_cost = pooled_import(runs["realtime"], "cost_usd")
    return {
        "quick": quick,
        # The machine's own 1-minute load average at the end: the run says how quiet it was.
        "load_average": round(os.getloadavg()[0], 2),
        "rpm": RPM,
        "seconds": seconds,
        "rounds": rounds,
        "runs": runs,
        "cost_ratio_batch_vs_realtime": batch_cost / realtime_cost if realtime_cost else None,
        "p50_ratio_batch_import_vs_none": pooled("batch", "first_item_p50_s")
        / max(1e-9, pooled("none", "first_item_p50_s")),
        "p95_ratio_batch_import_vs_none": pooled("batch", "first_item_p95_s")
        / max(1e-9, pooled("none", "first_item_p95_s")),
        "realtime_requests_of_batch_import": sum(
            r["realtime_requests_of_import"] for r in runs["batch"]
        ),
        "import_items_claimed_by_workers_on_batch": sum(
            r["import"]["claimed_by_workers"] for r in runs["batch"]
        ),
        "output_write": written,
        "prices_per_million": PRICE_PER_MILLION,
    }


def pooled_import(runs: list[dict[str, Any]], key: str) -> float:
    return sum(r["import"][key] for r in runs) / len(runs)


def report(result: dict[str, Any]) -> str:
    rows = []
    for label, runs in result["runs"].items():
        for r in runs:
            imp = r["import"]
            rows.append(
                [
                    label,
                    r["small_jobs"],
                    f"{r['first_item_p50_s'] * 1000:.0f} ms",
                    f"{r['first_item_p95_s'] * 1000:.0f} ms",
                    r["realtime_requests_of_import"] if r["import_tier"] else "-",
                    f"{imp['completed']:,}" if imp else "-",
                    f"${imp['cost_usd']:.4f}{' (extrapolated)' if imp.get('extrapolated') else ''}"
                    if imp
                    else "-",
                ]
            )
    headers = ["import on", "small jobs", "first item p50", "p95", "real-time requests of import",
               "import items done", "import cost"]  # fmt: skip
    console.print(table(NAME, headers, rows))
    out = result["output_write"]
    ratio = result["cost_ratio_batch_vs_realtime"]
    lines = [
        f"{'quick' if result['quick'] else 'full'} run, {result['rounds']} round(s) of "
        f"{result['seconds']:.0f} s each, interleaved, on a 2-core machine at load average "
        f"{result['load_average']}; "
        f"real-time budget {result['rpm']:,} RPM.",
        "",
        markdown_table(headers, rows),
        "",
        f"- import cost on batch / on real-time: {ratio:.3f}" if ratio else "- cost: n/a",
        "- small stores' first item with the import on batch / with no import: p50 "
        f"{result['p50_ratio_batch_import_vs_none']:.2f}, p95 "
        f"{result['p95_ratio_batch_import_vs_none']:.2f}",
        f"- real-time requests taken by the batch import: "
        f"{result['realtime_requests_of_batch_import']} (items claimed by workers: "
        f"{result['import_items_claimed_by_workers_on_batch']})",
        f"- a {out['lines']:,}-line output file ({out['bytes'] / 1e6:.1f} MB): read and checked "
        f"in {out['read_and_check_s']:.2f} s, written in {out['write_s']:.2f} s: "
        f"{out['items_per_second']:,.0f} items/s overall, "
        f"{out['write_items_per_second']:,.0f} items/s for the writes",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any]) -> None:
    fig, ax = new_figure()
    labels = list(result["runs"])
    p50 = [sum(r["first_item_p50_s"] for r in result["runs"][k]) / len(result["runs"][k]) * 1000
           for k in labels]  # fmt: skip
    p95 = [sum(r["first_item_p95_s"] for r in result["runs"][k]) / len(result["runs"][k]) * 1000
           for k in labels]  # fmt: skip
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p95, width=0.4, label="p95")
    ax.set_xticks(list(xs), [f"import on {k}" for k in labels])
    ax.set_ylabel("small stores' first item (ms)")
    ax.set_title("20 small stores clicking beside a 10,000-item import")
    ax.legend()
    save_figure(fig, NAME)


def main() -> None:
    args = parse_args(__doc__)
    timed(lambda quick: publish(NAME, run(quick), report, plot), args.quick)


if __name__ == "__main__":
    main()
