"""Migrations and schema: every file applied and none unknown, the live schema equal to
`sql/schema.sql`, `job_items.instance_id` NOT NULL with no NULL row, every index present and
valid (the checklist's Step 2), and planner statistics that match the tables."""

from __future__ import annotations

import psycopg

from listener import migrate
from listener.doctor.context import Context, named
from listener.doctor.report import Check, fail, ok, warn
from listener.errors import ListenerError, one_line
from listener.sqlfiles import queries
from listener.statistics import STALE_RATIO, statistics_stale

# The checklist's indexes; every other index of sql/schema.sql is expected too.
CHECKLIST_INDEXES = (
    "idx_job_items_instance_status_id",
    "idx_job_items_status_id",
    "idx_job_items_status",
    "idx_job_items_job_id",
    "idx_job_items_product",
)


def expected_indexes() -> dict[str, tuple[str, str]]:
    """Each index `sql/schema.sql` creates, by name: its table, and the statement that builds
    it without blocking writes (pglast parses the file and writes the CONCURRENTLY form back)."""
    from pglast import parse_sql
    from pglast.ast import IndexStmt
    from pglast.stream import RawStream

    found = {}
    for raw in parse_sql(migrate.SCHEMA_FILE.read_text(encoding="utf-8")):
        statement = raw.stmt
        if isinstance(statement, IndexStmt) and statement.idxname and statement.relation:
            statement.concurrent = True
            found[str(statement.idxname)] = (
                str(statement.relation.relname),
                f"{RawStream()(statement)};",
            )
    return found


def check_migrations(ctx: Context) -> Check:
    if ctx.one("has_tracking_table") == (False,):
        return fail(
            "migrations",
            "no schema_migrations table: the database was never migrated",
            "run `listener migrate up`",
        )
    applied = {str(row[0]) for row in ctx.rows("applied_migrations")}
    files = [m.name for m in migrate.load_migrations()]
    pending = [name for name in files if name not in applied]
    unknown = sorted(applied - set(files))
    data = {"applied": len(applied), "files": len(files), "pending": pending, "unknown": unknown}
    if unknown:
        return fail(
            "migrations",
            f"{len(unknown)} applied migration(s) unknown to this release: {', '.join(unknown)}",
            "a newer release migrated this database (deploy it, or `listener migrate down` with"
            " that release), or a migration file is missing from this one",
            **data,
        )
    if pending:
        return fail(
            "migrations",
            f"{len(pending)} of {len(files)} pending: {', '.join(pending)}",
            "run `listener migrate up` (`listener migrate up --plan` first shows the locks)",
            **data,
        )
    return ok("migrations", f"{len(files)} of {len(files)} applied, none unknown", **data)


def check_schema_matches(ctx: Context) -> Check:
    """`migrate check` for the live database: its schema against sql/schema.sql. Needs a scratch
    database on the same server (created and dropped; the app's database is only read)."""
    try:
        with migrate.scratch_database(ctx.conninfo, "doctor") as target:
            migrate.load_schema_file(target)
            diff = migrate.schema_diff(named(ctx.conninfo), target)
    except (ListenerError, psycopg.Error) as error:
        return warn(
            "schema",
            f"not compared with sql/schema.sql: {one_line(error)}",
            "run `listener migrate diff` with a role that may CREATE DATABASE",
        )
    if diff.strip():
        statements = [line for line in diff.splitlines() if line.strip()]
        check = fail(
            "schema",
            f"differs from sql/schema.sql ({len(statements)} line(s) of SQL to reach it)",
            "`listener migrate diff` prints the SQL; pending migrations or a hand-made change?",
            diff=diff,
        )
        check.lines = statements[:5] + (["..."] if len(statements) > 5 else [])
        return check
    return ok("schema", "equal to sql/schema.sql (migrate check clean)")


def check_instance_id(ctx: Context) -> list[Check]:
    row = ctx.one("instance_id_column")
    if row is None:
        return [
            fail(
                "instance_id",
                "job_items.instance_id does not exist",
                "run `listener migrate up` (1730000012000_add-instance-id-to-job-items)",
            )
        ]
    not_null, checks = bool(row[0]), list(row[1] or [])
    # NOT NULL makes the count 0 by construction: no need to read the table.
    counted = ctx.one("null_instance_ids") if not not_null else None
    nulls = int(counted[0]) if counted else 0
    if not_null:
        column = ok("instance_id", "job_items.instance_id text NOT NULL")
    elif checks:
        column = ok(
            "instance_id",
            f"job_items.instance_id guarded by the validated CHECK {checks[0]}",
            constraint=checks[0],
        )
    else:
        column = fail(
            "instance_id",
            "job_items.instance_id may be NULL: no NOT NULL, no validated CHECK",
            "run `listener migrate up`: 1730000012000 backfills it and sets NOT NULL",
        )
    if nulls:
        rows = fail(
            "instance_id nulls",
            f"{nulls:,} item(s) with a NULL instance_id: no claim ever picks them",
            "backfill: UPDATE job_items i SET instance_id = j.instance_id FROM jobs j"
            " WHERE j.id = i.job_id AND i.instance_id IS NULL; then `listener migrate up`",
            rows=nulls,
        )
    else:
        rows = ok("instance_id nulls", "0 items with a NULL instance_id", rows=0)
    return [column, rows]


def check_indexes(ctx: Context) -> Check:
    indexes = expected_indexes()
    expected = {name: build for name, (_table, build) in indexes.items()}
    # Every table schema.sql indexes (the usage ledger's and the batches' too), not only jobs'.
    tables = sorted({table for table, _build in indexes.values()})
    present = {
        str(r[0]): (bool(r[2]), bool(r[3]), str(r[4]))
        for r in ctx.rows("indexes", tables=tables)
    }
    missing = [name for name in expected if name not in present]
    invalid = sorted(name for name, (valid, _ready, _def) in present.items() if not valid)
    lines = [f"missing: {name}: {expected[name]}" for name in missing]
    lines += [
        f"INVALID: {name} (listed by \\di, used by no query): REINDEX INDEX CONCURRENTLY {name};"
        for name in invalid
    ]
    data = {"expected": sorted(expected), "missing": missing, "invalid": invalid}
    if missing or invalid:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing)})")
        if invalid:
            parts.append(f"{len(invalid)} INVALID ({', '.join(invalid)})")
        check = fail(
            "indexes",
            "; ".join(parts),
            "an INVALID index is what an interrupted CREATE INDEX CONCURRENTLY leaves: rebuild"
            " it with REINDEX INDEX CONCURRENTLY (or DROP INDEX CONCURRENTLY and create it"
            " again); create a missing one CONCURRENTLY as shown (no write is blocked)",
            **data,
        )
        check.lines = lines
        return check
    named = sum(name in present for name in CHECKLIST_INDEXES)
    return ok(
        "indexes",
        f"{len(expected)} of {len(expected)} present and valid (the checklist's {named} included)",
        **data,
    )


def check_statistics(ctx: Context) -> Check:
    with ctx.conn.transaction():
        rows = ctx.conn.execute(queries("statistics")["table_statistics"]).fetchall()
    tables = {str(r[0]): (max(0, round(r[1])), int(r[2])) for r in rows}
    data = {
        name: {"estimated_rows": est, "live_rows": live} for name, (est, live) in tables.items()
    }
    stale = [name for name, (est, live) in tables.items() if statistics_stale(est, live)]
    counted = ", ".join(f"{name} {live:,}" for name, (_est, live) in tables.items())
    if not stale:
        return ok("statistics", f"planner statistics match the rows ({counted})", **data)
    return warn(
        "statistics",
        "; ".join(
            f"{name}: statistics count {tables[name][0]:,} rows, {tables[name][1]:,} live"
            for name in stale
        ),
        f"plans cached since then may read the whole table: a live worker's reaper ANALYZEs a"
        f" table holding {STALE_RATIO}x its counted rows within seconds; still here, run ANALYZE"
        " as the table's owner (the workers' role may not)",
        **data,
    )
