"""Order-sensitive checksum of a shard's rows, updated incrementally from wire batches.

For group ``g`` and global row ``r`` holding ``count`` pages ``p``::

    inner(r) = count * C + sum_{c < count} p[c] * w(c)            (mod 2**64)
    checksum  = sum_{g, r} mix(g, r) * inner_g(r)                   (mod 2**64)

``inner`` is linear in the pages, so an append adds only the new columns' terms and a
commit costs time proportional to the pages it sends, never to the table size. The shard
and the coordinator run the same function on the same batch and compare results (the compiled versions are in :mod:`.kernels`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

_K_COL = np.uint64(0x9E3779B97F4A7C15)
_K_ROW = np.uint64(0xD1B54A32D192ED03)
_C_COUNT = np.uint64(0xA0761D6478BD642F)
C_COUNT = _C_COUNT
_MAX_TABLE = 1 << 20  # cache lookup tables up to this many rows or columns (8 MiB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 finaliser over ``u64`` values."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _pow2_at_least(n: int) -> int:
    return 1 << max(6, (n - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _row_mix_table(group: int, size: int) -> np.ndarray:
    rows = np.arange(size, dtype=np.uint64)
    key = (np.uint64(group) << np.uint64(32)) | rows
    table = splitmix64(key ^ _K_ROW) | np.uint64(1)
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=64)
def _col_weight_table(size: int) -> np.ndarray:
    table = splitmix64(np.arange(size, dtype=np.uint64) ^ _K_COL) | np.uint64(1)
    table.flags.writeable = False
    return table


def table_size(num_rows: int) -> int:
    """Size of the cached row-mix table covering rows ``[0, num_rows)``."""
    return _pow2_at_least(num_rows)


def row_mix_table(group: int, size: int) -> np.ndarray:
    """``u64[size]`` multipliers of rows ``[0, size)`` (cached when small enough)."""
    if size > _MAX_TABLE:
        key = (np.uint64(group) << np.uint64(32)) | np.arange(size, dtype=np.uint64)
        return splitmix64(key ^ _K_ROW) | np.uint64(1)
    return _row_mix_table(group, size)


def row_mix(group: int, rows: np.ndarray) -> np.ndarray:
    """Odd per-(group, global row) multiplier, ``u64[k]`` (table lookup for usual sizes)."""
    if rows.size == 0:
        return np.empty(0, np.uint64)
    size = _pow2_at_least(int(rows.max()) + 1)
    if size > _MAX_TABLE:
        key = (np.uint64(group) << np.uint64(32)) | rows.astype(np.uint64)
        return splitmix64(key ^ _K_ROW) | np.uint64(1)
    return _row_mix_table(group, size)[rows]


def col_weights(cols: np.ndarray) -> np.ndarray:
    """Odd per-column weight, ``u64[k]`` (table lookup for usual sizes)."""
    if cols.size == 0:
        return np.empty(0, np.uint64)
    size = _pow2_at_least(int(cols.max()) + 1)
    if size > _MAX_TABLE:
        return splitmix64(cols.astype(np.uint64) ^ _K_COL) | np.uint64(1)
    return _col_weight_table(size)[cols]


def segment_index(
    rows: np.ndarray, starts: np.ndarray, stops: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flat ``(row, column)`` indices of the cells ``[starts[i], stops[i])`` of ``rows[i]``."""
    lens = (stops - starts).astype(np.int64)
    total = int(lens.sum())
    if total == lens.size and (lens == 1).all():  # one cell per row: every decode step
        return rows, starts
    flat_rows = rows.repeat(lens)
    offsets = lens.cumsum() - lens
    flat_cols = np.arange(total, dtype=np.int64) - (offsets - starts).repeat(lens)
    return flat_rows, flat_cols


def inner_delta(
    starts: np.ndarray, counts: np.ndarray, pages: np.ndarray, cols: np.ndarray | None = None
) -> np.ndarray:
    """``u64[k]`` contribution of cells ``[starts[i], counts[i])`` holding the flat ``pages``;
    ``cols`` (their flat column indices) may be passed when already known."""
    lens = (counts - starts).astype(np.int64)
    if cols is None:
        _, cols = segment_index(np.zeros(lens.size, dtype=np.int64), starts, counts)
    with np.errstate(over="ignore"):
        terms = pages.astype(np.uint64) * col_weights(cols)
        if terms.size == lens.size and (lens == 1).all():
            seg = terms
        else:
            csum = np.zeros(terms.size + 1, np.uint64)
            terms.cumsum(dtype=np.uint64, out=csum[1:])
            ends = lens.cumsum()
            seg = csum[ends] - csum[ends - lens]
        return seg + lens.astype(np.uint64) * _C_COUNT


def updated_inner(
    old_inner: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    pages: np.ndarray,
    cols: np.ndarray | None = None,
) -> np.ndarray:
    """New ``inner`` of rows whose cells ``[starts, counts)`` were written; a row with
    ``start == 0`` was replaced, otherwise appended to."""
    with np.errstate(over="ignore"):
        base = np.where(starts == 0, np.uint64(0), old_inner)
        return base + inner_delta(starts, counts, pages, cols)


def total_delta(
    group: int, global_rows: np.ndarray, old_inner: np.ndarray, new_inner: np.ndarray
) -> int:
    """Change of the checksum when ``global_rows`` go from ``old_inner`` to ``new_inner``."""
    if global_rows.size == 0:
        return 0
    with np.errstate(over="ignore"):
        return int((row_mix(group, global_rows) * (new_inner - old_inner)).sum(dtype=np.uint64))


def add(a: int, b: int) -> int:
    return (a + b) & 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True, eq=False)
class GroupConsts:
    """The checksum constants of one KV-cache group as one side of the wire numbers its rows.

    ``mix[offset + r]`` is the multiplier of local row ``r`` (global row ``offset + r``), and
    ``col_w[c]`` the weight of page slot ``c``. Built once per group and handed to every
    kernel call instead of loose arrays.
    """

    group: int
    col_w: np.ndarray  # u64[P]
    mix: np.ndarray  # u64[>= offset + rows]
    offset: int

    @classmethod
    def build(cls, group: int, width: int, num_rows: int, offset: int = 0) -> GroupConsts:
        """Constants of ``group`` (``width`` pages per row) for a table of ``num_rows`` global
        rows, seen from a side whose row 0 is global row ``offset``."""
        return cls(
            group, col_weights(np.arange(width)), row_mix_table(group, table_size(num_rows)), offset
        )
