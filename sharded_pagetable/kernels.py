"""Compiled (numba) kernels for the commit hot path: checking and applying a group's batch.

A shard applies a batch on every commit, and the coordinator previews each shard's checksum
change and applies the settled epoch to its published tables. Written with numpy, each is
about a hundred small array calls per group: cheap alone, together the largest cost of a
commit on a small machine. These kernels do the same work in one pass each. They implement
the formulas of :mod:`sharded_pagetable.checksum` and the semantics of ``shard.apply_group``
(both kept as the numpy reference: recovery and attach recompute checksums with them and
compare with what the shards report, and the tests compare both with from-scratch models).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .constants import OP_APPEND, OP_CLEAR, OP_SET, PAGE_TABLE_PADDING_VAL

assert PAGE_TABLE_PADDING_VAL == 0, "apply_batch writes 0 as padding"

# Error codes of check_values (0: fine); the caller turns them into messages.
ROWS_ORDER, RANGE, OP_CODE, SET_CLEAR, APPEND_SHAPE, NEG_PAGE = 1, 2, 3, 4, 5, 6


@nb.njit(cache=True, nogil=True)
def check_values(op, row, start, count, pages, num_rows, width):  # pragma: no cover - jitted
    """Value checks of one decoded group: ``(error code, index)``; pages written must equal
    ``pages.size``, returned as the third value."""
    k = row.size
    written = 0
    for i in range(k):
        r = row[i]
        if r < 0 or r >= num_rows or (i > 0 and r <= row[i - 1]):
            return ROWS_ORDER, i, 0
        s, c = start[i], count[i]
        if s < 0 or c > width or s > c:
            return RANGE, i, 0
        o = op[i]
        if o == OP_APPEND:
            if s == 0 or s == c:
                return APPEND_SHAPE, i, 0
        elif o == OP_SET:
            if s != 0:
                return SET_CLEAR, i, 0
        elif o == OP_CLEAR:
            if s != 0 or c != 0:
                return SET_CLEAR, i, 0
        else:
            return OP_CODE, i, 0
        written += c - s
    for j in range(pages.size):
        if pages[j] < 0:
            return NEG_PAGE, j, written
    return 0, 0, written


@nb.njit(cache=True, nogil=True)
def first_bad_append(counts, op, row, start):  # pragma: no cover - jitted
    """Index of the first APPEND that does not start at its row's held count, else -1."""
    for i in range(row.size):
        if op[i] == OP_APPEND and counts[row[i]] != start[i]:
            return i
    return -1


@nb.njit(cache=True, nogil=True)
def apply_batch(
    table,
    counts,
    inner,
    row,
    start,
    count,
    pages,
    col_w,
    mix,
    mix_offset,
    c_count,
    cells_r,
    cells_c,
):  # pragma: no cover - jitted
    """Apply one checked group batch in place and return ``(checksum delta, cells)``.

    ``table`` i32[rows, P], ``counts`` i32[rows], ``inner`` u64[rows] are the shard's local
    state; ``mix[mix_offset + r]`` is local row ``r``'s checksum multiplier. The changed
    cells (written, plus the tail a shorter row left behind) are stored in ``cells_r`` /
    ``cells_c`` (local rows), which must hold ``sum(max(count, held) - start)`` entries.
    """
    delta = np.uint64(0)
    n = 0
    p = 0
    for i in range(row.size):
        r = row[i]
        s, c = start[i], count[i]
        held = counts[r]
        old = inner[r]
        acc = np.uint64(0) if s == 0 else old
        for col in range(s, c):
            v = pages[p]
            p += 1
            table[r, col] = v
            acc += np.uint64(v) * col_w[col]
            cells_r[n] = r
            cells_c[n] = col
            n += 1
        for col in range(c, held):
            table[r, col] = 0
            cells_r[n] = r
            cells_c[n] = col
            n += 1
        acc += np.uint64(c - s) * c_count
        counts[r] = c
        inner[r] = acc
        delta += mix[mix_offset + r] * (acc - old)
    return delta, n


@nb.njit(cache=True, nogil=True)
def preview_delta(
    inner, row, start, count, pages, col_w, mix, mix_offset, c_count
):  # pragma: no cover - jitted
    """Checksum change :func:`apply_batch` would make, without changing anything."""
    delta = np.uint64(0)
    p = 0
    for i in range(row.size):
        r = row[i]
        s, c = start[i], count[i]
        old = inner[r]
        acc = np.uint64(0) if s == 0 else old
        for col in range(s, c):
            acc += np.uint64(pages[p]) * col_w[col]
            p += 1
        acc += np.uint64(c - s) * c_count
        delta += mix[mix_offset + r] * (acc - old)
    return delta
