"""KV-local page pools: which page ids a row may hold. Pure, no I/O.

With data parallelism the KV cache's page axis is sharded like the rows (EasyDeL eSurge's
"DP-local" pages): shard ``s`` owns global page ids ``[s * P, (s + 1) * P)``, and a row may
only point at pages of its own shard, or the attention kernel would read another host's
memory. A row that moves to another shard therefore needs new pages in the target pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PagePools:
    """``pages_per_shard`` page ids per shard, for ``num_shards`` shards of
    ``rows_per_shard`` rows each.

    Example::

      pools = PagePools(num_shards=4, rows_per_shard=256, pages_per_shard=1000)
      pools.pool_of_row(300)     # range(1000, 2000): row 300 lives on shard 1
    """

    num_shards: int
    rows_per_shard: int
    pages_per_shard: int

    def __post_init__(self) -> None:
        for name in ("num_shards", "rows_per_shard", "pages_per_shard"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_pages > 2**31:
            raise ValueError(
                f"pages_per_shard={self.pages_per_shard} x {self.num_shards} shards = "
                f"{self.num_pages} page ids do not fit int32 page tables"
            )

    @property
    def num_pages(self) -> int:
        """Global page ids in all pools together."""
        return self.num_shards * self.pages_per_shard

    def shard_of_row(self, row: int) -> int:
        return row // self.rows_per_shard

    def pool(self, shard: int) -> range:
        """Global page ids owned by ``shard``."""
        return range(shard * self.pages_per_shard, (shard + 1) * self.pages_per_shard)

    def pool_of_row(self, row: int) -> range:
        return self.pool(self.shard_of_row(row))

    def foreign_page(self, row: int, pages: Sequence[int] | np.ndarray) -> int | None:
        """The first of ``pages`` (already validated ids) outside row ``row``'s pool."""
        pool = self.pool_of_row(row)
        if isinstance(pages, np.ndarray):
            bad = (pages < pool.start) | (pages >= pool.stop)
            return int(pages[bad.argmax()]) if bad.any() else None
        for page in pages:
            if not pool.start <= page < pool.stop:
                return int(page)
        return None

    def check(self, row: int, pages: Sequence[int] | np.ndarray, group: int | None = None) -> None:
        """Refuse ``pages`` for ``row`` unless every one lies in the row's pool."""
        page = self.foreign_page(row, pages)
        if page is not None:
            shard, pool = self.shard_of_row(row), self.pool_of_row(row)
            where = f" (group {group})" if group is not None else ""
            raise ValueError(
                f"page {page}{where} is not in row {row}'s pool: row {row} lives on shard "
                f"{shard}, whose pages are [{pool.start}, {pool.stop}); page {page} belongs to "
                f"shard {page // self.pages_per_shard}"
            )

    def crosses(self, a: int, b: int) -> bool:
        """True when rows ``a`` and ``b`` live on different shards (their pages cannot be
        shared)."""
        return self.shard_of_row(a) != self.shard_of_row(b)
