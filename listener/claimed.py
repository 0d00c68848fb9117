"""What a claim brought: the checklist's log lines about it, and the order workers get it in."""

from __future__ import annotations

from collections import Counter, deque

from listener.items import ClaimedItem

MAX_STORE_LINES = 10


def store_label(store: str) -> str:
    return store if len(store) <= 12 else f"{store[:8]}..."


def claim_report(items: list[ClaimedItem], suffix: str = "") -> list[str]:
    """The checklist's log lines: a total, then one line per store (the busiest first)."""
    per_store = Counter(item.instance_id for item in items)
    lines = [
        f"[Worker] Claimed {len(items)} item(s) from {len(per_store)} store(s) "
        f"for processing{suffix}"
    ]
    for store, count in per_store.most_common(MAX_STORE_LINES):
        lines.append(f"  Store {store_label(store)}: {count} items")
    if len(per_store) > MAX_STORE_LINES:
        lines.append(f"  ... and {len(per_store) - MAX_STORE_LINES} more store(s)")
    return lines


def interleave(items: list[ClaimedItem]) -> list[ClaimedItem]:
    """One item of each store in turn, so consecutive workers serve different stores."""
    queues: dict[str, deque[ClaimedItem]] = {}
    for item in items:
        queues.setdefault(item.instance_id, deque()).append(item)
    ordered: list[ClaimedItem] = []
    while queues:
        for store in list(queues):
            ordered.append(queues[store].popleft())
            if not queues[store]:
                del queues[store]
    return ordered
