"""Store policy (issue 12) and items in backoff (issue 11, defect 5): `python -m bench.store_policy
[--quick] [--only claims|priority|weights|caps|pause]`.

- claims: claim cost with 50 % of a store's items in backoff against none, and with priorities
  in use at 10,000 against 100,000 (quick) or 1,000,000 pending; target within 1.5x;
- priority: a click at priority 10 in a store with 10,000 pending among 10 backlogged stores;
  target p99 within (backlogged stores / weight) slots + 50 ms, shares unchanged;
- weights: 8 stores of weights 1 1 2 2 4 4 8 8; each within +-10 % (or 2 items) of its share,
  Jain of items / weight >= 0.99, >= 98 % of the budget once the weight-8 stores run dry, new
  stores within one slot + 50 ms;
- caps: rpm_limit 60 never exceeded in any sliding 60 s window, at least 57 in each full one;
  max_in_flight 3 never exceeded (sampled every 100 ms); the rest of the budget used;
- pause: no start later than 1 s after the pause commits; resume starts within 1 s.

Each with 1 process and with 4 sharing one budget of 450 RPM (quick mode: caps with 4 processes
only; shorter runs, fewer trials; results labelled quick). Each scenario alone runs under 3
minutes in quick mode (`--only NAME`); all of them about 7.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench import policy_claims, policy_runs
from bench.common import (
    console,
    markdown_table,
    new_figure,
    progress,
    publish,
    save_figure,
    table,
    timed,
)

NAME = "store_policy"
SCENARIOS = ("claims", "priority", "weights", "caps", "pause")


def plan(quick: bool) -> dict[str, list[tuple[int, float]]]:
    """Per scenario: (processes, seconds or trials)."""
    if quick:
        return {
            "priority": [(1, 10), (4, 10)],
            "weights": [(1, 60.0), (4, 60.0)],
            "caps": [(4, 75.0)],
            "pause": [(1, 3), (4, 3)],
        }
    return {
        "priority": [(1, 40), (4, 40)],
        "weights": [(1, 240.0), (4, 240.0)],
        "caps": [(1, 180.0), (4, 180.0)],
        "pause": [(1, 10), (4, 10)],
    }


def run(quick: bool, only: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {"quick": quick, "rpm": policy_runs.RPM}
    runs = plan(quick)
    with progress() as bar:
        if "claims" in only:
            result["claims"] = {
                "backoff": policy_claims.backoff(quick, bar),
                "priorities": policy_claims.priorities(quick, bar),
            }
        for name, function in (
            ("priority", policy_runs.priority),
            ("weights", policy_runs.weights),
            ("caps", policy_runs.caps),
            ("pause", policy_runs.pause),
        ):
            if name in only:
                result[name] = [
                    function(p, int(n) if name in ("priority", "pause") else n, bar)
                    for p, n in runs[name]
                ]
    result["note"] = "quick mode: shorter runs, fewer trials, fewer process counts" if quick else ""
    return result


def _f(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def report(result: dict[str, Any]) -> str:
    parts = []
    if "claims" in result:
        b, p = result["claims"]["backoff"], result["claims"]["priorities"]
        headers = ["case", "claim p50 ms", "claim p99 ms", "vs baseline", "buffers"]
        rows = [
            [
                "no item in backoff",
                _f(b["none_in_backoff"]["p50_ms"]),
                _f(b["none_in_backoff"]["p99_ms"]),
                "1",
                str(b["none_in_backoff"]["buffers"]),
            ],
            [
                "50 % of each store's items in backoff",
                _f(b["half_in_backoff"]["p50_ms"]),
                _f(b["half_in_backoff"]["p99_ms"]),
                f"{b['ratio']:.2f}x",
                str(b["half_in_backoff"]["buffers"]),
            ],
        ]
        rows += [
            [
                f"priorities in use, {lvl['pending']:,} pending",
                _f(lvl["p50_ms"]),
                _f(lvl["p99_ms"]),
                f"{lvl['p50_ms'] / p['levels'][0]['p50_ms']:.2f}x",
                str(lvl["buffers"]),
            ]
            for lvl in p["levels"]
        ]
        table("Claim cost: 100 stores x 1 item (targets: within 1.5x)", headers, rows)
        parts.append(markdown_table(headers, rows))
    if "priority" in result:
        headers = [
            "processes",
            "trials",
            "click claimed p50",
            "p99",
            "max",
            "bound",
            "Jain of starts",
            "without priority",
        ]
        rows = [
            [
                str(r["processes"]),
                str(r["trials"]),
                f"{r['latency']['p50'] * 1000:.0f} ms",
                f"{r['latency']['p99'] * 1000:.0f} ms",
                f"{r['latency']['max'] * 1000:.0f} ms",
                f"{r['bound_seconds'] * 1000:.0f} ms",
                f"{r['jain']:.4f}",
                f"{r['without_priority_hours']:.1f} h",
            ]
            for r in result["priority"]
        ]
        table("Priority: a click in a store with 10,000 pending, 10 stores", headers, rows)
        parts.append(markdown_table(headers, rows))
    if "weights" in result:
        headers = ["processes", "store", "weight", "items", "expected", "deviation"]
        rows = []
        for r in result["weights"]:
            for s in r["shares"]:
                rows.append(
                    [
                        str(r["processes"]),
                        s["store"],
                        str(s["weight"]),
                        str(s["items"]),
                        f"{s['expected']:.1f}",
                        f"{100 * s['deviation']:+.1f} %",
                    ]
                )
        table("Weights 1 1 2 2 4 4 8 8, while every store has work", headers, rows)
        parts.append(markdown_table(headers, rows))
        headers = [
            "processes",
            "all busy for",
            "within +-10 %",
            "Jain items/weight",
            "budget use",
            "use after weight 8 ran dry",
            "new store p50",
            "new store max",
        ]
        rows = [
            [
                str(r["processes"]),
                f"{r['phase_with_all_seconds']:.0f} s",
                str(r["within_10_percent"]),
                f"{r['jain_per_weight']:.4f}",
                f"{100 * r['budget_use']:.1f} %",
                f"{100 * r['budget_use_after_dry']:.1f} %",
                f"{r['newcomer_first_start']['p50'] * 1000:.0f} ms",
                f"{r['newcomer_first_start']['max'] * 1000:.0f} ms",
            ]
            for r in result["weights"]
        ]
        table("Weights: summary", headers, rows)
        parts.append(markdown_table(headers, rows))
    if "caps" in result:
        headers = [
            "processes",
            "run",
            "rpm_limit 60: max in any 60 s",
            "min in a full 60 s",
            "max_in_flight 3: max sampled",
            "samples",
            "budget use",
        ]
        rows = [
            [
                str(r["processes"]),
                f"{r['seconds']:.0f} s",
                str(r["max_in_any_60s"]),
                str(r["min_in_full_60s"]),
                str(r["in_flight_max_sampled"]),
                str(r["in_flight_samples"]),
                f"{100 * r['budget_use']:.1f} %",
            ]
            for r in result["caps"]
        ]
        table("Caps, fleet-wide", headers, rows)
        parts.append(markdown_table(headers, rows))
    if "pause" in result:
        headers = [
            "processes",
            "trials",
            "last start after pause (max)",
            "first start after resume p50",
            "max",
            "budget use",
        ]
        rows = [
            [
                str(r["processes"]),
                str(r["trials"]),
                f"{r['last_start_after_pause']['max'] * 1000:.0f} ms",
                f"{r['first_start_after_resume']['p50'] * 1000:.0f} ms",
                f"{r['first_start_after_resume']['max'] * 1000:.0f} ms",
                f"{100 * r['budget_use']:.1f} %",
            ]
            for r in result["pause"]
        ]
        table("Pause and resume", headers, rows)
        parts.append(markdown_table(headers, rows))
    if result["quick"]:
        console.print(
            "[yellow]quick mode: shorter runs and fewer trials than the targets ask for[/yellow]"
        )
        parts.append("_Quick mode (`--quick`): shorter runs, fewer trials and process counts._")
    return "\n\n".join(parts) + "\n"


def plot(result: dict[str, Any]) -> None:
    if "weights" in result:
        fig, ax = new_figure()
        for r in result["weights"]:
            ax.scatter(
                [s["weight"] for s in r["shares"]],
                [s["items"] for s in r["shares"]],
                label=f"{r['processes']} process(es): items",
            )
            ax.plot(
                [s["weight"] for s in r["shares"]],
                [s["expected"] for s in r["shares"]],
                linestyle="--",
                label=f"{r['processes']} process(es): budget x w / sum w",
            )
        ax.set_xlabel("weight")
        ax.set_ylabel("items started while every store had work")
        ax.set_title("Share of the budget against weight")
        ax.legend(fontsize=8)
        save_figure(fig, f"{NAME}_weights")
    if "caps" in result:
        fig, ax = new_figure()
        for r in result["caps"]:
            ax.plot(
                r["per_60s_series"], marker=".", linestyle="", label=f"{r['processes']} process(es)"
            )
        ax.axhline(60, color="k", linestyle="--", linewidth=1, label="rpm_limit 60")
        ax.axhline(57, color="grey", linestyle=":", linewidth=1, label="57")
        ax.set_ylim(0, 80)
        ax.set_xlabel("sliding 60 s windows (every second, and at each start)")
        ax.set_ylabel("items of the capped store started in the window")
        ax.set_title("rpm_limit = 60, counted across every process")
        ax.legend(fontsize=8)
        save_figure(fig, f"{NAME}_caps")


def main(quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    chosen = only or list(SCENARIOS)
    name = NAME if only is None else f"{NAME}_{'_'.join(chosen)}"
    return publish(name, run(quick, chosen), report, plot)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller, each scenario under 3 min")
    parser.add_argument("--only", action="append", choices=SCENARIOS, help="one scenario (repeat)")
    args = parser.parse_args()
    timed(lambda quick: main(quick, args.only), args.quick)
