"""Routing math: which shard and device block hold a global row. Pure, no I/O.

Rows are split into ``num_blocks`` equal contiguous blocks along the mesh's row axis, and
shard ``s`` owns the ``num_blocks // num_shards`` consecutive blocks starting at
``s * blocks_per_shard``; so shard ``s`` owns global rows
``[s * rows_per_shard, (s + 1) * rows_per_shard)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _nearest_multiple(value: int, unit: int) -> int:
    return max(unit, round(value / unit) * unit)


@dataclass(frozen=True)
class ShardLayout:
    """How ``max_num_reqs`` rows split over ``num_blocks`` device blocks and ``num_shards``.

    Args:
      max_num_reqs: global rows.
      num_shards: shard processes (or in-process shards).
      num_blocks: size of the mesh's row axis (device blocks of rows).

    Example::

      layout = ShardLayout(1024, num_shards=4, num_blocks=8)
      layout.locate(300)        # (1, 44): shard 1, its local row 44
    """

    max_num_reqs: int
    num_shards: int
    num_blocks: int

    def __post_init__(self) -> None:
        for name in ("max_num_reqs", "num_shards", "num_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_blocks % self.num_shards:
            raise ValueError(
                f"num_shards={self.num_shards} must divide the {self.num_blocks} device blocks "
                f"of the row axis; try num_shards in "
                f"{[d for d in range(1, self.num_blocks + 1) if self.num_blocks % d == 0]}"
            )
        if self.max_num_reqs % self.num_blocks:
            raise ValueError(
                f"max_num_reqs={self.max_num_reqs} does not divide evenly over the "
                f"{self.num_blocks} devices of the row axis; use a multiple of "
                f"{self.num_blocks} such as {_nearest_multiple(self.max_num_reqs, self.num_blocks)}"
            )

    @property
    def rows_per_block(self) -> int:
        return self.max_num_reqs // self.num_blocks

    @property
    def blocks_per_shard(self) -> int:
        return self.num_blocks // self.num_shards

    @property
    def rows_per_shard(self) -> int:
        return self.max_num_reqs // self.num_shards

    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.max_num_reqs:
            raise IndexError(
                f"row {row} is out of range: valid rows are 0..{self.max_num_reqs - 1}"
            )

    def shard_of(self, row: int) -> int:
        """Shard that owns global ``row``."""
        self._check_row(row)
        return row // self.rows_per_shard

    def locate(self, row: int) -> tuple[int, int]:
        """Global ``row`` -> ``(shard, local row)``."""
        self._check_row(row)
        return divmod(row, self.rows_per_shard)

    def global_row(self, shard: int, local_row: int) -> int:
        """``(shard, local row)`` -> global row."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} is out of range: valid 0..{self.num_shards - 1}")
        if not 0 <= local_row < self.rows_per_shard:
            raise IndexError(
                f"local row {local_row} is out of range: valid 0..{self.rows_per_shard - 1}"
            )
        return shard * self.rows_per_shard + local_row

    def shard_rows(self, shard: int) -> range:
        """Global rows owned by ``shard``."""
        start = self.global_row(shard, 0)
        return range(start, start + self.rows_per_shard)

    def block_of(self, row: int) -> int:
        """Device block (index along the row axis) holding global ``row``."""
        self._check_row(row)
        return row // self.rows_per_block

    def shard_blocks(self, shard: int) -> range:
        """Device blocks (indices along the row axis) owned by ``shard``."""
        start = self.global_row(shard, 0) // self.rows_per_block
        return range(start, start + self.blocks_per_shard)

    def shard_of_block(self, block: int) -> int:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} is out of range: valid 0..{self.num_blocks - 1}")
        return block // self.blocks_per_shard

    @property
    def bounds(self) -> np.ndarray:
        """``i64[num_shards + 1]``: the first global row of each shard, then ``max_num_reqs``."""
        return np.arange(self.num_shards + 1, dtype=np.int64) * self.rows_per_shard

    def split_sorted(self, rows: np.ndarray) -> list[np.ndarray]:
        """Split sorted global ``rows`` into one array per shard (views, in shard order)."""
        return np.split(rows, np.searchsorted(rows, self.bounds[1:-1]))
