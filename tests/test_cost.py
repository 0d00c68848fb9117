"""What each store costs: usage recorded through the seam for a realtime item (the real stub,
the real `openai` client), the usage ledger and its rollup, the price table's arithmetic, a
model missing from it (unpriced, logged once, counted), and the figures `store show`, `/metrics`
and the dashboard show."""

from __future__ import annotations

import json
import logging
from datetime import date
from pathlib import Path
from typing import Any, cast

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from listener import App, Item, Result, enqueue, usage
from listener.costs import fleet_total, money, store_costs, top_stores
from listener.db import open_pool
from listener.http import app as http
from listener.openai import prices
from listener.openai.chat import served_tier
from listener.openai.prices import Price, PriceTableError
from listener.stub.server import StubConfig, run_stub
from listener.usage import UsageRow
from tests.support import make_settings, query, run_listener, running_worker, wait_until

pytestmark = pytest.mark.anyio

PRODUCTS = [{"id": f"p{n}", "name": f"Mug {n}", "description": "Stoneware."} for n in range(3)]


async def job_done(conninfo: str, job_id: int) -> bool:
    rows = await query(
        conninfo, "SELECT completed_at IS NOT NULL FROM jobs WHERE id = %s", (job_id,)
    )
    return bool(rows and rows[0][0])


def usage_row(
    store: str = "s", model: str = "gpt-4o-mini", tier: str = "realtime", **kw: Any
) -> UsageRow:
    values: dict[str, Any] = {
        "today": True,
        "items": 1,
        "prompt_tokens": 0,
        "cached_tokens": 0,
        "completion_tokens": 0,
    }
    values.update(kw)
    return UsageRow(store, model, tier, **values)


# -- recorded through the seam --------------------------------------------------------------


async def test_a_realtime_item_records_its_usage_model_and_tier(database_url: str) -> None:
    async with run_stub(StubConfig()) as stub:
        settings = make_settings(stub.base_url)
        async with running_worker(database_url, settings):
            job = enqueue(database_url, "store-cost", PRODUCTS)
            await wait_until(lambda: job_done(database_url, job))
    rows = await query(
        database_url,
        "SELECT status, usage, model, served_tier, result -> 'usage' FROM job_items"
        " WHERE job_id = %s ORDER BY id",
        (job,),
    )
    assert len(rows) == 3
    for status, used, model, tier, reported in rows:
        assert status == "COMPLETED"
        assert model == "gpt-4o-mini"
        assert tier == "realtime"  # the stub's answer names no service_tier: as requested
        # What the stub's answer reported, as OpenAI counts it.
        assert used["prompt_tokens"] == reported["prompt_tokens"] > 0
        assert used["completion_tokens"] == reported["completion_tokens"] > 0
        assert used["cached_tokens"] == 0
    # The completion's statement added the store's tokens to the ledger (the trigger).
    ledger = await query(
        database_url,
        "SELECT instance_id, model, served_tier, sum(items), sum(prompt_tokens),"
        " sum(completion_tokens) FROM store_usage_recent GROUP BY 1, 2, 3",
    )
    prompt = sum(row[1]["prompt_tokens"] for row in rows)
    completion = sum(row[1]["completion_tokens"] for row in rows)
    assert ledger == [("store-cost", "gpt-4o-mini", "realtime", 3, prompt, completion)]


async def test_the_rollup_folds_the_ledger_and_outlives_the_jobs(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        job = conn.execute("INSERT INTO jobs (instance_id) VALUES ('s1') RETURNING id").fetchone()
        assert job is not None
        conn.execute(
            "INSERT INTO job_items (job_id, product_id, status)"
            " SELECT %s, 'p' || n, 'PROCESSING' FROM generate_series(1, 5) n",
            (job[0],),
        )
        # Any writer that completes items with a served tier is counted (a batch outcome
        # writer, an operator), a statement at a time.
        complete = (
            "UPDATE job_items SET status = 'COMPLETED', completed_at = now(),"
            " model = 'gpt-4o-mini', served_tier = 'batch', usage = %s"
            " WHERE product_id = ANY(%s)"
        )
        used = json.dumps({"prompt_tokens": 100, "completion_tokens": 10})
        conn.execute(complete, (used, ["p1", "p2"]))
        conn.execute(complete, (used, ["p3", "p4"]))
        # A malformed usage counts its item with 0 tokens: it must not fail the statement.
        conn.execute(complete, (json.dumps({"prompt_tokens": "lots"}), ["p5"]))
        # A later update of a completed item adds nothing.
        conn.execute("UPDATE job_items SET result = '{}' WHERE job_id = %s", (job[0],))
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        done = await usage.compact(conn)
    assert done.locked and done.moved == 5  # a ledger row per completed item
    assert await query(database_url, "SELECT count(*) FROM store_usage_recent") == [(0,)]
    daily = await query(
        database_url,
        "SELECT instance_id, model, served_tier, items, prompt_tokens, completion_tokens"
        " FROM store_usage_daily",
    )
    assert daily == [("s1", "gpt-4o-mini", "batch", 5, 400, 40)]
    monthly = await query(
        database_url,
        "SELECT instance_id, month = date_trunc('month', now() AT TIME ZONE 'UTC')::date,"
        " items, prompt_tokens FROM store_usage_monthly",
    )
    assert monthly == [("s1", True, 5, 400)]
    # Retention deletes the job and its items: the store's month stays.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM jobs WHERE id = %s", (job[0],))
    rows = usage.read_usage(database_url, "s1")
    assert [(r.model, r.served_tier, r.today, r.items) for r in rows] == [
        ("gpt-4o-mini", "batch", True, 5)
    ]
    # The fleet's reading (the monthly rollup less today's, today's, the ledger) agrees, with a
    # day earlier this month and a completion not folded yet.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO store_usage_monthly SELECT 's1',"
            " date_trunc('month', now() AT TIME ZONE 'UTC')::date, 'gpt-4o-mini', 'realtime',"
            " 7, 70, 0, 7 ON CONFLICT (instance_id, month, model, served_tier) DO UPDATE"
            " SET items = store_usage_monthly.items + 7"
        )
        conn.execute(
            "INSERT INTO store_usage_recent VALUES ('s1', (now() AT TIME ZONE 'UTC')::date,"
            " 'gpt-4o-mini', 'batch', 2, 20, 0, 2)"
        )
    fleet = [
        (r.store, r.served_tier, r.today, r.items, r.prompt_tokens)
        for r in usage.read_usage(database_url, None)
    ]
    assert fleet == [("s1", "batch", True, 7, 420), ("s1", "realtime", False, 7, 70)]


# -- the price table -------------------------------------------------------------------------


def test_price_arithmetic_counts_cached_prompt_tokens_at_the_cached_price() -> None:
    price = Price(input=0.15, cached_input=0.075, output=0.60)
    # 1M prompt tokens of which 400k cached, 500k completion tokens.
    assert price.cost(1_000_000, 400_000, 500_000) == pytest.approx(
        0.6 * 0.15 + 0.4 * 0.075 + 0.5 * 0.60
    )
    # More cached than prompt tokens (a malformed usage): never a negative input.
    assert price.cost(10, 50, 0) == pytest.approx(10 * 0.075 / 1e6)


def test_the_built_in_table_says_when_it_was_read_and_prices_batch_at_half() -> None:
    table = prices.load_built_in()
    assert table.read_on >= date(2026, 12, 1)
    assert table.source
    realtime = table.price("gpt-4o-mini", "realtime")
    batch = table.price("gpt-4o-mini", "batch")
    assert realtime is not None and batch is not None
    assert batch.input == pytest.approx(realtime.input / 2)
    assert batch.output == pytest.approx(realtime.output / 2)
    # A response names the dated snapshot: priced as its alias.
    assert table.price("gpt-4o-mini-2024-07-18", "realtime") == realtime


def test_cost_and_savings_per_tier_and_period() -> None:
    table = prices.load_built_in()
    rows = [
        usage_row(tier="realtime", prompt_tokens=1_000_000, completion_tokens=1_000_000),
        usage_row(tier="batch", today=False, items=2, prompt_tokens=2_000_000, completion_tokens=0),
        usage_row(tier="flex", items=1, prompt_tokens=0, completion_tokens=1_000_000),
    ]
    cost = store_costs(rows, table)["s"]
    assert cost.today.cost_usd == pytest.approx(0.15 + 0.60 + 0.30)
    assert cost.today.saved_usd == pytest.approx(0.30)  # flex: 0.60 - 0.30
    assert cost.month.cost_usd == pytest.approx(0.15 + 0.60 + 0.30 + 2 * 0.075)
    assert cost.month.saved_usd == pytest.approx(0.30 + 2 * 0.075)
    assert cost.month.tiers["batch"].saved_usd == pytest.approx(0.15)
    assert cost.month.tiers["realtime"].saved_usd == 0
    assert cost.month.items == 4
    assert money(cost.month) == "$1.2000"


def test_a_model_missing_from_the_table_is_unpriced_logged_once_and_never_zero(
    caplog: pytest.LogCaptureFixture,
) -> None:
    table = prices.load_built_in()
    rows = [
        usage_row(model="gpt-9-giant", prompt_tokens=1000, items=3),
        usage_row(model="gpt-9-giant", today=False, prompt_tokens=1000, items=2),
        usage_row(store="t", model="gpt-9-giant", items=1),
    ]
    with caplog.at_level(logging.WARNING, logger="listener.openai.prices"):
        costs = store_costs(rows, table)
        store_costs(rows, table)  # a second reading logs nothing more
    warnings = [r.getMessage() for r in caplog.records if "gpt-9-giant" in r.getMessage()]
    assert len(warnings) == 1
    assert "not in the price table" in warnings[0] and "OPENAI_PRICES_FILE" in warnings[0]
    month = costs["s"].month
    assert month.unpriced_items == 5 and month.unpriced_models == {"gpt-9-giant"}
    assert money(month) == "unpriced"
    # Partly priced: the priced part and the unpriced items, both said.
    mixed = store_costs([*rows, usage_row(completion_tokens=1_000_000)], table)["s"].month
    assert money(mixed) == "$0.6000 + 5 unpriced item(s)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models."m".realtime]\ninput = 1\noutput = 2\n', "read_on"),
        ('read_on = 2026-12-07\n[models."m".batch]\ninput = 1\noutput = 2\n', "no realtime"),
        ('read_on = 2026-12-07\n[models."m".realtime]\ninput = -1\noutput = 2\n', "0 or more"),
        ('read_on = 2026-12-07\n[models."m".realtime]\ninput = "x"\noutput = 2\n', "a number"),
        ('read_on = 2026-12-07\n[models."m".priority]\ninput = 1\noutput = 2\n', "tier must"),
        ("read_on = [", "price table"),
    ],
)
def test_a_bad_price_table_is_one_line_naming_what_is_wrong(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(PriceTableError) as caught:
        prices.load_file(str(path))
    assert message in str(caught.value) and str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_price_file_that_cannot_be_read_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(PriceTableError, match="OPENAI_PRICES_FILE"):
        prices.load_file(str(tmp_path / "missing.toml"))


def test_the_reported_service_tier_maps_to_ours() -> None:
    assert served_tier("flex", "flex") == "flex"
    assert served_tier("default", "flex") == "realtime"  # flex asked, standard served
    assert served_tier(None, "flex") == "flex"
    assert served_tier("priority", "realtime") == "realtime"


def test_top_stores_bound_the_label_with_an_other_row() -> None:
    table = prices.load_built_in()
    rows = [usage_row(store=f"s{n}", completion_tokens=n * 1000) for n in range(1, 6)]
    costs = store_costs(rows, table)
    top = top_stores(costs, 2)
    assert [c.store for c in top] == ["s5", "s4", "other"]
    assert top[-1].month.items == 3
    assert fleet_total(top).month.cost_usd == pytest.approx(
        fleet_total(costs.values()).month.cost_usd
    )


# -- what the operator sees ------------------------------------------------------------------


def _complete(
    database_url: str, store: str, model: str, tier: str, prompt: int, completion: int
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        job = conn.execute(
            "INSERT INTO jobs (instance_id) VALUES (%s) RETURNING id", (store,)
        ).fetchone()
        assert job is not None
        conn.execute(
            "INSERT INTO job_items (job_id, product_id, status) VALUES (%s, 'p', 'PROCESSING')",
            (job[0],),
        )
        conn.execute(
            "UPDATE job_items SET status = 'COMPLETED', completed_at = now(), model = %s,"
            " served_tier = %s, usage = %s WHERE job_id = %s",
            (
                model,
                tier,
                json.dumps({"prompt_tokens": prompt, "completion_tokens": completion}),
                job[0],
            ),
        )


def test_store_show_prints_today_and_month_cost_and_savings(database_url: str) -> None:
    _complete(database_url, "bulk", "gpt-4o-mini", "batch", 2_000_000, 1_000_000)
    _complete(database_url, "bulk", "gpt-4o-mini", "realtime", 1_000_000, 0)
    _complete(database_url, "odd", "gpt-9-giant", "realtime", 10, 10)
    shown = run_listener("store", "show", "bulk", "--json", DATABASE_URL=database_url)
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    (store,) = document["stores"]
    month = store["cost"]["month"]
    assert month["cost_usd"] == pytest.approx(2 * 0.075 + 0.30 + 0.15)
    assert month["saved_usd"] == pytest.approx(2 * 0.075 + 0.30)
    assert month["tiers"]["batch"]["saved_usd"] == pytest.approx(0.45)
    assert store["cost"]["today"]["items"] == 2
    assert document["prices"]["read_on"] == prices.load_built_in().read_on.isoformat()
    text = run_listener("store", "show", "odd", DATABASE_URL=database_url, COLUMNS="200")
    assert text.returncode == 0, text.stderr
    assert "unpriced" in text.stdout and "gpt-9-giant" in text.stdout
    assert "OPENAI_PRICES_FILE" in text.stdout


async def test_metrics_and_dashboard_show_each_store_s_cost_and_savings(
    database_url: str, tmp_path: Path
) -> None:
    _complete(database_url, "bulk", "gpt-4o-mini", "batch", 2_000_000, 1_000_000)
    _complete(database_url, "live", "gpt-4o-mini", "realtime", 1_000_000, 0)
    _complete(database_url, "odd", "gpt-9-giant", "realtime", 10, 10)
    settings = make_settings("http://127.0.0.1:9/v1")
    pool = await open_pool(database_url, settings, name="test-cost-http")
    try:
        app = http.build_app(pool, settings)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            metrics = await client.get("/metrics")
            page = await client.get("/")
    finally:
        await pool.close()
    assert metrics.status_code == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.text)
        for sample in family.samples
    }

    def store(name: str, store: str, period: str, tier: str) -> float:
        labels = (("period", period), ("store", store), ("tier", tier))
        return samples[f"listener_store_{name}_usd", labels]

    assert store("cost", "bulk", "month", "batch") == pytest.approx(0.15 + 0.30)
    assert store("saved", "bulk", "today", "batch") == pytest.approx(0.45)
    assert store("cost", "live", "month", "realtime") == pytest.approx(0.15)
    assert store("saved", "live", "month", "realtime") == 0
    fleet_saved = samples["listener_saved_usd", (("period", "month"), ("tier", "batch"))]
    assert fleet_saved == pytest.approx(0.45)
    assert samples["listener_unpriced_items", (("period", "month"),)] == 1
    assert samples["listener_price_table_read_timestamp_seconds", ()] > 0
    assert page.status_code == 200
    html = page.text
    assert 'id="cost-month">$0.6000 + 1 unpriced item(s)<' in html
    assert 'id="saved-month">$0.4500<' in html
    assert 'data-cost-store="bulk"' in html and "gpt-9-giant" in html


def test_a_bad_price_file_stops_the_http_app_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text('read_on = 2026-12-07\n[models."m".realtime]\ninput = "free"\n')
    settings = make_settings("http://127.0.0.1:9/v1", openai_prices_file=str(path))
    with pytest.raises(PriceTableError, match="a number"):
        http.build_app(cast(Any, None), settings)


async def test_a_handler_of_our_own_meters_through_the_seam_and_bad_metering_is_dropped(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = App()

    @app.kind("metered", budget=None)
    async def metered(item: Item) -> Result:
        if item.payload["good"]:
            used = {"prompt_tokens": 1_000_000, "completion_tokens": 10, "reasoning": 7}
            return Result({"ok": 1}, usage=used, model="gpt-4o-mini", served_tier="realtime")
        return Result({"ok": 2}, usage={"prompt_tokens": -5}, model="m", served_tier="priority")

    settings = make_settings("http://127.0.0.1:9/v1")
    with caplog.at_level(logging.WARNING, logger="listener.storable"):
        async with running_worker(database_url, settings, app):
            job = enqueue(
                database_url,
                "own",
                [{"id": "good", "good": True}, {"id": "bad", "good": False}],
                kind="metered",
            )
            await wait_until(lambda: job_done(database_url, job))
    rows = await query(
        database_url,
        "SELECT product_id, status, result, usage, model, served_tier FROM job_items"
        " WHERE job_id = %s ORDER BY product_id",
        (job,),
    )
    assert rows == [
        # A metering that does not fit is dropped; the answer is kept.
        ("bad", "COMPLETED", {"ok": 2}, None, "m", None),
        # Keys other than the token counts are not stored.
        (
            "good",
            "COMPLETED",
            {"ok": 1},
            {"prompt_tokens": 1_000_000, "completion_tokens": 10},
            "gpt-4o-mini",
            "realtime",
        ),
    ]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "usage prompt_tokens is -5" in messages and "served tier 'priority'" in messages
    (cost,) = store_costs(usage.read_usage(database_url, "own"), prices.load_built_in()).values()
    assert cost.month.items == 1 and cost.month.cost_usd == pytest.approx(0.15 + 10 * 0.6 / 1e6)
