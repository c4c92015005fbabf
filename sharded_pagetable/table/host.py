"""Host state of one KV-cache group: the table, its counts, and what is published of it.

:class:`HostRows` is the one owner of a group's rows and of their publication, for the
single-process table and for the sharded coordinator's mirror alike. Row operations change
the live table and mark rows; a commit asks for the pending :meth:`~HostRows.batch` (and
:meth:`~HostRows.copy_plan`), sends it wherever it goes, then takes it as published. The
single-process table, whose commit cannot fail, does that with :meth:`~HostRows.settle`. The
sharded coordinator publishes with :meth:`~HostRows.publish` as soon as it sends, so the
next step can be built while the epoch is on its way; that returns an :class:`Unpublish`,
and :meth:`~HostRows.unpublish` with it steps back if the epoch fails, keeping the changes
made since.

Every ``check_*`` method validates and returns normalised arguments without touching state;
the write methods assume their arguments were checked, so a caller can validate a whole
multi-group call before it writes anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..constants import MAX_PAGE_ID, PAGE_TABLE_PADDING_VAL
from ..errors import PageTableFullError
from ..rows import copies, kernels
from ..rows.checksum import GroupConsts, segment_index
from ..rows.messages import GroupBatch
from .validation import check_index, page_id_array

PageIds = Sequence[int] | np.ndarray
_NO_ROWS = GroupBatch.empty()
CLEAN, APPENDED, REWRITTEN = 0, 1, 2


@dataclass(eq=False)
class Unpublish:
    """What :meth:`HostRows.unpublish` needs to step back over one :meth:`HostRows.publish`."""

    rows: np.ndarray  # i32[k] the batch's rows
    published: np.ndarray  # i32[k] their published counts before
    state: np.ndarray  # i8[k] their states before
    copies: dict[int, int]  # the copy plan before
    terms: np.ndarray | None = None  # u64[k] their checksum terms before
    saved: dict[int, np.ndarray] = field(default_factory=dict)  # their saved rows before


class HostRows:
    """``i32[R, P]`` page ids and ``i32[R]`` counts, with what was last published of them.

    Invariant: ``table[r, counts[r]:]`` is ``PAGE_TABLE_PADDING_VAL`` for every row.
    ``state[r]`` is ``CLEAN``, ``APPENDED`` (only pages added since the row was last
    published, so its published prefix still holds) or ``REWRITTEN`` (anything else).
    ``cpu_version`` goes up with every call that changes ``table`` or ``counts``, and
    only then: a refused call, a commit, a read, or a write that leaves every value as
    it was (clearing an empty row, rewriting a row with the pages it holds, a move or swap
    between equal rows) keeps it. Equal versions mean an equal host table, so callers may
    cache views derived from it (EasyDeL's eSurge runner does).

    Rows at or past ``usable_rows`` (``limit_rows``) are capacity a sharded layout rounded
    up to: ``check_row`` refuses them, so they stay empty.

    With ``consts`` (the sharded coordinator) it also keeps what recovery and checksums need:
    the published pages of a row, saved the first time the row is rewritten after a commit,
    and each published row's checksum terms.

    Args:
      num_rows, capacity: table shape.
      num_pages: if given, page ids must be below it.
      consts: checksum constants of this group (global row numbering), or None.
    """

    def __init__(
        self,
        num_rows: int,
        capacity: int,
        num_pages: int | None = None,
        consts: GroupConsts | None = None,
    ) -> None:
        self.num_rows = num_rows
        self.capacity = capacity
        self.num_pages = num_pages
        self.max_id = MAX_PAGE_ID if num_pages is None else num_pages - 1
        self.table = np.full((num_rows, capacity), PAGE_TABLE_PADDING_VAL, dtype=np.int32)
        self.counts = np.zeros(num_rows, dtype=np.int32)
        # Row states live in a bytearray (fast scalar access on the row-op hot path) seen by
        # numpy through a view of the same memory (fast scans at commit).
        self._state = bytearray(num_rows)
        self.state = np.frombuffer(self._state, dtype=np.int8)
        self.published = np.zeros(num_rows, dtype=np.int32)  # i32[R] counts as published
        self.consts = consts
        self.terms = np.zeros(num_rows, np.uint64) if consts is not None else None  # u64[R]
        self._saved: dict[int, np.ndarray] | None = {} if consts is not None else None
        self._copies: dict[int, int] = {}  # destination page -> source page, until published
        self.cpu_version = 0  # bumped after each write below that changed a value
        self.usable_rows = num_rows  # rows callers may name (see limit_rows)

    def limit_rows(self, usable_rows: int) -> None:
        """Let callers name only rows ``[0, usable_rows)``: a table whose row capacity was
        rounded up (``ShardLayout.fit``) refuses the rest exactly as a table of
        ``usable_rows`` rows would. Call it before any row holds pages."""
        if not 1 <= usable_rows <= self.num_rows:
            raise ValueError(f"usable_rows must be in 1..{self.num_rows}, got {usable_rows}")
        if self.counts[usable_rows:].any():
            raise ValueError(f"rows at or past {usable_rows} hold pages already")
        self.usable_rows = usable_rows

    # -- checks (no state change) ------------------------------------------------------

    def check_row(self, row: object, what: str = "row") -> int:
        if type(row) is int and 0 <= row < self.usable_rows:
            return row
        return check_index(row, self.usable_rows, what)

    def check_ids(self, page_ids: object) -> PageIds:
        """Validated page ids, always a copy read once from ``page_ids``: a list when they
        are plain in-range ints, else an ``i32`` array (or the error naming the bad id).

        Write the copy, never the caller's list: another of its threads may change that
        list once it is checked (a -7 once reached the devices that way).
        """
        if type(page_ids) is list:
            ids = page_ids.copy()  # one C-level call under the GIL: a consistent snapshot
            hi = self.max_id
            for p in ids:
                if type(p) is not int or not 0 <= p <= hi:
                    break
            else:
                return ids
            page_ids = ids
        return page_id_array(page_ids, self.num_pages)

    def check_room(self, row: int, extra: int, count: int | None = None) -> None:
        held = self.counts.item(row) if count is None else count
        if held + extra > self.capacity:
            raise PageTableFullError(
                f"row {row} holds {held} pages; {extra} more would exceed its capacity of "
                f"{self.capacity} pages"
            )

    # -- writes (arguments already checked) ----------------------------------------------

    def _rewrite(self, row: int) -> None:
        """Mark ``row`` rewritten, saving its published pages the first time."""
        if self._state[row] != REWRITTEN:
            if self._saved is not None:
                self._saved[row] = self.table[row, : self.published.item(row)].copy()
            self._state[row] = REWRITTEN

    def append(self, row: int, ids: PageIds) -> None:
        n = len(ids)
        if n == 0:
            return
        start = self.counts.item(row)
        self.table[row, start : start + n] = ids
        self.counts[row] = start + n
        if not self._state[row]:
            self._state[row] = APPENDED
        self.cpu_version += 1

    def checked_append(self, row: int, ids: PageIds) -> None:
        """``check_room`` and ``append`` with one read of the count (the hot path)."""
        n = len(ids)
        start = self.counts.item(row)
        if start + n > self.capacity:
            self.check_room(row, n)
        if n:
            self.table[row, start : start + n] = ids
            self.counts[row] = start + n
            if not self._state[row]:
                self._state[row] = APPENDED
            self.cpu_version += 1

    def _holds(self, row: int, ids: PageIds) -> bool:
        """Whether ``row`` holds exactly ``ids`` (a rewrite with them changes nothing)."""
        n = len(ids)
        return self.counts.item(row) == n and (n == 0 or bool((self.table[row, :n] == ids).all()))

    def replace(self, row: int, ids: PageIds) -> None:
        if self._holds(row, ids):
            return
        self._rewrite(row)
        n, old = len(ids), self.counts.item(row)
        self.table[row, :n] = ids
        if old > n:
            self.table[row, n:old] = PAGE_TABLE_PADDING_VAL
        self.counts[row] = n
        self.cpu_version += 1

    def clear_row(self, row: int) -> None:
        if not self.counts.item(row):
            return  # already empty (and marked rewritten if it was published non-empty)
        self._rewrite(row)
        self.table[row, : self.counts.item(row)] = PAGE_TABLE_PADDING_VAL
        self.counts[row] = 0
        self.cpu_version += 1

    def _same_rows(self, a: int, b: int) -> bool:
        n = self.counts.item(a)
        return n == self.counts.item(b) and bool((self.table[a, :n] == self.table[b, :n]).all())

    def copy_row(self, src: int, tgt: int) -> None:
        if src == tgt or self._same_rows(src, tgt):
            return
        self._rewrite(tgt)
        n, old = self.counts.item(src), self.counts.item(tgt)
        # src is padded past n, so one slice copies its pages and pads tgt's old tail.
        m = n if n >= old else old
        self.table[tgt, :m] = self.table[src, :m]
        self.counts[tgt] = n
        self.cpu_version += 1

    def swap_rows(self, a: int, b: int) -> None:
        if a == b or self._same_rows(a, b):
            return
        self._rewrite(a)
        self._rewrite(b)
        table, counts = self.table, self.counts
        na, nb = counts.item(a), counts.item(b)
        m = na if na >= nb else nb
        held = table[a, :m].copy()
        table[a, :m] = table[b, :m]
        table[b, :m] = held
        counts[a], counts[b] = nb, na
        self.cpu_version += 1

    def reset(self) -> None:
        """Empty every row; what was published stays published until the next commit."""
        changed = bool(self.counts.any())  # rows are padded past their counts
        for row in np.flatnonzero(self.published).tolist():
            self._rewrite(row)
        self.table.fill(PAGE_TABLE_PADDING_VAL)
        self.counts.fill(0)
        self.state[self.published == 0] = CLEAN
        self.cpu_version += changed

    # -- publication ---------------------------------------------------------------------

    def batch(self, num_reqs: int) -> GroupBatch:
        """Rows below ``num_reqs`` changed since they were published, as one batch over
        global rows: an APPEND of the new pages where only pages were added, else a SET (or
        CLEAR) of the whole row."""
        batch = kernels.pending_batch(
            self.state, self.published, self.counts, self.table, num_reqs, REWRITTEN
        )
        return _NO_ROWS if batch is None else batch  # the idle commit: nothing pending

    def changed_cells(self, batch: GroupBatch) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, cols)`` that publishing ``batch`` changes on a device that holds the
        published rows: the written cells and the tail a shorter row leaves behind."""
        stops = np.maximum(batch.count, self.published[batch.row])
        return segment_index(batch.row, batch.start, stops)

    def terms_after(self, batch: GroupBatch) -> tuple[np.ndarray, np.ndarray]:
        """``(u64[k] terms, u64[k] checksum change)`` of ``batch``'s rows once published
        (needs ``consts``); nothing changes until :meth:`settle`."""
        return kernels.batch_terms(self.terms, batch, self.consts)

    def record_copies(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """The KV of pages ``src`` must reach pages ``dst`` before attention reads them (a row
        moved onto new pages). Copies recorded in one epoch are read before any is written,
        so a chain (a page copied on again) resolves to the page that holds the KV now."""
        copies.compose(self._copies, src, dst)

    def copy_sources(self) -> set[int]:
        """Pages whose KV a pending copy still reads."""
        return set(self._copies.values())

    def copy_plan(self) -> np.ndarray:
        """``i32[2, K]`` pending KV copies (source page, destination page), by destination.

        A plan never holds more copies than the table has cells (what a shard accepts, see
        ``WireLimits``): past that, some copies land in pages no row holds any more (a row
        moved onto new pages, then cleared or moved again before a commit), and those are
        dropped: no attention reads them."""
        if len(self._copies) > self.table.size:
            self._drop_unheld_copies()
        return copies.plan_of(self._copies)

    def _drop_unheld_copies(self) -> None:
        held = self.table[np.arange(self.capacity)[None, :] < self.counts[:, None]]
        dst = np.fromiter(self._copies, np.int64, len(self._copies))
        for page in dst[~np.isin(dst, held)].tolist():
            del self._copies[page]

    def publish(self, batch: GroupBatch, terms: np.ndarray | None = None) -> Unpublish:
        """Take ``batch`` (with the copy plan) as published from now on: its rows are clean,
        their saved copies dropped, no KV copy pending. Rows may change again at once (the
        next step is built while this epoch is on its way); :meth:`unpublish` with what
        this returns steps back if the epoch fails."""
        rows = batch.row
        undo = Unpublish(rows, self.published[rows], self.state[rows], dict(self._copies))
        self._copies.clear()
        self.published[rows] = batch.count
        self.state[rows] = CLEAN
        if self._saved is not None:
            undo.terms = self.terms[rows]
            self.terms[rows] = terms
            if self._saved:  # only rewritten rows have a saved copy
                for row in rows[undo.state == REWRITTEN].tolist():
                    page = self._saved.pop(row, None)
                    if page is not None:
                        undo.saved[row] = page
        return undo

    def settle(self, batch: GroupBatch) -> None:
        """:meth:`publish` for a commit that cannot fail (single-process): no undo kept."""
        rows = batch.row
        self._copies.clear()
        self.published[rows] = batch.count
        self.state[rows] = CLEAN

    def unpublish(self, undo: Unpublish) -> None:
        """Step back over a failed :meth:`publish`, keeping every change made since: a row
        changed again after it stays pending, now against what is really published."""
        rows, now = undo.rows, self.state[undo.rows]
        state = np.maximum(now, undo.state)  # still changed, and by as much as either says
        if self._saved is not None:
            for i in np.flatnonzero(state == REWRITTEN).tolist():
                row = int(rows[i])
                if undo.state[i] == REWRITTEN:
                    self._saved[row] = undo.saved[row]
                else:  # appended before, rewritten since: the published prefix of that copy
                    self._saved[row] = self._saved[row][: undo.published[i]].copy()
            self.terms[rows] = undo.terms
        self.state[rows] = state
        self.published[rows] = undo.published
        since, self._copies = self._copies, dict(undo.copies)
        if since:  # copies recorded after the failed epoch resolve against its plan
            self.record_copies(list(since.values()), list(since))

    def reset_published(self) -> None:
        """Empty every row and take that as published (the caller emptied its devices)."""
        self.reset()
        self.published.fill(0)
        self.state.fill(CLEAN)
        if self._saved is not None:
            self._saved.clear()
            self.terms.fill(0)

    def published_rows(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """``(i32[hi - lo, P] pages, i32[hi - lo] counts)`` of rows ``[lo, hi)`` as last
        published (needs ``consts``)."""
        table = self.table[lo:hi].copy()
        counts = self.published[lo:hi].copy()
        for row, pages in self._saved.items():
            if lo <= row < hi:
                table[row - lo] = PAGE_TABLE_PADDING_VAL
                table[row - lo, : pages.size] = pages
        # Appended rows hold pages past their published count.
        cols = np.arange(self.capacity)
        table[cols[None, :] >= counts[:, None]] = PAGE_TABLE_PADDING_VAL
        return table, counts

    def load(self, lo: int, batch: GroupBatch) -> None:
        """Make rows ``lo + batch.row`` (a full-state batch of SETs) both live and published,
        on a table whose rows there are empty and clean (attach)."""
        rows = batch.row.astype(np.int64) + lo
        r, c = segment_index(rows, batch.start, batch.count)
        self.table[r, c] = batch.pages
        self.counts[rows] = batch.count
        self.published[rows] = batch.count
        self.cpu_version += bool(batch.count.any())
        if self.terms is not None:
            glob = GroupBatch(
                batch.op, rows.astype(np.int32), batch.start, batch.count, batch.pages
            )
            self.terms[rows] = kernels.batch_terms(self.terms, glob, self.consts)[0]


class HostView:
    """The seed's host-side reads of one group's table: shared by the single-process
    ``PageTable`` and the sharded table's ``t[g]``.

    Args:
      host: the group's rows.
    """

    def __init__(self, host: HostRows) -> None:
        self._host = host
        rows = host.usable_rows  # live views of the rows callers may name
        whole = rows == host.num_rows
        self._table = host.table if whole else host.table[:rows]
        self._counts = host.counts if whole else host.counts[:rows]

    @property
    def page_table_cpu(self) -> np.ndarray:  # i32[R, P]
        return self._table

    @property
    def num_pages_per_row(self) -> np.ndarray:  # i32[R]
        return self._counts

    @property
    def cpu_version(self) -> int:
        """Goes up with every row operation that changes the host table or a row's count,
        and only then (never for a commit, a read, a refused call, or an operation
        that leaves every value as it was). Equal values mean an equal
        :meth:`get_cpu_tensor` and ``num_pages_per_row``, so views derived from them may be
        cached on it, as EasyDeL's eSurge runner does; compare it for equality only (how
        far it moves per call is not EasyDeL's: its ``add_row`` moves it by two)."""
        return self._host.cpu_version

    def get_cpu_tensor(self) -> np.ndarray:
        """The live host table ``i32[R, P]``."""
        return self._table
