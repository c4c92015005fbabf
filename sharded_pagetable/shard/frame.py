"""A shard's commit frame, compiled: read it, check it, apply it, pack its device update.

Every numba function of a frame's path lives in this one module, because numba's cache
notices a change to a function's own file only: a cached kernel calling a kernel of
another file would keep running that kernel's old code after an edit.

* :func:`scan` reads a batch message as ``wire.encode`` writes it (the keys in its order,
  unsigned ints, ``bin`` columns) in one pass, copying every group's columns into one
  aligned ``i32`` array and checking their values. It accepts a message only if the strict
  decoder would accept it and decode the same values (``tests/test_frame.py``); anything
  else (another key order, signed int formats, KV copies, any refusal) makes it step aside,
  and ``wire``'s strict decoder then decodes or refuses with its own message.
* :func:`apply_groups` applies a whole shard batch, every group, in one pass: checks its
  APPENDs against the held counts (refusing it unchanged), applies it, keeps the undo and
  packs the device update, with the results of ``kernels.apply_batch`` on each group.
* :func:`apply_frame` does both in one call, for the usual frame: canonical, for the next
  epoch of this shard, from the coordinator it obeys, every APPEND fitting. Any other frame
  changes nothing here, and ``Shard.apply`` takes its general path.

Why one call: at commit cadence on a 2-core machine each compiled call costs 10-40 us of CPU
however little it does (its code and data are no longer in cache when the next commit
arrives), and a decode-like frame used to make ten of them (``scripts/bench_frame.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numba as nb
import numpy as np

from ..constants import OP_APPEND, OP_CLEAR, OP_SET
from ..rows.checksum import C_COUNT, GroupConsts, segment_index
from ..rows.kernels import Before
from ..rows.messages import GroupBatch


class Limits(Protocol):
    """What a frame must fit (``wire.WireLimits``)."""

    num_rows: int
    width_array: np.ndarray  # i64[G] pages per row of each group
    max_bytes: int


# -- value checks ---------------------------------------------------------------------

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


# -- reading a frame --------------------------------------------------------------------

# Canonical key order of a batch map (encode's), as ASCII codes.
_KEYS = ("v", "epoch", "base", "shard", "gen", "sched", "done", "copies", "touched", "groups")
_GROUP_KEYS = ("op", "row", "start", "count", "pages")


def _ascii(keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Keys as ``(u8[n, 8] padded codes, i64[n] lengths)`` for the compiled scan."""
    codes = np.zeros((len(keys), 8), np.uint8)
    for i, k in enumerate(keys):
        codes[i, : len(k)] = np.frombuffer(k.encode(), np.uint8)
    return codes, np.array([len(k) for k in keys], np.int64)


_KEY_CODES, _KEY_LENS = _ascii(_KEYS)
_GROUP_CODES, _GROUP_LENS = _ascii(_GROUP_KEYS)
_K_V, _K_EPOCH, _K_BASE, _K_SHARD, _K_GEN, _K_SCHED, _K_DONE, _K_COPIES, _K_TOUCHED, _K_GROUPS = (
    range(10)
)
# unsigned, so the compiled comparisons with parsed u64 values stay exact
_MAX_EPOCH = np.uint64(2**63 - 1)
_MAX_SHARD = np.uint64(2**31 - 1)
_MAX_TOKENS = 2**31 - 1
# The scan copies int32 columns byte for byte: right only on a little-endian host.
ENABLED = sys.byteorder == "little"


@nb.njit(cache=True, nogil=True)
def _uint(data, pos):  # pragma: no cover - jitted
    """``(ok, value, next pos)`` of a msgpack unsigned int (fixint or uint 8..64)."""
    n = len(data)
    if pos >= n:
        return False, np.uint64(0), pos
    b = data[pos]
    if b <= 0x7F:
        return True, np.uint64(b), pos + 1
    if b == 0xCC:
        size = 1
    elif b == 0xCD:
        size = 2
    elif b == 0xCE:
        size = 4
    elif b == 0xCF:
        size = 8
    else:
        return False, np.uint64(0), pos
    if pos + 1 + size > n:
        return False, np.uint64(0), pos
    v = np.uint64(0)
    for i in range(size):
        v = (v << np.uint64(8)) | np.uint64(data[pos + 1 + i])
    return True, v, pos + 1 + size


@nb.njit(cache=True, nogil=True)
def _bin(data, pos):  # pragma: no cover - jitted
    """``(ok, start, length, next pos)`` of a msgpack bin 8/16/32."""
    n = len(data)
    if pos >= n:
        return False, 0, 0, pos
    b = data[pos]
    if b == 0xC4:
        size = 1
    elif b == 0xC5:
        size = 2
    elif b == 0xC6:
        size = 4
    else:
        return False, 0, 0, pos
    if pos + 1 + size > n:
        return False, 0, 0, pos
    length = 0
    for i in range(size):
        length = (length << 8) | np.int64(data[pos + 1 + i])
    start = pos + 1 + size
    if start + length > n:
        return False, 0, 0, pos
    return True, start, length, start + length


@nb.njit(cache=True, nogil=True)
def _key(data, pos, codes, lens, first):  # pragma: no cover - jitted
    """``(index of the fixstr key at pos among codes[first:], next pos)``; -1 if none."""
    n = len(data)
    if pos >= n or data[pos] & 0xE0 != 0xA0:
        return -1, pos
    size = data[pos] & 0x1F
    if pos + 1 + size > n:
        return -1, pos
    for k in range(first, len(lens)):
        if lens[k] != size:
            continue
        same = True
        for i in range(size):
            if data[pos + 1 + i] != codes[k, i]:
                same = False
                break
        if same:
            return k, pos + 1 + size
    return -1, pos


@nb.njit(cache=True, nogil=True)
def _copy_i32(data, start, length, out, at):  # pragma: no cover - jitted
    """Copy ``length`` bytes of little-endian int32 values into ``out[at:]``."""
    dst = out.view(np.uint8)
    base = 4 * at
    for i in range(length):
        dst[base + i] = data[start + i]


@nb.njit(cache=True, nogil=True)
def _scan(data, version, num_rows, widths):  # pragma: no cover - jitted
    n_groups = len(widths)
    empty = np.empty(0, np.int32)
    no_offs = np.empty(0, np.int64)
    fail = (False, 0, 0, 0, np.uint64(0), 0, empty, no_offs, False)
    pos = 0
    if len(data) == 0 or data[0] & 0xF0 != 0x80:
        return fail
    entries = data[0] & 0x0F
    pos = 1
    epoch = np.uint64(0)
    base = np.uint64(0)
    shard = np.uint64(0)
    gen = np.uint64(0)
    touched = np.uint64(0)
    seen = np.zeros(10, np.bool_)
    spans = np.zeros((n_groups, 5, 2), np.int64)  # (byte start, byte length) per column
    sched_at = np.zeros(2, np.int64)  # byte starts of sched and done
    next_key = 0
    for _ in range(entries):
        key, pos = _key(data, pos, _KEY_CODES, _KEY_LENS, next_key)
        if key < 0 or key == _K_COPIES:
            return fail
        next_key = key + 1
        seen[key] = True
        if key in (_K_SCHED, _K_DONE):
            ok, start, length, pos = _bin(data, pos)
            if not ok or length != 4 * num_rows:
                return fail
            sched_at[key - _K_SCHED] = start
        elif key == _K_GROUPS:
            if n_groups > 15 or pos >= len(data) or data[pos] != 0x90 + n_groups:
                return fail
            pos += 1
            for g in range(n_groups):
                if pos >= len(data) or data[pos] != 0x85:
                    return fail
                pos += 1
                for c in range(5):
                    k, pos = _key(data, pos, _GROUP_CODES, _GROUP_LENS, c)
                    if k != c:
                        return fail
                    ok, start, length, pos = _bin(data, pos)
                    if not ok or length % 4:
                        return fail
                    spans[g, c, 0] = start
                    spans[g, c, 1] = length
        else:
            ok, value, pos = _uint(data, pos)
            if not ok:
                return fail
            if key == _K_V:
                if value != np.uint64(version):
                    return fail
            elif key == _K_EPOCH:
                epoch = value
            elif key == _K_BASE:
                base = value
            elif key == _K_SHARD:
                shard = value
            elif key == _K_TOUCHED:
                touched = value
            else:
                gen = value
    if pos != len(data):
        return fail
    if not (seen[_K_V] and seen[_K_EPOCH] and seen[_K_BASE] and seen[_K_SHARD]):
        return fail
    if not seen[_K_GROUPS] or seen[_K_SCHED] != seen[_K_DONE]:
        return fail
    if epoch > _MAX_EPOCH or base >= epoch or shard > _MAX_SHARD or touched > _MAX_SHARD:
        return fail
    # Every group's columns into one aligned i32 array (then the schedule's two columns,
    # if any), then their values.
    offs = np.zeros(5 * n_groups + 1, np.int64)
    for g in range(n_groups):
        for c in range(5):
            offs[5 * g + c + 1] = offs[5 * g + c] + spans[g, c, 1] // 4
    n = offs[5 * n_groups]
    flat = np.empty(n + (2 * num_rows if seen[_K_SCHED] else 0), np.int32)
    for g in range(n_groups):
        for c in range(5):
            _copy_i32(data, spans[g, c, 0], spans[g, c, 1], flat, offs[5 * g + c])
    for g in range(n_groups):
        o = 5 * g
        k = offs[o + 2] - offs[o + 1]
        if offs[o + 1] - offs[o] != k or offs[o + 3] - offs[o + 2] != k:
            return fail
        if offs[o + 4] - offs[o + 3] != k or k > num_rows:
            return fail
        code, _, written = check_values(
            flat[offs[o] : offs[o + 1]],
            flat[offs[o + 1] : offs[o + 2]],
            flat[offs[o + 2] : offs[o + 3]],
            flat[offs[o + 3] : offs[o + 4]],
            flat[offs[o + 4] : offs[o + 5]],
            num_rows,
            widths[g],
        )
        if code != 0 or written != offs[o + 5] - offs[o + 4]:
            return fail
    if seen[_K_SCHED]:
        _copy_i32(data, sched_at[0], 4 * num_rows, flat, n)
        _copy_i32(data, sched_at[1], 4 * num_rows, flat, n + num_rows)
        for r in range(num_rows):
            sched, done = flat[n + r], flat[n + num_rows + r]
            if sched < 0 or done < 0 or np.int64(sched) + np.int64(done) > _MAX_TOKENS:
                return fail
    has_sched = seen[_K_SCHED]
    return (
        True, np.int64(epoch), np.int64(base), np.int64(shard), gen, np.int64(touched), flat,
        offs, has_sched,
    )  # fmt: skip


def scan(data: bytes, version: int, num_rows: int, widths: np.ndarray) -> tuple | None:
    """``(epoch, base, shard, generation, touched, i32[n] columns, i64[5 G + 1] offsets,
    has_sched)`` of a canonical batch message that the strict decoder would accept, else
    None. The columns are the groups' one after the other (``offs``), then, with a
    schedule, its ``sched`` and ``done`` columns (``num_rows`` each). ``widths`` is
    ``i64[G]``."""
    if not ENABLED:
        return None
    ok, epoch, base, shard, gen, touched, flat, offs, has_sched = _scan(
        data, version, num_rows, widths
    )
    if not ok:
        return None
    return epoch, base, shard, int(gen), touched, flat, offs, has_sched


# -- applying a batch ------------------------------------------------------------------


@nb.njit(cache=True, nogil=True)
def _apply_all(
    tables, counts, inners, col_ws, mixes, mix_offsets, cols, offs, block_rows, num_blocks,
    buckets,
):  # pragma: no cover - jitted  # fmt: skip
    n_groups = len(tables)
    # 1. Every APPEND of every group must start at its row's held count: checked before
    #    anything is written, so a refused batch changes nothing.
    k_total = 0
    for g in range(n_groups):
        o = 5 * g
        held = counts[g]
        for i in range(offs[o + 1] - offs[o]):
            r = cols[offs[o + 1] + i]
            if cols[offs[o] + i] == OP_APPEND and held[r] != cols[offs[o + 2] + i]:
                none = np.empty(0, np.int32)
                return g, i, np.uint64(0), 0, 0, none, np.empty(0, np.int64), none.reshape(0, 0)
        k_total += offs[o + 1] - offs[o]
    # 2. Sizes: pages of rewritten rows (kept for a rollback), changed cells per device
    #    block and group.
    row_offs = np.zeros(n_groups + 1, np.int64)
    per_block = np.zeros((max(num_blocks, 1), n_groups), np.int64)
    for g in range(n_groups):
        o = 5 * g
        held = counts[g]
        rewritten = 0
        for i in range(offs[o + 1] - offs[o]):
            r = cols[offs[o + 1] + i]
            if block_rows > 0:
                per_block[r // block_rows, g] += (
                    max(cols[offs[o + 3] + i], held[r]) - cols[offs[o + 2] + i]
                )
            if cols[offs[o] + i] != OP_APPEND:
                rewritten += held[r]
        row_offs[g + 1] = row_offs[g] + rewritten
    # 3. The packed device update, per block: [k_0 .. k_G-1, then per group K rows, K
    #    columns, K values], K the smallest bucket that holds every group's cells there.
    biggest = 0
    for b in range(num_blocks):
        for g in range(n_groups):
            biggest = max(biggest, per_block[b, g])
    bucket = 0
    if block_rows > 0:
        for size in buckets:
            if size >= biggest:
                bucket = size
                break
    width = n_groups + 3 * n_groups * bucket
    # Entries past each count are never read: left as they are.
    packed = np.empty((num_blocks if bucket else 0, width if bucket else 0), np.int32)
    # What the caller gets back, in two arrays (each array handed back to Python costs a
    # few us at commit cadence): undo i32 [held counts (k) | rewritten 0/1 (k) | pages of
    # the rewritten rows], meta i64 [row_offs (G + 1) | terms before, u64 bits (k) |
    # touched blocks].
    meta = np.empty(n_groups + 1 + k_total + num_blocks, np.int64)
    meta[: n_groups + 1] = row_offs
    n_touched = 0
    for b in range(num_blocks if bucket else 0):
        for g in range(n_groups):
            packed[b, g] = per_block[b, g]
        if per_block[b].sum():
            meta[n_groups + 1 + k_total + n_touched] = b
            n_touched += 1
    fill = np.zeros((max(num_blocks, 1), n_groups), np.int64)
    # 4. Apply, as kernels._apply does each group, keeping what each row held before.
    undo = np.empty(2 * k_total + row_offs[n_groups], np.int32)
    old_counts = undo[:k_total]
    replaced = undo[k_total : 2 * k_total]
    old_rows = undo[2 * k_total :]
    old_inner = meta[n_groups + 1 : n_groups + 1 + k_total]
    delta = np.uint64(0)
    e = 0
    for g in range(n_groups):
        o = 5 * g
        table, held, inner = tables[g], counts[g], inners[g]
        col_w, mix, offset = col_ws[g], mixes[g], mix_offsets[g]
        base = n_groups + 3 * g * bucket
        j = row_offs[g]
        p = offs[o + 4]
        for i in range(offs[o + 1] - offs[o]):
            r = cols[offs[o + 1] + i]
            s, c = cols[offs[o + 2] + i], cols[offs[o + 3] + i]
            had = held[r]
            old_counts[e] = had
            old_inner[e] = np.int64(inner[r])  # the u64's bits
            replaced[e] = cols[offs[o] + i] != OP_APPEND
            if replaced[e]:
                for col in range(had):
                    old_rows[j + col] = table[r, col]
                j += had
            e += 1
            # An append re-reads the row's kept prefix, so the terms (and the checksum the
            # shard reports) attest to what this table really holds.
            acc = np.uint64(s) * C_COUNT
            for col in range(s):
                acc += np.uint64(table[r, col]) * col_w[col]
            blk = r // block_rows if bucket else 0
            q = fill[blk, g]
            for col in range(s, max(c, had)):
                v = 0
                if col < c:
                    v = cols[p]
                    p += 1
                    acc += np.uint64(v) * col_w[col]
                table[r, col] = v
                if bucket:
                    packed[blk, base + q] = r - blk * block_rows
                    packed[blk, base + bucket + q] = col
                    packed[blk, base + 2 * bucket + q] = v
                    q += 1
            fill[blk, g] = q
            acc += np.uint64(c - s) * C_COUNT
            held[r] = c
            delta += mix[offset + r] * (acc - inner[r])
            inner[r] = acc
    return -1, -1, delta, k_total, n_touched, undo, meta, packed


class Consts(NamedTuple):
    """A shard's per-group checksum constants as :func:`apply_groups` takes them (built
    once from its ``GroupConsts``)."""

    col_ws: tuple[np.ndarray, ...]  # u64[P_g] per group
    mixes: tuple[np.ndarray, ...]  # u64[>= offset + rows] per group, read-only
    offsets: np.ndarray  # i64[G]
    source: Sequence[GroupConsts]  # what it was built from

    @classmethod
    def of(cls, consts: Sequence[GroupConsts]) -> Consts:
        def readonly(a: np.ndarray) -> np.ndarray:
            view = np.ascontiguousarray(a, np.uint64).view()
            view.flags.writeable = False
            return view

        return cls(
            tuple(np.ascontiguousarray(c.col_w, np.uint64) for c in consts),
            tuple(readonly(c.mix) for c in consts),
            np.array([c.offset for c in consts], np.int64),
            consts,
        )


class Applied(NamedTuple):
    """What :func:`apply_groups` did.

    ``bad`` is ``(group, entry)`` of an APPEND that does not start at its row's held
    count (then nothing was written, and the arrays are empty), else None. ``size``
    entries (row updates, group after group) held :attr:`counts` (i32) and :attr:`inner`
    (u64 terms) and were :attr:`replaced` (rewritten from slot 0, else appended to) before
    it; group ``g``'s rewritten rows held ``old_rows[row_offs[g]:row_offs[g + 1]]``, their
    pages one row after the other. ``packed`` is ``i32[blocks, L]``, per device block the
    update ``device.publish_packed`` sends (:attr:`touched`: the blocks with a change), or
    empty when a block has more changed cells than the largest bucket. The other arrays are
    views of ``undo`` and ``meta`` (see ``_apply_all``), cut when asked for.
    """

    bad: tuple[int, int] | None
    delta: int
    size: int
    groups: int
    n_touched: int
    undo: np.ndarray
    meta: np.ndarray
    packed: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        return self.undo[: self.size]

    @property
    def replaced(self) -> np.ndarray:
        return self.undo[self.size : 2 * self.size].astype(np.bool_)

    @property
    def old_rows(self) -> np.ndarray:
        return self.undo[2 * self.size :]

    @property
    def row_offs(self) -> np.ndarray:
        return self.meta[: self.groups + 1]

    @property
    def inner(self) -> np.ndarray:
        return self.meta[self.groups + 1 : self.groups + 1 + self.size].view(np.uint64)

    @property
    def touched(self) -> np.ndarray:
        at = self.groups + 1 + self.size
        return self.meta[at : at + self.n_touched]

    def before(self, group: int, first: int, size: int, width: int) -> Before:
        """Group ``group``'s :class:`~.kernels.Before`: its ``size`` entries start at entry
        ``first``, its rows hold ``width`` pages."""
        e = slice(first, first + size)
        counts, replaced = self.counts[e], self.replaced[e]
        had = counts[replaced]
        rows = np.zeros((had.size, width), np.int32)
        r, c = segment_index(np.arange(had.size), np.zeros_like(had), had)
        offs = self.row_offs
        rows[r, c] = self.old_rows[offs[group] : offs[group + 1]]
        return Before(counts.copy(), self.inner[e].copy(), replaced, rows)

    def cells(self, batch: GroupBatch, first: int, lo: int) -> tuple[np.ndarray, np.ndarray]:
        """The cells this group's ``batch`` (its entries start at entry ``first``) changed:
        ``(i64 global rows, non-decreasing; i64 columns)``, the written ones and the tail
        a shorter row left behind."""
        had = self.counts[first : first + batch.size]
        rows, cols = segment_index(batch.row, batch.start, np.maximum(batch.count, had))
        return rows.astype(np.int64) + lo, cols.astype(np.int64)


def _applied(out: tuple, groups: int) -> Applied:
    bad_g, bad_i, delta, size, n_touched, undo, meta, packed = out
    bad = None if bad_g < 0 else (bad_g, bad_i)
    return Applied(bad, int(delta), size, groups, n_touched, undo, meta, packed)


_NO_BUCKETS = np.zeros(0, np.int64)


def apply_groups(
    tables: tuple[np.ndarray, ...],
    counts: tuple[np.ndarray, ...],
    inners: tuple[np.ndarray, ...],
    consts: Consts,
    cols: np.ndarray,
    offs: np.ndarray,
    blocks: tuple[int, int, np.ndarray] | None = None,
) -> Applied:
    """Apply a shard batch to every group in one compiled pass: check its APPENDs against
    the held counts (refusing it, unchanged, if one does not fit), apply it to ``tables``
    (``i32[rows, P_g]``), ``counts`` (``i32[rows]``) and terms ``inners`` (``u64[rows]``)
    in place, keep what it replaced, and pack the device update.

    ``cols`` is ``i32[n]``, the five columns of every group one after the other (op, row,
    start, count, pages of group 0, then of group 1, ...), and ``offs`` ``i64[5 G + 1]``
    where each starts (:func:`flat_columns`). ``blocks`` is ``(rows per device block,
    blocks, bucket sizes i64[])``, block 0 starting at local row 0 (``DeviceRows.packing``),
    or None to pack nothing.
    """
    block_rows, num_blocks, buckets = (0, 0, _NO_BUCKETS) if blocks is None else blocks
    out = _apply_all(
        tables, counts, inners, consts.col_ws, consts.mixes, consts.offsets, cols, offs,
        block_rows, num_blocks, buckets,
    )  # fmt: skip
    return _applied(out, len(tables))


def flat_columns(groups: Sequence[GroupBatch]) -> tuple[np.ndarray, np.ndarray]:
    """The columns of ``groups`` as :func:`apply_groups` takes them: ``(i32[n] every column
    one after the other, i64[5 G + 1] where each starts)``."""
    arrays = [a for g in groups for a in (g.op, g.row, g.start, g.count, g.pages)]
    offs = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([a.size for a in arrays], out=offs[1:])
    return np.concatenate(arrays, dtype=np.int32), offs


def warm_up(
    tables: Sequence[np.ndarray],
    counts: Sequence[np.ndarray],
    inners: Sequence[np.ndarray],
    consts: Consts,
    blocks: tuple[int, int, np.ndarray] | None,
) -> None:
    """Compile (or load from numba's cache) :func:`apply_groups` for these groups, with the
    columns of a decoded frame (read-only) and of a batch handed over as a value, writing
    nothing (an empty batch)."""
    empty = GroupBatch.empty()
    cols, offs = flat_columns([empty] * len(tables))
    readonly = cols.view()
    readonly.flags.writeable = False
    for c in (cols, readonly):
        for b in (blocks, None):
            apply_groups(tuple(tables), tuple(counts), tuple(inners), consts, c, offs, b)


# -- both in one call ---------------------------------------------------------------------


@nb.njit(cache=True, nogil=True)
def _apply_frame(
    data, version, num_rows, widths, shard_id, held_epoch, held_generation, steps, tables, counts,
    inners, col_ws, mixes, mix_offsets, block_rows, num_blocks, buckets,
):  # pragma: no cover - jitted  # fmt: skip
    ok, epoch, base, shard, gen, touched, flat, offs, has_sched = _scan(
        data, version, num_rows, widths
    )
    fits = ok and gen == held_generation and shard == shard_id and base == held_epoch
    fits = fits and epoch != held_epoch and (steps or not has_sched)
    if fits:
        out = _apply_all(
            tables, counts, inners, col_ws, mixes, mix_offsets, flat, offs, block_rows,
            num_blocks, buckets,
        )  # fmt: skip
        if out[0] < 0:  # every APPEND fit: applied
            return True, epoch, base, gen, touched, flat, offs, has_sched, out
    none = np.empty(0, np.int32)
    offsets = np.empty(0, np.int64)
    nothing = (0, 0, np.uint64(0), 0, 0, none, offsets, none.reshape(0, 0))
    return False, 0, 0, np.uint64(0), 0, none, offsets, False, nothing


class Frame(NamedTuple):
    """A frame :func:`apply_frame` applied: its header, its columns (as :func:`scan` gives
    them) and what the apply did."""

    epoch: int
    base: int
    generation: int
    touched: int
    flat: np.ndarray
    offs: np.ndarray
    has_sched: bool
    applied: Applied


def apply_frame(
    data: bytes,
    version: int,
    limits: Limits,
    shard_id: int,
    epoch: int,
    generation: int,
    steps: bool,
    state: tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], tuple[np.ndarray, ...]],
    consts: Consts,
    blocks: tuple[int, int, np.ndarray] | None,
) -> Frame | None:
    """Apply wire bytes ``data`` to a shard's groups ``state`` (``(tables, counts, terms)``
    as :func:`apply_groups` takes them) if they are a canonical batch of wire ``version``
    for shard ``shard_id`` holding ``epoch`` and obeying ``generation``, building on that
    epoch, with a schedule only if the shard ``steps``, and every APPEND fits; else change
    nothing and return None."""
    if not ENABLED or type(data) is not bytes or len(data) > limits.max_bytes:
        return None
    block_rows, num_blocks, buckets = (0, 0, _NO_BUCKETS) if blocks is None else blocks
    tables, counts, inners = state
    ok, epoch, base, gen, touched, flat, offs, has_sched, out = _apply_frame(
        data, version, limits.num_rows, limits.width_array, shard_id, epoch, np.uint64(generation),
        steps, tables, counts, inners, consts.col_ws, consts.mixes, consts.offsets,
        block_rows, num_blocks, buckets,
    )  # fmt: skip
    if not ok:
        return None
    return Frame(epoch, base, int(gen), touched, flat, offs, has_sched, _applied(out, len(tables)))
