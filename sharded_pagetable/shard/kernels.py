"""Compiled (numba) kernels of the commit hot path: checking a batch, the checksum terms it
leads to, and applying it to a shard's tables.

Written with numpy, each is about a hundred small array calls per group: cheap alone,
together the largest cost of a commit on a small machine. Each kernel here is one pass. They
implement the formulas of :mod:`.checksum` (``tests/test_checksum.py`` and
``tests/test_wire.py`` compare them with from-scratch models). The public functions take
one batch, one :class:`~.checksum.GroupConsts` and the state they read or write; the
jitted bodies behind them are private.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..constants import OP_APPEND, OP_CLEAR, OP_SET, PAGE_TABLE_PADDING_VAL
from .checksum import C_COUNT, GroupConsts
from .messages import GroupBatch

assert PAGE_TABLE_PADDING_VAL == 0, "the apply kernel writes 0 as padding"

# Error codes of check_values (0: fine); the caller turns them into messages.
ROWS_ORDER, RANGE, OP_CODE, SET_CLEAR, APPEND_SHAPE, NEG_PAGE = 1, 2, 3, 4, 5, 6


@nb.njit(cache=True, nogil=True)
def check_values(op, row, start, count, pages, num_rows, width):  # pragma: no cover - jitted
    """Value checks of one decoded group: ``(error code, index, cells written)``; the cells
    written must equal ``pages.size``."""
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
def _first_bad_append(counts, op, row, start):  # pragma: no cover - jitted
    for i in range(row.size):
        if op[i] == OP_APPEND and counts[row[i]] != start[i]:
            return i
    return -1


def first_bad_append(counts: np.ndarray, batch: GroupBatch) -> int:
    """Index of the first APPEND of ``batch`` that does not start at its row's held count
    (``counts`` i32[rows]), else -1."""
    return _first_bad_append(counts, batch.op, batch.row, batch.start)


@nb.njit(cache=True, nogil=True)
def _terms(
    inner, row, start, count, pages, col_w, mix, offset, new_inner, delta
):  # pragma: no cover
    p = 0
    for i in range(row.size):
        r = row[i]
        s, c = start[i], count[i]
        old = inner[r]
        acc = np.uint64(0) if s == 0 else old
        for col in range(s, c):
            acc += np.uint64(pages[p]) * col_w[col]
            p += 1
        acc += np.uint64(c - s) * C_COUNT
        new_inner[i] = acc
        delta[i] = mix[offset + r] * (acc - old)


def batch_terms(
    inner: np.ndarray, batch: GroupBatch, consts: GroupConsts
) -> tuple[np.ndarray, np.ndarray]:
    """The checksum terms ``batch`` gives its rows, from their published terms ``inner``
    (u64[rows]), without changing anything: ``(u64[k] new terms, u64[k] checksum change of
    each row)``. Appends add only the new cells' terms, so this costs the cells sent."""
    new_inner = np.empty(batch.size, np.uint64)
    delta = np.empty(batch.size, np.uint64)
    _terms(
        inner, batch.row, batch.start, batch.count, batch.pages, consts.col_w, consts.mix,
        consts.offset, new_inner, delta,
    )  # fmt: skip
    return new_inner, delta


@nb.njit(cache=True, nogil=True)
def _apply(
    table, counts, inner, row, start, count, pages, col_w, mix, offset, cells_r, cells_c
):  # pragma: no cover
    delta = np.uint64(0)
    n = 0
    p = 0
    for i in range(row.size):
        r = row[i]
        s, c = start[i], count[i]
        held = counts[r]
        # An append re-reads the row's kept prefix, so the terms (and the checksum the shard
        # reports) attest to what this table really holds, not to what it was sent.
        acc = np.uint64(s) * C_COUNT
        for col in range(s):
            acc += np.uint64(table[r, col]) * col_w[col]
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
        acc += np.uint64(c - s) * C_COUNT
        counts[r] = c
        delta += mix[offset + r] * (acc - inner[r])
        inner[r] = acc
    return delta, n


def apply_batch(
    table: np.ndarray, counts: np.ndarray, inner: np.ndarray, batch: GroupBatch, consts: GroupConsts
) -> tuple[int, tuple[np.ndarray, np.ndarray]]:
    """Apply a checked batch to ``table`` i32[rows, P], ``counts`` i32[rows] and the terms
    ``inner`` u64[rows] in place; returns ``(checksum change, changed cells)``.

    The changed cells (local ``rows``, ``cols``) are the written ones plus the tail a shorter
    row left behind: exactly what the devices must be told.
    """
    held = counts[batch.row]
    size = int(np.maximum(batch.count, held).sum(dtype=np.int64) - batch.start.sum(dtype=np.int64))
    cells_r = np.empty(size, np.int64)
    cells_c = np.empty(size, np.int64)
    delta, n = _apply(
        table, counts, inner, batch.row, batch.start, batch.count, batch.pages, consts.col_w,
        consts.mix, consts.offset, cells_r, cells_c,
    )  # fmt: skip
    return int(delta), (cells_r[:n], cells_c[:n])


def warm_up(table: np.ndarray, counts: np.ndarray, inner: np.ndarray, consts: GroupConsts) -> None:
    """Compile (or load from numba's cache) every kernel for the argument types a decoded
    message has (read-only int32 columns), before the first commit."""
    empty = np.frombuffer(b"", dtype="<i4")
    batch = GroupBatch(empty, empty, empty, empty, empty)
    check_values(empty, empty, empty, empty, empty, 1, 1)
    first_bad_append(counts, batch)
    batch_terms(inner, batch, consts)
    apply_batch(table, counts, inner, batch, consts)
