"""A check's outcome and the report's two forms (lines for a person, JSON for a platform): pure."""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


MARKS = {Status.OK: "✓", Status.WARN: "⚠", Status.FAIL: "✗"}


@dataclass
class Check:
    """One line of the report: `summary` is the figure, `remedy` what to do (for ⚠ and ✗),
    `lines` the detail shown under it, `data` the same for machines."""

    name: str
    status: Status
    summary: str
    remedy: str = ""
    lines: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def ok(name: str, summary: str, **data: Any) -> Check:
    return Check(name, Status.OK, summary, data=data)


def warn(name: str, summary: str, remedy: str, **data: Any) -> Check:
    return Check(name, Status.WARN, summary, remedy, data=data)


def fail(name: str, summary: str, remedy: str, **data: Any) -> Check:
    return Check(name, Status.FAIL, summary, remedy, data=data)


def worst(checks: Sequence[Check]) -> Status:
    statuses = {check.status for check in checks}
    for status in (Status.FAIL, Status.WARN):
        if status in statuses:
            return status
    return Status.OK


def exit_code(checks: Sequence[Check]) -> int:
    """1 when something failed; warnings alone pass (a platform's check must not flap on them)."""
    return 1 if worst(checks) is Status.FAIL else 0


def render_text(checks: Sequence[Check], seconds: float) -> list[str]:
    width = max((len(check.name) for check in checks), default=0)
    out = []
    for check in checks:
        out.append(f"{MARKS[check.status]} {check.name.ljust(width)}  {check.summary}")
        out.extend(f"  {' ' * width}  {line}" for line in check.lines)
        if check.remedy:
            out.append(f"  {' ' * width}  → {check.remedy}")
    counts = {status: sum(c.status is status for c in checks) for status in Status}
    out.append(
        f"{counts[Status.OK]} ok, {counts[Status.WARN]} warning(s), {counts[Status.FAIL]} failed"
        f" in {seconds:.2f}s"
    )
    return out


def render_json(checks: Sequence[Check], seconds: float) -> str:
    return json.dumps(
        {
            "status": worst(checks).value,
            "seconds": round(seconds, 3),
            "checks": [
                {
                    "name": check.name,
                    "status": check.status.value,
                    "summary": check.summary,
                    "remedy": check.remedy or None,
                    "details": check.lines,
                    "data": check.data,
                }
                for check in checks
            ],
        },
        indent=2,
        default=str,
    )
