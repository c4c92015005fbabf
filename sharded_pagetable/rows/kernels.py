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

from dataclasses import dataclass

import numba as nb
import numpy as np

from ..constants import OP_APPEND, OP_CLEAR, OP_SET, PAGE_TABLE_PADDING_VAL
from .checksum import C_COUNT, GroupConsts
from .messages import GroupBatch

assert PAGE_TABLE_PADDING_VAL == 0, "the apply kernel writes 0 as padding"


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
def _pending(state, published, counts, table, num_rows, rewritten):  # pragma: no cover
    k = 0
    cells = 0
    for r in range(num_rows):
        st = state[r]
        if st:
            k += 1
            cells += counts[r] - (0 if st == rewritten else published[r])
    op = np.empty(k, np.int32)
    row = np.empty(k, np.int32)
    start = np.empty(k, np.int32)
    count = np.empty(k, np.int32)
    pages = np.empty(cells, np.int32)
    i = 0
    p = 0
    for r in range(num_rows):
        st = state[r]
        if not st:
            continue
        s = 0 if st == rewritten else published[r]
        c = counts[r]
        row[i], start[i], count[i] = r, s, c
        op[i] = OP_APPEND if s > 0 else (OP_CLEAR if c == 0 else OP_SET)
        for col in range(s, c):
            pages[p] = table[r, col]
            p += 1
        i += 1
    return op, row, start, count, pages


def pending_batch(
    state: np.ndarray,
    published: np.ndarray,
    counts: np.ndarray,
    table: np.ndarray,
    num_rows: int,
    rewritten: int,
) -> GroupBatch | None:
    """The batch that publishes rows ``[0, num_rows)`` whose ``state`` (i8[R]) is not 0: an
    APPEND of the pages past ``published`` (i32[R]) for a row that only grew, else a SET
    (or CLEAR) of the whole row from ``table`` (i32[R, P]) and ``counts`` (i32[R]); a row
    whose state is ``rewritten`` is sent whole. None when no row is pending (one vectorised
    test: an idle commit costs only that); else one compiled pass over the rows."""
    if not state[:num_rows].any():
        return None
    return GroupBatch(*_pending(state, published, counts, table, num_rows, rewritten))


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
    table, counts, inner, op, row, start, count, pages, col_w, mix, offset, lo, keep
):  # pragma: no cover
    k = row.size
    size = 0
    n_replaced = 0
    for i in range(k):
        held = counts[row[i]]
        size += max(count[i], held) - start[i]
        n_replaced += op[i] != OP_APPEND
    cells_r = np.empty(size, np.int64)
    cells_c = np.empty(size, np.int64)
    old_counts = np.empty(k, np.int32)
    old_inner = np.empty(k, np.uint64)
    replaced = np.empty(k, np.bool_)
    old_rows = np.zeros((n_replaced if keep else 0, table.shape[1]), np.int32)
    delta = np.uint64(0)
    n = 0
    p = 0
    j = 0
    for i in range(k):
        r = row[i]
        s, c = start[i], count[i]
        held = counts[r]
        old_counts[i] = held
        old_inner[i] = inner[r]
        replaced[i] = op[i] != OP_APPEND
        if replaced[i] and keep:
            for col in range(held):
                old_rows[j, col] = table[r, col]
            j += 1
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
            cells_r[n] = r + lo
            cells_c[n] = col
            n += 1
        for col in range(c, held):
            table[r, col] = 0
            cells_r[n] = r + lo
            cells_c[n] = col
            n += 1
        acc += np.uint64(c - s) * C_COUNT
        counts[r] = c
        delta += mix[offset + r] * (acc - inner[r])
        inner[r] = acc
    return delta, cells_r, cells_c, old_counts, old_inner, replaced, old_rows


@dataclass(frozen=True, eq=False)
class Before:
    """What a batch replaced, for stepping back over it: per entry of the batch the row's
    count and checksum term before, whether it was rewritten from slot 0 (else appended to),
    and the rewritten rows as they were (``i32[rewritten, P]``, in batch order)."""

    counts: np.ndarray
    inner: np.ndarray
    replaced: np.ndarray
    old_rows: np.ndarray


def apply_batch(
    table: np.ndarray,
    counts: np.ndarray,
    inner: np.ndarray,
    batch: GroupBatch,
    consts: GroupConsts,
    lo: int = 0,
) -> tuple[int, tuple[np.ndarray, np.ndarray], Before]:
    """Apply a checked batch to ``table`` i32[rows, P], ``counts`` i32[rows] and the terms
    ``inner`` u64[rows] in place, in one pass; returns ``(checksum change, changed cells,
    what it replaced)``.

    The changed cells (``rows + lo``, ``cols``) are the written ones plus the tail a shorter
    row left behind: exactly what the devices must be told.
    """
    return _split_result(_apply_kernel(table, counts, inner, batch, consts, lo, True))


def apply_batch_fresh(
    table: np.ndarray, counts: np.ndarray, inner: np.ndarray, batch: GroupBatch, consts: GroupConsts
) -> int:
    """:func:`apply_batch` for tables nobody steps back over (a re-seed): no copy of the
    replaced rows is kept; returns the checksum change."""
    return int(_apply_kernel(table, counts, inner, batch, consts, 0, False)[0])


def _apply_kernel(table, counts, inner, batch, consts, lo, keep):
    return _apply(
        table, counts, inner, batch.op, batch.row, batch.start, batch.count, batch.pages,
        consts.col_w, consts.mix, consts.offset, lo, keep,
    )  # fmt: skip


def _split_result(out: tuple) -> tuple[int, tuple[np.ndarray, np.ndarray], Before]:
    delta, cells_r, cells_c, *before = out
    return int(delta), (cells_r, cells_c), Before(*before)


@nb.njit(cache=True, nogil=True)
def _pack_cells(rcv, cells_r, cells_c, source, lo, start, ci, cj):  # pragma: no cover
    for i in range(ci, cj):
        r, c = cells_r[i], cells_c[i]
        rcv[0, i - ci] = r - start
        rcv[1, i - ci] = c
        rcv[2, i - ci] = source[r - lo, c]


def pack_cells(
    rcv: np.ndarray,
    cells: tuple[np.ndarray, np.ndarray],
    source: np.ndarray,
    lo: int,
    start: int,
    span: tuple[int, int],
) -> None:
    """Fill ``rcv`` (i32[3, K]) with the cells ``span`` of ``cells`` (global rows, columns)
    as (row within the block starting at global row ``start``, column, value in ``source``,
    whose row 0 is global row ``lo``)."""
    _pack_cells(rcv, cells[0], cells[1], source, lo, start, span[0], span[1])


def warm_up(table: np.ndarray, counts: np.ndarray, inner: np.ndarray, consts: GroupConsts) -> None:
    """Compile (or load from numba's cache) every kernel for the argument types a decoded
    message has (read-only int32 columns), before the first commit."""
    empty = np.frombuffer(b"", dtype="<i4")
    batch = GroupBatch(empty, empty, empty, empty, empty)
    pending_batch(np.ones(1, np.int8), counts[:1], counts[:1], table[:1], 1, 2)
    first_bad_append(counts, batch)
    batch_terms(inner, batch, consts)
    apply_batch(table, counts, inner, batch, consts)
    apply_batch_fresh(table, counts, inner, batch, consts)
    none = np.empty(0, np.int64)
    pack_cells(np.zeros((3, 1), np.int32), (none, none), table, 0, 0, (0, 0))
