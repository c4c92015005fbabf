"""Routing math: which shard and device block hold a global row. Pure, no I/O.

Rows are split into ``num_blocks`` equal contiguous blocks along the mesh's row axis and
into ``num_shards`` equal contiguous runs, one per shard: shard ``s`` owns global rows
``[s * rows_per_shard, (s + 1) * rows_per_shard)``. Either count divides the other:

- ``num_blocks % num_shards == 0``: each shard owns ``num_blocks // num_shards`` whole
  blocks, on devices of its own (the only form a shard process of ``backend="ray"`` has);
- ``num_shards % num_blocks == 0``: ``num_shards // num_blocks`` shards share each block's
  devices, each still owning its own run of rows (in-process shards on fewer devices than
  shards, e.g. four shards on a one-device laptop).

``max_num_reqs`` here is the table's row *capacity*, a multiple of both counts;
:meth:`ShardLayout.fit` rounds any requested row count up to one (the table refuses rows
at or past the requested count, so the extra rows stay padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..constants import cdiv


def _nearest_multiple(value: int, unit: int) -> int:
    return max(unit, round(value / unit) * unit)


def check_shard_count(num_shards: int, num_blocks: int, *, share: bool = True) -> None:
    """Refuse ``num_shards`` for a row axis of ``num_blocks`` devices: one count must divide
    the other (with ``share=False``, the shards must divide the devices: every shard needs
    devices of its own). The message suggests counts that work."""
    if not num_blocks % num_shards:
        return
    if share and not num_shards % num_blocks:
        return
    fits = [d for d in range(1, num_blocks + 1) if num_blocks % d == 0]
    if share:
        raise ValueError(
            f"num_shards={num_shards} must divide the {num_blocks} device blocks of the row "
            f"axis, or be a multiple of {num_blocks} (shards sharing devices); try "
            f"num_shards in {fits} or {2 * num_blocks}, {3 * num_blocks}, ..."
        )
    raise ValueError(
        f"num_shards={num_shards} must divide the {num_blocks} device blocks of the row "
        f"axis (every shard needs devices of its own); try num_shards in {fits}"
    )


@dataclass(frozen=True)
class ShardLayout:
    """How ``max_num_reqs`` rows split over ``num_blocks`` device blocks and ``num_shards``.

    Args:
      max_num_reqs: global rows (the capacity; a multiple of both counts below).
      num_shards: shard processes (or in-process shards).
      num_blocks: size of the mesh's row axis (device blocks of rows).

    Example::

      layout = ShardLayout(1024, num_shards=4, num_blocks=8)
      layout.locate(300)        # (1, 44): shard 1, its local row 44
      ShardLayout.fit(3, num_shards=2, num_blocks=2).max_num_reqs   # 4
    """

    max_num_reqs: int
    num_shards: int
    num_blocks: int

    def __post_init__(self) -> None:
        for name in ("max_num_reqs", "num_shards", "num_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_shard_count(self.num_shards, self.num_blocks)
        unit = self.row_unit(self.num_shards, self.num_blocks)
        if self.max_num_reqs % unit:
            raise ValueError(
                f"max_num_reqs={self.max_num_reqs} does not divide evenly over the "
                f"{self.num_blocks} devices of the row axis and {self.num_shards} shards; use "
                f"a multiple of {unit} such as {_nearest_multiple(self.max_num_reqs, unit)} "
                "(or ShardLayout.fit, which rounds up)"
            )

    @staticmethod
    def row_unit(num_shards: int, num_blocks: int) -> int:
        """The row capacity of a layout is a multiple of this: every block and every shard
        holds the same number of rows."""
        return math.lcm(num_shards, num_blocks)

    @classmethod
    def fit(cls, num_rows: int, num_shards: int, num_blocks: int) -> ShardLayout:
        """The layout of the smallest capacity that holds ``num_rows`` rows: ``num_rows``
        rounded up to a multiple of :meth:`row_unit` (at most ``row_unit - 1`` extra rows)."""
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1:
            raise ValueError(f"max_num_reqs must be a positive int, got {num_rows!r}")
        check_shard_count(num_shards, num_blocks)
        unit = cls.row_unit(num_shards, num_blocks)
        return cls(cdiv(num_rows, unit) * unit, num_shards, num_blocks)

    @property
    def rows_per_block(self) -> int:
        return self.max_num_reqs // self.num_blocks

    @property
    def blocks_per_shard(self) -> int:
        """Device blocks a shard owns whole (1 when shards share a block)."""
        return max(1, self.num_blocks // self.num_shards)

    @property
    def shards_per_block(self) -> int:
        """Shards whose rows one device block holds (1 when every shard has its own)."""
        return max(1, self.num_shards // self.num_blocks)

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
        """Device blocks (indices along the row axis) holding ``shard``'s rows: those it
        owns, or the one block it shares with other shards."""
        start = self.global_row(shard, 0) // self.rows_per_block
        return range(start, start + self.blocks_per_shard)

    def shards_of_block(self, block: int) -> range:
        """Shards whose rows device block ``block`` holds (one unless shards share it)."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} is out of range: valid 0..{self.num_blocks - 1}")
        first = block * self.shards_per_block // self.blocks_per_shard
        return range(first, first + self.shards_per_block)

    def shard_of_block(self, block: int) -> int:
        """The shard that owns block ``block`` (the first of them when shards share it)."""
        return self.shards_of_block(block).start

    @property
    def bounds(self) -> np.ndarray:
        """``i64[num_shards + 1]``: the first global row of each shard, then ``max_num_reqs``."""
        return np.arange(self.num_shards + 1, dtype=np.int64) * self.rows_per_shard

    def split_sorted(self, rows: np.ndarray) -> list[np.ndarray]:
        """Split sorted global ``rows`` into one array per shard (views, in shard order)."""
        return np.split(rows, np.searchsorted(rows, self.bounds[1:-1]))
