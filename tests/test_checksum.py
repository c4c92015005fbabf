"""The incremental checksum equals the one recomputed from scratch, and tells tables apart.

``from_scratch`` below re-implements the formula of ``checksum.py``'s docstring with Python
ints (mod 2**64) and no numpy::

    w(c)      = splitmix64(c ^ K_COL) | 1
    mix(g, r) = splitmix64(((g << 32) | r) ^ K_ROW) | 1
    inner(r)  = count * C + sum_{c < count} p[c] * w(c)
    checksum  = sum_{g, r} mix(g, r) * inner_g(r)
"""

from __future__ import annotations

import numpy as np
import pytest
from batch_helpers import apply_group
from hypothesis import given, settings
from hypothesis import strategies as st

from sharded_pagetable.constants import MAX_PAGE_ID, PAGE_TABLE_PADDING_VAL
from sharded_pagetable.routing.layout import ShardLayout
from sharded_pagetable.routing.mesh import build_mesh, row_sharding
from sharded_pagetable.rows import checksum
from sharded_pagetable.rows.messages import OP_APPEND, OP_CLEAR, OP_SET, GroupBatch, ShardBatch
from sharded_pagetable.shard.shard import Shard, ShardSpec
from sharded_pagetable.shard.wire import encode

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)
M64 = 2**64 - 1
K_COL = 0x9E3779B97F4A7C15
K_ROW = 0xD1B54A32D192ED03
C_COUNT = 0xA0761D6478BD642F


def splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def col_weight(c: int) -> int:
    return splitmix64(c ^ K_COL) | 1


def row_mix(g: int, r: int) -> int:
    return splitmix64(((g << 32) | r) ^ K_ROW) | 1


def inner_scratch(row_pages: list[int]) -> int:
    total = len(row_pages) * C_COUNT
    for c, p in enumerate(row_pages):
        total += p * col_weight(c)
    return total & M64


def from_scratch(tables: list[np.ndarray], counts: list[np.ndarray], row_offset: int = 0) -> int:
    """Checksum of whole tables, rows numbered from ``row_offset``; pure Python ints."""
    total = 0
    for g, (table, cnt) in enumerate(zip(tables, counts, strict=True)):
        for r in range(table.shape[0]):
            pages = [int(p) for p in table[r, : int(cnt[r])]]
            total += row_mix(g, r + row_offset) * inner_scratch(pages)
    return total & M64


# --------------------------------------------------------------------------- primitives


def test_splitmix64_matches_python() -> None:
    xs = [0, 1, 2, 12345, 2**32, 2**63, M64, K_COL, K_ROW]
    got = checksum.splitmix64(np.asarray(xs, dtype=np.uint64))
    assert [int(v) for v in got] == [splitmix64(x) for x in xs]


@settings(SETTINGS, max_examples=50)
@given(st.integers(0, 3), st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=20))
def test_row_mix_matches_python(group: int, rows: list[int]) -> None:
    got = checksum.row_mix(group, np.asarray(rows, dtype=np.int64))
    assert [int(v) for v in got] == [row_mix(group, r) for r in rows]
    assert all(int(v) % 2 == 1 for v in got)


@settings(SETTINGS, max_examples=50)
@given(st.data())
def test_segment_index(data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 8))
    starts = data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    lens = data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    rows = np.arange(n) * 3 + 1
    stops = [s + k for s, k in zip(starts, lens, strict=True)]
    r, c = checksum.segment_index(rows, np.asarray(starts), np.asarray(stops))
    want = [(int(rows[i]), col) for i in range(n) for col in range(starts[i], stops[i])]
    assert list(zip(r.tolist(), c.tolist(), strict=True)) == want


# --------------------------------------------------------------------------- incremental


@st.composite
def step(draw, counts: np.ndarray, width: int) -> GroupBatch:
    """One group's batch against held ``counts`` (APPENDs start at the held count)."""
    rows = sorted(draw(st.sets(st.integers(0, counts.size - 1), max_size=counts.size)))
    cols: dict[str, list[int]] = {k: [] for k in ("op", "row", "start", "count", "pages")}
    page = st.one_of(st.integers(0, 20), st.integers(0, MAX_PAGE_ID))
    for r in rows:
        ops = [OP_SET, OP_CLEAR] + ([OP_APPEND] if 0 < counts[r] < width else [])
        op = draw(st.sampled_from(ops))
        if op == OP_SET:
            start, count = 0, draw(st.integers(0, width))
        elif op == OP_CLEAR:
            start = count = 0
        else:
            start = int(counts[r])
            count = draw(st.integers(start + 1, width))
        for key, value in (("op", op), ("row", r), ("start", start), ("count", count)):
            cols[key].append(value)
        cols["pages"].extend(draw(st.lists(page, min_size=count - start, max_size=count - start)))
    return GroupBatch(*(np.asarray(cols[k], dtype=np.int32) for k in cols))


@SETTINGS
@given(st.data())
def test_incremental_equals_from_scratch(data: st.DataObject) -> None:
    widths = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    num_rows = data.draw(st.integers(1, 12))
    offset = data.draw(st.sampled_from([0, 7, 1024, 2**20]))  # global row of local row 0
    tables = [np.full((num_rows, w), PAGE_TABLE_PADDING_VAL, np.int32) for w in widths]
    counts = [np.zeros(num_rows, np.int32) for _ in widths]
    inner = [np.zeros(num_rows, np.uint64) for _ in widths]
    total = 0
    for _ in range(data.draw(st.integers(1, 8))):
        for g, w in enumerate(widths):
            gb = data.draw(step(counts[g], w))
            old = inner[g][gb.row]
            new = checksum.updated_inner(old, gb.start, gb.count, gb.pages)
            total = checksum.add(total, checksum.total_delta(g, gb.row + offset, old, new))
            apply_group(tables[g], counts[g], gb)
            inner[g][gb.row] = new
            # the per-row terms match the formula as well
            for r in gb.row.tolist():
                assert int(inner[g][r]) == inner_scratch(tables[g][r, : counts[g][r]].tolist())
        assert total == from_scratch(tables, counts, offset)


@settings(SETTINGS, max_examples=40)
@given(st.data())
def test_shard_checksum_equals_from_scratch(data: st.DataObject) -> None:
    """The checksum a real ``Shard`` acknowledges after several epochs, and after rollback."""
    layout = ShardLayout(32, num_shards=2, num_blocks=8)
    widths = (4, 2)
    sharding = row_sharding(build_mesh(None, "data"), "data")
    shard_id = data.draw(st.integers(0, 1))
    shard = Shard(ShardSpec(shard_id, layout, widths, warmup=False), sharding)
    previous = 0
    for epoch in range(1, data.draw(st.integers(2, 5))):
        groups = tuple(data.draw(step(shard.counts[g], w)) for g, w in enumerate(widths))
        ack = shard.apply(encode(ShardBatch(epoch, epoch - 1, shard_id, groups)))
        assert ack.checksum == shard.checksum == from_scratch(shard.tables, shard.counts, shard.lo)
        if data.draw(st.booleans()):
            assert shard.rollback(epoch).checksum == previous
            assert previous == from_scratch(shard.tables, shard.counts, shard.lo)
            break
        previous = ack.checksum


# --------------------------------------------------------------------------- sensitivity


def checksum_of(rows_per_group: list[list[list[int]]], width: int = 6) -> int:
    tables, counts = [], []
    for rows in rows_per_group:
        t = np.zeros((len(rows), width), np.int32)
        c = np.zeros(len(rows), np.int32)
        for r, pages in enumerate(rows):
            t[r, : len(pages)] = pages
            c[r] = len(pages)
        tables.append(t)
        counts.append(c)
    # the library's functions, from empty rows
    total = 0
    for g, (t, c) in enumerate(zip(tables, counts, strict=True)):
        n = np.arange(c.size)
        r, col = checksum.segment_index(n, np.zeros_like(c), c)
        zero = np.zeros(c.size, np.uint64)
        new = checksum.updated_inner(zero, np.zeros_like(c), c, t[r, col])
        total = checksum.add(total, checksum.total_delta(g, n, zero, new))
    assert total == from_scratch(tables, counts)
    return total


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([[[1, 2], [3]]], [[[3], [1, 2]]]),  # rows swapped
        ([[[1, 2, 3]]], [[[3, 2, 1]]]),  # pages reordered within a row
        ([[[1, 2]]], [[[1, 2, 0]]]),  # an extra padding-valued page (count differs)
        ([[[]]], [[[0]]]),  # empty row vs one page 0
        ([[[5], []]], [[[], [5]]]),  # page moved to another row
        ([[[1]], [[2]]], [[[2]], [[1]]]),  # groups swapped
        ([[[1, 2], [1, 2]]], [[[1, 2], [1, 3]]]),  # one page differs
    ],
)
def test_different_tables_give_different_checksums(a, b) -> None:
    assert checksum_of(a) != checksum_of(b)


@SETTINGS
@given(st.data())
def test_swapped_rows_change_the_checksum(data: st.DataObject) -> None:
    num_rows = data.draw(st.integers(2, 8))
    rows = data.draw(
        st.lists(
            st.lists(st.integers(0, MAX_PAGE_ID), max_size=6), min_size=num_rows, max_size=num_rows
        )
    )
    i, j = data.draw(st.sampled_from([(i, j) for i in range(num_rows) for j in range(i)]))
    swapped = list(rows)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    if rows[i] == rows[j]:
        assert checksum_of([rows]) == checksum_of([swapped])
    else:
        assert checksum_of([rows]) != checksum_of([swapped])


@SETTINGS
@given(st.data())
def test_distinct_tables_distinct_checksums(data: st.DataObject) -> None:
    row = st.lists(st.integers(0, 50), max_size=6)
    a = data.draw(st.lists(row, min_size=1, max_size=6))
    b = data.draw(st.lists(row, min_size=len(a), max_size=len(a)))
    if a == b:
        assert checksum_of([a]) == checksum_of([b])
    else:
        assert checksum_of([a]) != checksum_of([b])
