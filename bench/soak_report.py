"""The soak's verdicts and report: what the raw run says, checked against explicit limits, as
markdown (`bench/results/soak.md`) and a plot (`bench/results/soak.png`)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from bench.soak_fleet import Life

# Memory: a worker that lived through the run may grow in its first minute (imports finish,
# pools and caches fill), not after. 0.5 MB/min is a leak of ~1.4 KB per item at ~6 items/s
# a process; 10 MB between the first and the last minute allows the warm-up and no more.
MAX_SLOPE_MB_PER_MIN = 0.5
MAX_GROWTH_MB = 10.0
# Degraded: under half of the ready work (at most the budget's worth) done in WINDOW seconds;
# fewer than MIN_POSSIBLE ready items is too little work to judge a rate by.
RECOVERY_SHARE = 0.5
WINDOW = 5
MIN_POSSIBLE = 10
# A process's RSS is read as "at start" once it has imported everything and is working.
WARM_UP_SECONDS = 10
_NOTABLE = re.compile(r"Traceback| ERROR | CRITICAL |unexpected error|grace period over")
_COUNTED = {
    "429 from OpenAI": "[RateLimiter] 429",
    "[Reaper] returned": "items reaped",
    "[Listener] connection lost": "listener reconnects",
    "FAILED:": "items FAILED",
    "heartbeat failed": "heartbeats failed",
    "releasing item": "items released (db)",
    "no limiter slot": "limiter unreachable",
    "outcome(s) not written": "outcomes superseded",
}


def scan_logs(lives: Sequence[Life]) -> list[dict[str, Any]]:
    """Per worker process: notable lines (errors, tracebacks) and counts of the expected ones."""
    out = []
    for life in lives:
        text = life.log_path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        notable = [line for line in lines if _NOTABLE.search(line)]
        counts = {label: sum(key in line for line in lines) for key, label in _COUNTED.items()}
        out.append(
            {"pid": life.pid, "slot": life.slot, "lines": len(lines), "notable": notable[:20]}
            | {"notable_total": len(notable), "counts": counts, "tail": lines[-5:]}
        )
    return out


def _slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (minutes, MB); 0 with fewer than 3 points."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def memory(raw: dict[str, Any]) -> dict[str, Any]:
    t0, stopped = raw["t0"], raw["marks"]["stopped"]
    lives = []
    for life in raw["lives"]:
        rss = [(t - t0, mb) for t, mb in life["rss"]]
        if not rss:
            continue
        start = life["started"] - t0
        warm = [(t, mb) for t, mb in rss if t >= start + WARM_UP_SECONDS] or rss[-1:]
        first = [mb for t, mb in warm if t < start + 60]
        end = rss[-1][0]
        last = [mb for t, mb in rss if t > end - 60]
        settled = [(t / 60, mb) for t, mb in rss if t >= start + 60]
        lives.append(
            {
                "slot": life["slot"],
                "pid": life["pid"],
                "from": start,
                "to": end,
                "how_ended": life["how_ended"],
                "exit_code": life["exit_code"],
                "rss_start": warm[0][1],
                "rss_first_minute": _mean(first),
                "rss_last_minute": _mean(last),
                "rss_max": max(mb for _, mb in rss),
                "slope_mb_per_min": _slope(settled),
                "series": rss,
            }
        )
    # The process that was there before the first item and was only stopped at the end.
    survivors = [
        life for life in lives if life["from"] <= 0 and life["to"] >= stopped - t0 - 2 * WINDOW
    ]
    return {"lives": lives, "survivor": survivors[0] if survivors else None}


def _ready_by_second(raw: dict[str, Any]) -> dict[int, int]:
    """Ready items at each second; a second without a reading (the database was being cut)
    keeps the last one."""
    known = {int(t): ready for t, ready, _processing in raw["backlog"]}
    if not known:
        return {}
    out, last = {}, 0
    for second in range(min(known), max(known) + 1):
        last = known.get(second, last)
        out[second] = last
    return out


def recoveries(raw: dict[str, Any], per_second: dict[int, int]) -> list[dict[str, Any]]:
    """Per fault, until the next one: the longest stretch without a completion, and how long
    the fleet was degraded. A second is degraded when, over the next WINDOW seconds, the fleet
    completed less than half of what a healthy one would have: the items ready at that second,
    at most the budget's WINDOW seconds' worth. Work that is not there (or not due yet, in
    backoff) is not counted, so the producer's lulls are never taken for a fault's effect."""
    t0, soak_end = raw["t0"], int(raw["marks"]["drain"])
    budget = int(raw["settings"]["worker_env"]["RATE_LIMIT_RPM"]) / 60
    ready = _ready_by_second(raw)
    fate = {int(row[0]): row for row in raw["db"]["held_fate"]}
    events = raw["faults"]
    out = []
    for i, fault in enumerate(events):
        at = int(fault["at"])
        horizon_end = int(events[i + 1]["at"]) if i + 1 < len(events) else soak_end
        degraded = []
        for s in range(at, horizon_end - WINDOW + 1):
            possible = min(ready.get(s, 0), budget * WINDOW)
            done = sum(per_second.get(s + k, 0) for k in range(WINDOW))
            if possible >= MIN_POSSIBLE and done < RECOVERY_SHARE * possible:
                degraded.append(s)
        gap = longest = 0
        for s in range(at, horizon_end):
            gap = gap + 1 if per_second.get(s, 0) == 0 else 0
            longest = max(longest, gap)
        recovery = degraded[-1] + 1 - at if degraded else 0
        held = [fate[i] for i in fault.get("held") or [] if i in fate]
        out.append(
            fault
            | {
                "held_done_after_s": max((f[3] - fault["at"] for f in held if f[3]), default=None),
                "held_statuses": dict(Counter(f[1] for f in held)),
                "at_s": fault["at"] - t0,
                "longest_stall_s": longest,
                "degraded_s": len(degraded),
                "recovery_s": recovery,
                # A full window of healthy service seen before the next fault.
                "recovered": at + recovery + WINDOW <= horizon_end,
                "horizon_s": horizon_end - at,
            }
        )
    return out


def _check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": passed, "detail": detail}


def checks(raw: dict[str, Any], mem: dict[str, Any], faults: list[dict[str, Any]]) -> list[Any]:
    db, produced = raw["db"], raw["produced"]
    bound = raw["settings"]["connection_bound_per_process"]
    processes = raw["settings"]["processes"]
    in_db = {int(job): int(n) for job, n in db["items_per_job"]}
    wanted = {int(job): int(n) for job, n in produced["jobs"].items()}
    missing = {j: n for j, n in wanted.items() if in_db.get(j) != n}
    extra = set(in_db) - set(wanted)
    open_items = {s: int(n) for s, n in db["open_items"]}
    samples = raw["samples"]
    over = [s for s in samples if s["worker_connections"] > s["live_workers"] * bound]
    drained = [s for s in samples if s["phase"] == "drained"]
    stopped = [s for s in samples if s["phase"] == "stopped"]
    final = drained[-1]["worker_connections"] if drained else -1
    after = stopped[-1]["worker_connections"] if stopped else -1
    sigterm = [life for life in raw["lives"] if life["how_ended"].startswith("sigterm")]
    bad_exit = [(x["pid"], x["how_ended"], x["exit_code"]) for x in sigterm if x["exit_code"]]
    crashed = [(x["pid"], x["exit_code"]) for x in raw["lives"] if x["how_ended"] == "crashed"]
    survivor = mem["survivor"]
    not_recovered = [f"{f['number']} ({f['kind']})" for f in faults if not f["recovered"]]
    good_failed = db["good_failed"]
    kills = [f for f in faults if f["kind"] == "kill"]
    held = sum(len(f["held"] or []) for f in kills)
    redone = sum(
        n
        for f in kills
        for status, n in f["held_statuses"].items()
        if status in ("COMPLETED", "FAILED")
    )
    late = [f["held_done_after_s"] for f in kills if f["held_done_after_s"] is not None]
    return [
        _check(
            "nothing lost",
            not missing and not extra and sum(in_db.values()) == produced["items"],
            f"{produced['items']:,} items submitted in {len(wanted):,} jobs; in the table "
            f"{sum(in_db.values()):,} in {len(in_db):,} jobs; {len(missing)} job(s) short, "
            f"{len(extra)} unknown",
        ),
        _check(
            "nothing left open",
            not open_items,
            f"PENDING {open_items.get('PENDING', 0)}, PROCESSING "
            f"{open_items.get('PROCESSING', 0)} after the drain",
        ),
        _check(
            "every FAILED item has a reason",
            not db["failed_without_reason"],
            f"{len(db['failed_without_reason'])} FAILED item(s) with an empty error",
        ),
        _check(
            "only the bad items FAILED",
            not good_failed and not db["bad_not_failed"],
            f"{len(good_failed)} good item(s) FAILED, {len(db['bad_not_failed'])} bad item(s) "
            "not FAILED"
            + "".join(f"; item {r[0]} ({r[2]}, {r[3]} attempts): {r[4]}" for r in good_failed[:5]),
        ),
        _check(
            "every COMPLETED item has its result",
            not db["completed_without_result"][0][0],
            f"{db['completed_without_result'][0][0]} without a result",
        ),
        _check(
            "every job is final",
            not db["jobs_not_final"],
            f"{len(db['jobs_not_final'])} job(s) not COMPLETED / COMPLETED_WITH_ERRORS as "
            "their items say" + "".join(f"; job {r[0]}: {r[1]}" for r in db["jobs_not_final"][:5]),
        ),
        _check(
            "a killed worker's items were done again",
            redone == held and all(t > 0 for t in late),
            f"{held} item(s) in flight in {len(kills)} killed worker(s); {redone} finished "
            f"afterwards, the last {max(late, default=0):.1f} s after its kill "
            f"(lease {raw['settings']['worker_env']['LEASE_SECONDS']} s)",
        ),
        _check(
            "no worker crashed",
            not crashed,
            f"{len(crashed)} exited unasked" + "".join(f"; pid {p} exit {c}" for p, c in crashed),
        ),
        _check(
            "SIGTERM: every worker exited 0",
            bool(sigterm) and not bad_exit,
            f"{len(sigterm)} SIGTERMed (deploys and the end), "
            + (", ".join(f"pid {p} {h}: exit {c}" for p, h, c in bad_exit) or "all exit 0"),
        ),
        _check(
            "connections within the fleet's bound",
            not over and 0 <= final <= processes * bound and after == 0,
            f"max {max((s['worker_connections'] for s in samples), default=0)} "
            f"(bound {bound} a live process: {len(over)} sample(s) over); settled after the "
            f"drain {final} (bound {processes * bound}); after the stop {after}",
        ),
        _check(
            "memory flat",
            survivor is not None
            and survivor["slope_mb_per_min"] <= MAX_SLOPE_MB_PER_MIN
            and survivor["rss_last_minute"] - survivor["rss_first_minute"] <= MAX_GROWTH_MB,
            "no worker lived through the run"
            if survivor is None
            else f"pid {survivor['pid']}: first minute {survivor['rss_first_minute']:.1f} MB, "
            f"last minute {survivor['rss_last_minute']:.1f} MB, slope after its first minute "
            f"{survivor['slope_mb_per_min']:+.2f} MB/min (limits: {MAX_GROWTH_MB:.0f} MB, "
            f"{MAX_SLOPE_MB_PER_MIN} MB/min)",
        ),
        _check(
            "completions resumed after every fault",
            bool(faults) and not not_recovered,
            f"{len(faults)} fault(s); slowest recovery "
            f"{max((f['recovery_s'] for f in faults), default=0)} s"
            + (f"; not recovered: {', '.join(not_recovered)}" if not_recovered else ""),
        ),
    ]


def analyse(raw: dict[str, Any]) -> dict[str, Any]:
    per_second = {int(s): int(n) for s, n in raw["db"]["completed_seconds"]}
    mem = memory(raw)
    faults = recoveries(raw, per_second)
    result = {k: v for k, v in raw.items() if k not in ("db", "lives", "faults")}
    result["produced"] = {k: v for k, v in raw["produced"].items() if k != "jobs"}
    result["produced"]["jobs"] = len(raw["produced"]["jobs"])
    result["checks"] = checks(raw, mem, faults)
    result["memory"] = mem
    result["faults"] = faults
    result["lives"] = [{k: v for k, v in life.items() if k != "rss"} for life in raw["lives"]]
    t0 = int(raw["t0"])
    result["completions_per_second"] = [[s - t0, n] for s, n in sorted(per_second.items())]
    result["backlog"] = [[round(t - raw["t0"], 1), r, p] for t, r, p in raw["backlog"]]
    db = raw["db"]
    result["db"] = {k: db[k] for k in ("failure_reasons", "attempts", "good_failed")}
    result["db"]["bad_not_failed"] = db["bad_not_failed"][:50]
    result["figures"] = figures(raw, per_second)
    return result


def figures(raw: dict[str, Any], per_second: dict[int, int]) -> dict[str, Any]:
    marks, stub, samples = raw["marks"], raw["stub"], raw["samples"]
    soak_seconds = marks["drain"] - raw["t0"]
    in_soak = sum(n for s, n in per_second.items() if raw["t0"] <= s < marks["drain"])
    last = samples[-1]["counts"] if samples else {}
    injected = raw["injected_429s"]
    return {
        "completed": last.get("COMPLETED", 0),
        "failed": last.get("FAILED", 0),
        "soak_seconds": soak_seconds,
        "drain_seconds": marks["drained"] - marks["drain"],
        "completed_in_soak_per_minute": in_soak / soak_seconds * 60,
        "submitted_per_minute": raw["produced"]["items"] / soak_seconds * 60,
        "connections_max": max((s["worker_connections"] for s in samples), default=0),
        "connections_all_max": max((sum(s["connections"].values()) for s in samples), default=0),
        "stub_requests": stub["requests_total"],
        "stub_completed": stub["completed_total"],
        "stub_429s": stub["rate_limited_total"],
        "stub_429s_injected": injected,
        "stub_429s_from_the_budget": stub["rate_limited_total"] - injected,
        "stub_errors_injected": stub["errors_injected_total"],
        "stub_max_requests_in_any_60s": stub["max_requests_in_any_window"],
        "calls_per_completed_item": stub["completed_total"] / max(1, last.get("COMPLETED", 0)),
    }
