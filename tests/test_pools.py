"""KV-local page pools: a row may only hold page ids of its own shard's pool.

Every refused call leaves host tables, counts and device snapshots byte-identical; the
reference for what is allowed is written here from the rule (shard s owns page ids
[s*P, (s+1)*P)), independently of the implementation.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sharded_pagetable as sp

ROWS, MAX_LEN, PAGE_SIZES, SHARDS, POOL = 32, 256, (16, 64), 4, 100
RPS = ROWS // SHARDS


@pytest.fixture(scope="module")
def table():
    t = sp.ShardedPageTable(ROWS, MAX_LEN, 128, PAGE_SIZES, num_shards=SHARDS, pages_per_shard=POOL)
    yield t
    t.close()


def pool(row: int) -> range:
    s = row // RPS
    return range(s * POOL, (s + 1) * POOL)


def state(t: sp.ShardedPageTable):
    return (
        [t[g].get_cpu_tensor().copy() for g in range(len(PAGE_SIZES))],
        [t[g].num_pages_per_row.copy() for g in range(len(PAGE_SIZES))],
        [t.device_snapshot(g) for g in range(len(PAGE_SIZES))],
    )


def assert_unchanged(t, before) -> None:
    after = state(t)
    for a, b in zip(before, after, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.tobytes() == y.tobytes()


def seed_rows(t: sp.ShardedPageTable) -> None:
    t.clear()
    for row in (0, 1, RPS, 3 * RPS + 2):
        base = pool(row).start
        t.add_row([[base + 1, base + 2], [base + 3]], row)
    t.commit(ROWS)


@pytest.mark.parametrize(
    "op",
    [
        lambda t, page: t.append_row([[page], []], 1),
        lambda t, page: t.append_row([[], [page]], 1),
        lambda t, page: t.add_row([[pool(1).start], [page]], 1),
        lambda t, page: t.append_rows_batch([[[pool(0).start + 5], []], [[page], []]], [0, 1]),
        lambda t, page: t.append_rows_batch([[[page], []]], [np.int64(1)]),
        lambda t, page: t.append_row([np.array([pool(1).start, page]), []], 1),
    ],
    ids=["append", "append-group1", "add", "batch", "batch-np-row", "append-array"],
)
@pytest.mark.parametrize("page", [POOL, 2 * POOL + 7, SHARDS * POOL - 1])
def test_foreign_page_is_refused_and_nothing_changes(table, op, page):
    seed_rows(table)
    before = state(table)
    with pytest.raises(ValueError, match=rf"page {page}.*row 1's pool.*shard 0.*\[0, {POOL}\)"):
        op(table, page)
    assert_unchanged(table, before)
    assert not table.commit(ROWS).changed


def test_page_past_every_pool_is_out_of_range(table):
    seed_rows(table)
    before = state(table)
    with pytest.raises(ValueError, match="out of range"):
        table.append_row([[SHARDS * POOL], []], 1)
    assert_unchanged(table, before)


def test_own_pool_pages_and_same_shard_moves_and_swaps_are_allowed(table):
    seed_rows(table)
    table.append_row([[pool(1).stop - 1], [pool(1).start]], 1)
    table.move_row(0, 3)  # both on shard 0
    table.swap_row(1, 2)
    table.append_rows_batch([[[pool(RPS).start + 9], []]], [RPS])
    table.commit(ROWS)
    snap = table.device_snapshot(0)
    assert snap[3, :3].tolist() == [1, 2, 0]
    assert snap[2, :4].tolist() == [1, 2, POOL - 1, 0]
    assert snap[1].sum() == 0
    assert snap[RPS, :4].tolist() == [POOL + 1, POOL + 2, POOL + 9, 0]


@pytest.mark.parametrize("op", ["move_row", "swap_row"])
def test_cross_shard_move_or_swap_without_pages_is_refused_naming_them(table, op):
    seed_rows(table)
    before = state(table)
    src, tgt = 0, 3 * RPS + 2  # shard 0 -> shard 3
    with pytest.raises(ValueError) as info:
        getattr(table, op)(src, tgt)
    message = str(info.value)
    assert "shards 0 -> 3" in message and "[2, 1] per group" in message
    assert f"[{3 * POOL}, {4 * POOL})" in message
    if op == "swap_row":
        assert f"row {src} needs [2, 1] per group of [0, {POOL})" in message
    assert_unchanged(table, before)


def test_pool_sizes_are_checked():
    with pytest.raises(ValueError, match="pages_per_shard must be a positive int"):
        sp.ShardedPageTable(ROWS, MAX_LEN, 128, PAGE_SIZES, num_shards=SHARDS, pages_per_shard=0)
    with pytest.raises(ValueError, match="num_pages=10 disagrees"):
        sp.ShardedPageTable(
            ROWS, MAX_LEN, 128, PAGE_SIZES, num_shards=SHARDS, pages_per_shard=5, num_pages=10
        )
    with pytest.raises(ValueError, match="do not fit int32"):
        sp.ShardedPageTable(
            ROWS, MAX_LEN, 128, PAGE_SIZES, num_shards=SHARDS, pages_per_shard=2**30
        )


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(st.integers(0, ROWS - 1), st.integers(0, SHARDS * POOL - 1), st.booleans()),
        min_size=1,
        max_size=12,
    )
)
def test_random_appends_follow_the_pool_rule(table, calls):
    """Accepted exactly when the page lies in the row's pool; otherwise nothing changes."""
    table.clear()
    expected = {r: [] for r in range(ROWS)}
    for row, page, replace in calls:
        allowed = page in pool(row)
        before = state(table)
        op = table.add_row if replace else table.append_row
        if allowed:
            op([[page], []], row)
            expected[row] = [page] if replace else [*expected[row], page]
        else:
            with pytest.raises(ValueError, match="pool"):
                op([[page], []], row)
            assert_unchanged(table, before)
    table.commit(ROWS)
    snap = table.device_snapshot(0)
    for row, pages in expected.items():
        assert snap[row, : len(pages) + 1].tolist() == [*pages, 0]


def test_pages_per_shard_from_a_config():
    from sharded_pagetable.config import ConfigError, TableConfig

    base = {
        "max_num_reqs": ROWS,
        "max_model_len": MAX_LEN,
        "max_num_batched_tokens": 128,
        "page_sizes": list(PAGE_SIZES),
        "num_shards": SHARDS,
        "warmup": False,
    }
    with sp.ShardedPageTable.from_config(
        TableConfig.from_dict({**base, "pages_per_shard": 50})
    ) as t:
        with pytest.raises(ValueError, match="row 0's pool"):
            t.append_row([[60], []], 0)
        t.append_row([[49], []], 0)
    for bad in (0, -1, True, 2**31):
        with pytest.raises(ConfigError, match="pages_per_shard"):
            TableConfig.from_dict({**base, "pages_per_shard": bad})
