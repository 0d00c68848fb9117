"""The soak's report as markdown and its plot: RSS, connections, completions and the backlog over
time, with the faults marked."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import matplotlib.pyplot as plt

from bench.common import markdown_table, save_figure
from bench.soak_report import MAX_GROWTH_MB, MAX_SLOPE_MB_PER_MIN, WARM_UP_SECONDS, WINDOW


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "**FAIL**"


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _held(fault: dict[str, Any]) -> str:
    if not fault.get("held"):
        return ""
    after = fault["held_done_after_s"]
    return f"; those items done again within {after:.1f} s" if after is not None else ""


def markdown(result: dict[str, Any]) -> str:
    s, fig = result["settings"], result["figures"]
    failed = [c for c in result["checks"] if not c["passed"]]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    env = s["worker_env"]
    out = [
        "# Soak",
        "",
        f"`python -m bench.soak --minutes {s['minutes']:g}"
        + (f" --fault-every {s['fault_every']:g}`" if s["fault_every"] != 60 else "`")
        + f", {stamp}, {result['took_seconds'] / 60:.1f} min on this machine (2 cores, shared).",
        "",
        f"**Verdict: {'FAIL' if failed else 'PASS'}** "
        f"({len(result['checks']) - len(failed)} of {len(result['checks'])} checks pass)",
        "",
        markdown_table(
            ["check", "verdict", "figures"],
            [[c["name"], _verdict(c["passed"]), c["detail"]] for c in result["checks"]],
        ),
        "",
        "## Figures",
        "",
        markdown_table(
            ["", "value"],
            [
                [
                    "items submitted",
                    f"{result['produced']['items']:,} in "
                    f"{result['produced']['jobs']:,} jobs "
                    f"({fig['submitted_per_minute']:.0f}/min)",
                ],
                [
                    "bad items submitted",
                    ", ".join(
                        f"{n} {kind}" for kind, n in sorted(result["produced"]["bad"].items())
                    ),
                ],
                ["items COMPLETED / FAILED", f"{fig['completed']:,} / {fig['failed']:,}"],
                [
                    "throughput during the soak",
                    f"{fig['completed_in_soak_per_minute']:.0f} "
                    f"items/min (budget {env['RATE_LIMIT_RPM']} RPM, the stub's {s['stub_rpm']})",
                ],
                ["drain after the producer stopped", f"{fig['drain_seconds']:.0f} s"],
                [
                    "workers' connections, max",
                    f"{fig['connections_max']} (bound "
                    f"{s['connection_bound_per_process']} a process: {s['processes']} processes "
                    f"x (DB_POOL_MAX {env['DB_POOL_MAX']} + 1 listener), 3 during a deploy)",
                ],
                ["all connections to the database, max", str(fig["connections_all_max"])],
                [
                    "stub: requests / completions",
                    f"{fig['stub_requests']:,} / "
                    f"{fig['stub_completed']:,} "
                    f"({fig['calls_per_completed_item']:.3f} completions per COMPLETED item)",
                ],
                [
                    "stub: 429s",
                    f"{fig['stub_429s']} ({fig['stub_429s_injected']} injected, "
                    f"{fig['stub_429s_from_the_budget']} from the budget); "
                    f"{fig['stub_429s'] / max(1, fig['stub_requests']) * 100:.2f} % of requests",
                ],
                ["stub: other injected errors", str(fig["stub_errors_injected"])],
                [
                    "stub: busiest 60 s",
                    f"{fig['stub_max_requests_in_any_60s']} requests (limit {s['stub_rpm']})",
                ],
                [
                    "producer's connection lost",
                    f"{len(result['produced']['errors'])} time(s); "
                    f"{result['produced']['unsure_ticks']} commit(s) checked in the table",
                ],
            ],
        ),
        "",
        "## Faults",
        "",
        f"Until the next fault: stall, the longest run of seconds without a completion; "
        f"degraded, the seconds after which the fleet did less than half of the ready work (at "
        f"most the budget's {WINDOW} s worth) in {WINDOW} s; recovery, from the fault to the end "
        f"of the last degraded second (0: never degraded). Recovered: a full {WINDOW} s of "
        "healthy service before the next fault.",
        "",
        markdown_table(
            ["#", "at", "fault", "what", "stall", "degraded", "recovery", "recovered"],
            [
                [
                    f["number"],
                    _clock(f["at_s"]),
                    f["kind"],
                    f["detail"] + _held(f),
                    f"{f['longest_stall_s']} s",
                    f"{f['degraded_s']} s",
                    f"{f['recovery_s']} s",
                    _verdict(f["recovered"]),
                ]
                for f in result["faults"]
            ],
        ),
        "",
        "## Memory (RSS) per worker process",
        "",
        f"Limits for the process that lived through the run: slope after its first minute "
        f"<= {MAX_SLOPE_MB_PER_MIN} MB/min, last minute - first minute <= {MAX_GROWTH_MB:.0f} MB.",
        "",
        markdown_table(
            [
                "slot",
                "pid",
                "lived",
                "ended",
                "RSS at start",
                "first min",
                "last min",
                "max",
                "slope after 1 min",
            ],
            [
                [
                    m["slot"],
                    m["pid"],
                    f"{_clock(max(0, m['from']))}-{_clock(m['to'])}",
                    f"{m['how_ended']} (exit {m['exit_code']})",
                    f"{m['rss_start']:.1f} MB",
                    f"{m['rss_first_minute']:.1f} MB",
                    f"{m['rss_last_minute']:.1f} MB",
                    f"{m['rss_max']:.1f} MB",
                    f"{m['slope_mb_per_min']:+.2f} MB/min",
                ]
                for m in result["memory"]["lives"]
            ],
        ),
        "",
        "## Why the FAILED items failed",
        "",
        markdown_table(
            ["kind of payload", "error", "items"],
            [[k, e, n] for k, e, n in result["db"]["failure_reasons"]],
        ),
        "",
        "## Worker logs",
        "",
        f"In `{result['worker_logs_dir']}` (not kept in the repository).",
        "",
        markdown_table(
            ["pid", "lines", "errors / tracebacks", *result["worker_logs"][0]["counts"]],
            [
                [w["pid"], w["lines"], w["notable_total"], *w["counts"].values()]
                for w in result["worker_logs"]
            ],
        ),
        "",
    ]
    notable = [line for w in result["worker_logs"] for line in w["notable"]]
    if notable:
        out += ["Error lines (first 20):", "", "```", *notable[:20], "```", ""]
    out += [
        "## Setup",
        "",
        f"Stub `--rpm {s['stub_rpm']} --latency {s['stub_latency']}`; {s['processes']} × "
        "`python -m listener worker` with "
        + ", ".join(f"`{k}={v}`" for k, v in env.items())
        + f"; producer ~{s['producer_rate']:.1f} items/s (seed {s['seed']}): every second new "
        "stores with 1-5 items, sometimes one of 20 regular stores with 10-40, now and then one "
        "with 150-300; 1.5 % of the items have a NULL payload, a JSON array, or no name. A fault "
        f"every {s['fault_every']:g} s in the cycle kill, db_restart, 429_storm, 5xx_burst, "
        "malformed, hung, deploy; kills and deploys hit slot 1 so that slot 0 lives through the "
        "run.",
        "",
        "![soak](soak.png)",
        "",
    ]
    return "\n".join(out)


def plot(result: dict[str, Any], name: str) -> None:
    t0 = result["t0"]
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), dpi=110, sharex=True)
    rss_ax, conn_ax, rate_ax, open_ax = axes
    for m in result["memory"]["lives"]:
        # From the end of its warm-up: a process still importing would squash the scale.
        warm = [(t, mb) for t, mb in m["series"] if t >= m["from"] + WARM_UP_SECONDS]
        label = f"slot {m['slot']} pid {m['pid']}"
        rss_ax.plot([t / 60 for t, _ in warm], [mb for _, mb in warm], label=label)
    rss_ax.set_ylabel("worker RSS (MB, zoomed)")
    rss_ax.legend(fontsize=7, loc="lower right", ncol=2)
    samples = result["samples"]
    xs = [(x["t"] - t0) / 60 for x in samples]
    bound = result["settings"]["connection_bound_per_process"]
    conn_ax.plot(xs, [x["worker_connections"] for x in samples], ".-", label="workers")
    conn_ax.plot(xs, [sum(x["connections"].values()) for x in samples], ":", label="all")
    conn_ax.step(
        xs,
        [x["live_workers"] * bound for x in samples],
        "k--",
        where="post",
        linewidth=1,
        label="bound (live processes x (pool + 1))",
    )
    conn_ax.set_ylabel("connections")
    conn_ax.legend(fontsize=7, loc="upper right")
    series = dict((int(s), n) for s, n in result["completions_per_second"])
    if series:
        seconds = range(min(series), max(series) + 1)
        smooth = [sum(series.get(s + k, 0) for k in range(WINDOW)) / WINDOW for s in seconds]
        rate_ax.plot(
            [s / 60 for s in seconds],
            [series.get(s, 0) for s in seconds],
            color="lightgrey",
            linewidth=0.6,
            label="per second",
        )
        rate_ax.plot([s / 60 for s in seconds], smooth, label=f"{WINDOW} s mean")
    rate_ax.set_ylabel("items completed / s")
    rate_ax.legend(fontsize=7, loc="upper right")
    open_ax.plot(
        [t / 60 for t, _r, _p in result["backlog"]],
        [r for _t, r, _p in result["backlog"]],
        linewidth=0.8,
        label="PENDING and due (each second)",
    )
    open_ax.plot(xs, [x["counts"].get("PENDING", 0) for x in samples], label="PENDING")
    open_ax.plot(xs, [x["counts"].get("PROCESSING", 0) for x in samples], label="PROCESSING")
    open_ax.set_ylabel("open items")
    open_ax.set_xlabel("minutes since the first item")
    open_ax.legend(fontsize=7, loc="upper right")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.axvline((result["marks"]["drain"] - t0) / 60, color="k", linewidth=1)
        for f in result["faults"]:
            ax.axvline(f["at_s"] / 60, color="red", linestyle="--", linewidth=0.8, alpha=0.7)
    for f in result["faults"]:
        rss_ax.annotate(
            f["kind"],
            ((f["at_s"]) / 60, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
            color="red",
        )
    rss_ax.annotate(
        "drain",
        ((result["marks"]["drain"] - t0) / 60, 1.0),
        xycoords=("data", "axes fraction"),
        rotation=90,
        va="top",
        ha="right",
        fontsize=7,
    )
    failed = [c["name"] for c in result["checks"] if not c["passed"]]
    rss_ax.set_title(
        f"Soak, {result['settings']['minutes']:g} min: "
        + ("PASS" if not failed else "FAIL: " + ", ".join(failed)),
        fontsize=10,
    )
    save_figure(fig, name)
