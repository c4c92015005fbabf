"""Host state of one KV-cache group: the numpy table, counts and what changed since publish.

:class:`HostRows` is shared by the single-process table and the sharded coordinator's mirror.
Every ``check_*`` method validates and returns normalised arguments without touching state;
the write methods assume their arguments were checked, so a caller can validate a whole
multi-group call before it writes anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .constants import MAX_PAGE_ID, PAGE_TABLE_PADDING_VAL
from .errors import PageTableFullError
from .validation import check_index, page_id_array

PageIds = Sequence[int] | np.ndarray
CLEAN, APPENDED, REWRITTEN = 0, 1, 2


class HostRows:
    """``i32[R, P]`` page ids and ``i32[R]`` counts, with per-row change tracking.

    Invariant: ``table[r, counts[r]:]`` is ``PAGE_TABLE_PADDING_VAL`` for every row.
    ``state[r]`` is ``CLEAN``, ``APPENDED`` (only pages added since the row was last
    published, so its published prefix still holds) or ``REWRITTEN`` (anything else).
    """

    def __init__(self, num_rows: int, capacity: int, num_pages: int | None = None) -> None:
        self.num_rows = num_rows
        self.capacity = capacity
        self.num_pages = num_pages
        self.max_id = MAX_PAGE_ID if num_pages is None else num_pages - 1
        self.table = np.full((num_rows, capacity), PAGE_TABLE_PADDING_VAL, dtype=np.int32)
        self.counts = np.zeros(num_rows, dtype=np.int32)
        self.state = np.zeros(num_rows, dtype=np.int8)  # CLEAN / APPENDED / REWRITTEN

    # -- checks (no state change) ------------------------------------------------------

    def check_row(self, row: object, what: str = "row") -> int:
        if type(row) is int and 0 <= row < self.num_rows:
            return row
        return check_index(row, self.num_rows, what)

    def check_ids(self, page_ids: object) -> PageIds:
        """Validated page ids: the caller's list when it is plain in-range ints, else an
        ``i32`` array (or the error naming the bad id)."""
        if type(page_ids) is list:
            hi = self.max_id
            for p in page_ids:
                if type(p) is not int or not 0 <= p <= hi:
                    break
            else:
                return page_ids
        return page_id_array(page_ids, self.num_pages)

    def check_room(self, row: int, extra: int, count: int | None = None) -> None:
        held = self.counts.item(row) if count is None else count
        if held + extra > self.capacity:
            raise PageTableFullError(
                f"row {row} holds {held} pages; {extra} more would exceed its capacity of "
                f"{self.capacity} pages"
            )

    # -- writes (arguments already checked) ----------------------------------------------

    def append(self, row: int, ids: PageIds) -> None:
        n = len(ids)
        if n == 0:
            return
        start = self.counts.item(row)
        self.table[row, start : start + n] = ids
        self.counts[row] = start + n
        if not self.state.item(row):
            self.state[row] = APPENDED

    def checked_append(self, row: int, ids: PageIds) -> None:
        """``check_room`` and ``append`` with one read of the count (the hot path)."""
        n = len(ids)
        start = self.counts.item(row)
        if start + n > self.capacity:
            self.check_room(row, n)
        if n:
            self.table[row, start : start + n] = ids
            self.counts[row] = start + n
            if not self.state.item(row):
                self.state[row] = APPENDED

    def replace(self, row: int, ids: PageIds) -> None:
        n, old = len(ids), self.counts.item(row)
        self.table[row, :n] = ids
        if old > n:
            self.table[row, n:old] = PAGE_TABLE_PADDING_VAL
        self.counts[row] = n
        self.state[row] = REWRITTEN

    def clear_row(self, row: int) -> None:
        self.table[row, : self.counts.item(row)] = PAGE_TABLE_PADDING_VAL
        self.counts[row] = 0
        self.state[row] = REWRITTEN

    def copy_row(self, src: int, tgt: int) -> None:
        if src == tgt:
            return
        n, old = self.counts.item(src), self.counts.item(tgt)
        # src is padded past n, so one slice copies its pages and pads tgt's old tail.
        m = n if n >= old else old
        self.table[tgt, :m] = self.table[src, :m]
        self.counts[tgt] = n
        self.state[tgt] = REWRITTEN

    def swap_rows(self, a: int, b: int) -> None:
        if a == b:
            return
        table, counts = self.table, self.counts
        na, nb = counts.item(a), counts.item(b)
        m = na if na >= nb else nb
        held = table[a, :m].copy()
        table[a, :m] = table[b, :m]
        table[b, :m] = held
        counts[a], counts[b] = nb, na
        self.state[a] = self.state[b] = REWRITTEN

    def reset(self) -> None:
        self.table.fill(PAGE_TABLE_PADDING_VAL)
        self.counts.fill(0)
        self.state.fill(CLEAN)

    def pending(self, num_reqs: int) -> np.ndarray:
        """Sorted rows below ``num_reqs`` that changed since they were last published."""
        return np.flatnonzero(self.state[:num_reqs])

    def rewritten(self, rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` changed by more than appends since they were published."""
        return self.state[rows] == REWRITTEN

    def mark_published(self, rows: np.ndarray) -> None:
        self.state[rows] = CLEAN
