"""The store policy end to end: `python -m listener worker` processes (1, or 4 sharing one budget)
against the stub at 450 RPM, for priority, weights, caps and pause. Part of `bench.store_policy`.

Times are Unix seconds on one clock: the database's `claimed_at` and this process's time.time()
(same host). An item "starts" when it is claimed: a worker holds its limiter slot before it
claims, and calls OpenAI at once.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg

from bench.common import (
    add_backlog,
    jain,
    query,
    scratch_database,
    spawn_worker,
    sql,
    stop_processes,
    stub_process,
    summary,
    wait_workers_ready,
)

RPM = 450
SLOT = 60 / RPM
CONCURRENCY = 16


@contextlib.contextmanager
def fleet(
    name: str,
    processes: int,
    backlog: dict[str, int],
    policies: dict[str, dict[str, Any]],
    latency: float = 0.3,
) -> Iterator[str]:
    """A scratch database with `backlog` and `policies`, the stub, and `processes` workers."""
    with scratch_database(name) as url, stub_process(RPM, latency) as stub:
        with psycopg.connect(url, autocommit=True) as conn:
            for store, policy in policies.items():
                values = {"weight": 1, "rpm_limit": None, "max_in_flight": None, "paused": False}
                conn.execute(sql("queries")["set_policy"], {"store": store, **values, **policy})
            add_backlog(conn, list(backlog), list(backlog.values()))
        env = {"RATE_LIMIT_RPM": str(RPM), "WORKER_CONCURRENCY": str(CONCURRENCY)}
        procs = [spawn_worker(url, stub.base_url, **env) for _ in range(processes)]
        try:
            wait_workers_ready(url, procs)
            yield url
        finally:
            stop_processes(procs)


def starts(url: str) -> list[tuple[str, float]]:
    return [(str(store), float(at)) for store, at in query(url, "starts")]


def one(url: str, block: str, params: dict[str, Any]) -> Any:
    rows = query(url, block, params)
    return rows[0][0] if rows else None


# -- 1. priority ------------------------------------------------------------------------------


def priority(processes: int, trials: int, bar: Any) -> dict[str, Any]:
    """Store A: 10,000 items at 0; 9 other stores backlogged. A's click at priority 10: how long
    until it is claimed, and each store's share of the starts meanwhile."""
    others = [f"other-{n}" for n in range(9)]
    backlog = {"A": 10_000, **dict.fromkeys(others, 2_000)}
    latencies: list[float] = []
    task = bar.add_task(f"priority, {processes} process(es)", total=trials)
    with fleet(f"policy_priority_{processes}", processes, backlog, {}) as url:
        time.sleep(3)  # the budget in full swing first
        began = time.time()
        for trial in range(trials):
            item = one(
                url,
                "add_priority_item",
                {"store": "A", "priority": 10, "product": f"click-{trial}"},
            )
            committed = time.time()
            while (claimed := one(url, "claimed_at", {"id": item})) is None:
                time.sleep(0.01)
            latencies.append(claimed - committed)
            bar.advance(task)
            time.sleep(random.uniform(0.3, 0.8))
        ended = time.time()
        window = [store for store, at in starts(url) if began <= at < ended]
    bar.remove_task(task)
    shares = Counter(window)
    counts = [shares.get(store, 0) for store in backlog]
    bound = len(others) * SLOT + 0.05  # backlogged stores / A's weight, in slots, + 50 ms
    return {
        "processes": processes,
        "trials": trials,
        "latency": summary(latencies),
        "bound_seconds": bound,
        "within_bound": sum(1 for x in latencies if x <= bound),
        "starts_per_store": dict(zip(backlog, counts, strict=True)),
        "jain": jain(counts),
        # Behind its own 10,000 at its round-robin share of the budget (45 a minute).
        "without_priority_hours": 10_000 / (RPM / len(backlog)) / 60,
    }


# -- 2. weights -------------------------------------------------------------------------------


WEIGHTS = [1, 1, 2, 2, 4, 4, 8, 8]


def weights(processes: int, seconds: float, bar: Any) -> dict[str, Any]:
    """8 stores, weights 1 1 2 2 4 4 8 8: shares while all have work; the weight-8 stores run
    dry about half-way, and the others take their part at once. Meanwhile new stores arrive."""
    stores = [f"w{w}-{i % 2}" for i, w in enumerate(WEIGHTS)]
    total = sum(WEIGHTS)
    dry_at = seconds * 0.5
    backlog = {
        s: int(RPM * w / total * dry_at / 60) if w == 8 else RPM * 2
        for s, w in zip(stores, WEIGHTS, strict=True)
    }
    policies = {s: {"weight": w} for s, w in zip(stores, WEIGHTS, strict=True)}
    newcomers: list[float] = []
    task = bar.add_task(f"weights, {processes} process(es)", total=int(seconds))
    with fleet(f"policy_weights_{processes}", processes, backlog, policies) as url:
        began = time.time()
        arrivals = [seconds * f for f in (0.2, 0.3, 0.7, 0.8)]
        while (elapsed := time.time() - began) < seconds:
            if arrivals and elapsed >= arrivals[0]:
                arrivals.pop(0)
                store = f"new-{len(newcomers)}"
                with psycopg.connect(url, autocommit=True) as conn:
                    add_backlog(conn, [store], 1)
                committed = time.time()
                while (first := one(url, "last_claimed", {"store": store})) is None:
                    time.sleep(0.005)
                newcomers.append(first - committed)
            bar.update(task, completed=int(elapsed))
            time.sleep(0.1)
        rows = [(s, t - began) for s, t in starts(url) if began <= t < began + seconds]
    bar.remove_task(task)
    dried = min(
        (max(t for s2, t in rows if s2 == s) for s in stores if WEIGHTS[stores.index(s)] == 8),
        default=seconds,
    )
    shared = [(s, t) for s, t in rows if t < dried and not s.startswith("new-")]
    counts = Counter(s for s, _t in shared)
    share_rows = []
    for store, weight in zip(stores, WEIGHTS, strict=True):
        expected = len(shared) * weight / total
        share_rows.append(
            {
                "store": store,
                "weight": weight,
                "items": counts.get(store, 0),
                "expected": expected,
                "deviation": (counts.get(store, 0) - expected) / expected if expected else 0.0,
            }
        )
    after = [t for _s, t in rows if t >= dried + 2]
    use_after = len(after) / max(1e-9, seconds - dried - 2) * 60 / RPM if after else float("nan")
    return {
        "processes": processes,
        "seconds": seconds,
        "phase_with_all_seconds": dried,
        "shares": share_rows,
        "within_10_percent": all(
            abs(r["items"] - r["expected"]) <= max(0.1 * r["expected"], 2) for r in share_rows
        ),
        "jain_per_weight": jain([r["items"] / r["weight"] for r in share_rows]),
        "budget_use_after_dry": use_after,
        "budget_use": len(rows) / seconds * 60 / RPM,
        "newcomer_first_start": summary(newcomers),
    }


# -- 3. caps ----------------------------------------------------------------------------------


def caps(processes: int, seconds: float, bar: Any) -> dict[str, Any]:
    """`rpm-capped` (weight 4, rpm_limit 60) and `inflight-capped` (weight 4, max_in_flight 3)
    next to 4 stores of weight 1, calls of 1.5 s: both caps bind (their shares would be 150 a
    minute), and what they cannot use goes to the others."""
    latency = 1.5
    others = [f"other-{n}" for n in range(4)]
    backlog = {"rpm-capped": 1000, "inflight-capped": 1000, **dict.fromkeys(others, 1000)}
    policies = {
        "rpm-capped": {"weight": 4, "rpm_limit": 60},
        "inflight-capped": {"weight": 4, "max_in_flight": 3},
    }
    in_flight: list[int] = []
    task = bar.add_task(f"caps, {processes} process(es)", total=int(seconds))
    with fleet(f"policy_caps_{processes}", processes, backlog, policies, latency) as url:
        done = threading.Event()

        def sample() -> None:
            with psycopg.connect(url, autocommit=True) as conn:
                while not done.wait(0.1):
                    row = conn.execute(sql("queries")["in_flight"], {"store": "inflight-capped"})
                    in_flight.append(int(row.fetchone()[0]))  # type: ignore[index]

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        began = time.time()
        while (elapsed := time.time() - began) < seconds:
            bar.update(task, completed=int(elapsed))
            time.sleep(0.5)
        done.set()
        sampler.join()
        rows = [(s, t - began) for s, t in starts(url) if began <= t < began + seconds]
    bar.remove_task(task)
    capped = sorted(t for s, t in rows if s == "rpm-capped")
    windows = sliding_counts(capped, seconds, 60.0)
    warm = [t for _s, t in rows if t >= 5]
    return {
        "processes": processes,
        "seconds": seconds,
        "rpm_limit": 60,
        "max_in_any_60s": max(windows, default=len(capped)),
        "min_in_full_60s": min(windows, default=len(capped)),
        "per_60s_series": windows,
        "rpm_capped_per_minute": len(capped) / seconds * 60,
        "max_in_flight": 3,
        "in_flight_max_sampled": max(in_flight, default=0),
        "in_flight_samples": len(in_flight),
        "inflight_capped_per_minute": sum(1 for s, _t in rows if s == "inflight-capped")
        / seconds
        * 60,
        "budget_use": len(warm) / (seconds - 5) * 60 / RPM,
    }


def sliding_counts(times: Sequence[float], seconds: float, window: float) -> list[int]:
    """Items in [t, t + window) for t every second while the window fits in the run; also at
    each item's own time (where a window's count peaks)."""
    counts = []
    starts_at = [float(t) for t in range(int(seconds - window) + 1)]
    starts_at += [t for t in times if t + window <= seconds]
    for t in sorted(starts_at):
        counts.append(sum(1 for x in times if t <= x < t + window))
    return counts


# -- 4. pause ---------------------------------------------------------------------------------


def pause(processes: int, trials: int, bar: Any) -> dict[str, Any]:
    """Pause `paused` (SQL UPDATE) while 5 other stores keep the budget busy: its last start
    after the pause's commit; then resume: its first start after the commit."""
    others = [f"other-{n}" for n in range(5)]
    backlog = {"paused": 3000, **dict.fromkeys(others, 3000)}
    policies = {"paused": {"weight": 1}}
    stop_lags: list[float] = []
    resume_lags: list[float] = []
    task = bar.add_task(f"pause, {processes} process(es)", total=trials)
    with fleet(f"policy_pause_{processes}", processes, backlog, policies) as url:
        time.sleep(3)
        began = time.time()
        for _trial in range(trials):
            paused_at = one(url, "pause", {"store": "paused", "paused": True})
            time.sleep(2.0)
            last = one(url, "last_claimed", {"store": "paused"})
            stop_lags.append(max(0.0, last - paused_at))
            resumed_at = one(url, "pause", {"store": "paused", "paused": False})
            while (
                first := one(url, "first_claimed_after", {"store": "paused", "after": resumed_at})
            ) is None:
                time.sleep(0.01)
            resume_lags.append(first - resumed_at)
            bar.advance(task)
            time.sleep(1.0)
        ended = time.time()
        rows = [t for _s, t in starts(url) if began <= t < ended]
    bar.remove_task(task)
    return {
        "processes": processes,
        "trials": trials,
        "last_start_after_pause": summary(stop_lags),
        "first_start_after_resume": summary(resume_lags),
        "budget_use": len(rows) / (ended - began) * 60 / RPM,
    }
