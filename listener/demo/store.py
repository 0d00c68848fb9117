"""The demo's stores: who arrives when with how many products, and what the view shows of each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# One big store and many small ones: the old FIFO worker made every small one wait an hour.
BULK_STORE = "demo-mall"
STORES = {BULK_STORE: 2000, "demo-books": 40, "demo-tea": 10, "demo-bikes": 100}
STORES |= {"demo-lamps": 25, "demo-shoes": 60, "demo-toys": 15, "demo-garden": 80}
# The stores' jobs are of three kinds, through the one budget: descriptions, SEO metadata (a
# structured output) and translations.
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "demo-books": ("seo_meta", {"keywords": "gift, reading"}),
    "demo-bikes": ("translation", {"language": "French"}),
    "demo-shoes": ("seo_meta", {}),
    "demo-garden": ("translation", {"language": "German"}),
}


@dataclass
class Store:
    name: str
    products: int
    arrives_after: float  # seconds after the demo's start
    kind: str = "product_description"
    options: dict[str, Any] = field(default_factory=dict)
    # The bulk store's import runs on the batch tier (--bulk-tier): half the price, no budget.
    tier: str = "realtime"
    job_id: int | None = None
    committed: float | None = None  # monotonic, right after the job's transaction committed
    # Monotonic, when the handler started its first item (batch tier: when the demo first saw
    # its items in a Batch API batch).
    first_start: float | None = None
    completed: int = 0
    failed: int = 0
    took: float | None = None  # job created -> job completed, on the database's clock

    @property
    def latency(self) -> float | None:
        if self.committed is None or self.first_start is None:
            return None
        # The commit is stamped in the enqueue thread just after COMMIT returns: the worker,
        # woken by the NOTIFY, may beat the stamp by a fraction of a millisecond.
        return max(0.0, self.first_start - self.committed)


def plan(seconds: float, bulk_tier: str = "realtime") -> list[Store]:
    """The big store at once (on `bulk_tier`), the small ones evenly over the first third of
    the run."""
    spacing = seconds / 3 / (len(STORES) - 1)
    return [
        Store(
            name,
            n,
            i * spacing,
            *KINDS.get(name, ("product_description", {})),
            tier=bulk_tier if name == BULK_STORE else "realtime",
        )
        for i, (name, n) in enumerate(STORES.items())
    ]
