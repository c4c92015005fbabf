"""The largest legitimate epochs: every row of every shard rewritten to full width and a full
KV copy plan (every row swapped across shards onto new pages). They fit the wire limits,
round-trip the wire, and commit on Ray over both commit channels; an epoch over the limits
is the caller's error, refused by the coordinator before anything is sent.

Expected tables and copy plans are computed here from the rules (a swap with page_ids gives
each row its new pages and copies the other row's KV into them, in slot order).
"""

from __future__ import annotations

import numpy as np
import pytest
from batch_helpers import full_width_group

import sharded_pagetable as sp
from sharded_pagetable.constants import MAX_PAGE_ID
from sharded_pagetable.rows.messages import Schedule, ShardBatch
from sharded_pagetable.shard.wire import WireLimits, decode, encode

ROWS, MAX_LEN, PAGE_SIZES, SHARDS = 16, 1024, (16, 64), 2
RPS = ROWS // SHARDS
WIDTHS = tuple(sp.cdiv(MAX_LEN, s) for s in PAGE_SIZES)  # (64, 16)
POOL = 2 * RPS * max(WIDTHS)  # two full sets of pages for every row of a shard


def pages(row: int, group: int, generation: int) -> list[int]:
    """Full-width page ids of ``row`` in its shard's pool; ``generation`` 0 or 1 picks a set."""
    shard, local = divmod(row, RPS)
    first = shard * POOL + (generation * RPS + local) * max(WIDTHS)
    return list(range(first, first + WIDTHS[group]))


def fill(t) -> None:
    for row in range(ROWS):
        t.add_row([pages(row, g, 0) for g in range(len(WIDTHS))], row)


def swap_everything(t) -> list[np.ndarray]:
    """Swap row i of shard 0 with row i of shard 1, each onto a fresh set of its own pool's
    pages; returns the copy plan this must publish, per group ``i32[2, K]`` by destination."""
    expected = [{} for _ in WIDTHS]
    for a in range(RPS):
        b = a + RPS
        for_a = [pages(a, g, 1) for g in range(len(WIDTHS))]
        for_b = [pages(b, g, 1) for g in range(len(WIDTHS))]
        t.swap_row(a, b, page_ids=(for_a, for_b))
        for g in range(len(WIDTHS)):
            # a's new pages take b's KV, b's new pages take a's (slot by slot).
            expected[g].update(zip(for_a[g], pages(b, g, 0), strict=True))
            expected[g].update(zip(for_b[g], pages(a, g, 0), strict=True))
    return [
        np.array([[plan[d] for d in sorted(plan)], sorted(plan)], np.int32) for plan in expected
    ]


def expected_table(group: int) -> np.ndarray:
    table = np.full((ROWS, WIDTHS[group]), sp.PAGE_TABLE_PADDING_VAL, np.int32)
    for row in range(ROWS):
        table[row] = pages(row, group, 1)
    return table


def largest_batch(limits: WireLimits) -> ShardBatch:
    """Every row SET to full width with the largest page ids, a schedule, and per group a
    copy plan of the largest size a shard accepts."""
    n = limits.num_rows
    groups = [full_width_group(n, w) for w in limits.widths]
    plans = []
    for g in range(len(limits.widths)):
        k = limits.max_copies(g)
        plans.append(np.stack([np.full(k, MAX_PAGE_ID, np.int32), MAX_PAGE_ID - np.arange(k)]))
    sched = Schedule(np.full(n, 2**30, np.int32), np.full(n, 2**30 - 1, np.int32))
    return ShardBatch(
        2**63 - 1, 2**63 - 2, 2**31 - 1, tuple(groups), 2**64 - 1, sched, tuple(plans)
    )


@pytest.mark.parametrize(
    "limits",
    [
        WireLimits(RPS, WIDTHS, ROWS),
        WireLimits(1, (1,), 64),
        WireLimits(4, (8,)),
    ],
)
def test_largest_legitimate_batch_round_trips_and_one_more_copy_is_refused(limits):
    batch = largest_batch(limits)
    limits.check(batch)  # the coordinator's guard lets it through
    data = encode(batch)
    assert len(data) <= limits.max_bytes
    back = decode(data, limits)
    assert back.rows == batch.rows
    for a, b in zip(back.kv_copies, batch.kv_copies, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(back.groups, batch.groups, strict=True):
        np.testing.assert_array_equal(a.pages, b.pages)
    np.testing.assert_array_equal(back.schedule.sched, batch.schedule.sched)
    # One copy more in group 0: the guard and the decoder both refuse it.
    plan = batch.kv_copies[0]
    extra = np.concatenate([plan, np.array([[0], [MAX_PAGE_ID - plan.shape[1]]], np.int32)], 1)
    over = ShardBatch(
        batch.epoch, batch.base, batch.shard, batch.groups, batch.generation, batch.schedule,
        (extra, *batch.kv_copies[1:]),
    )  # fmt: skip
    with pytest.raises(sp.BatchTooLargeError, match="copy plan of group 0"):
        limits.check(over)
    with pytest.raises(sp.WireFormatError, match="copies"):
        decode(encode(over), limits)


@pytest.fixture
def swapped():
    """A local table, filled and committed, with every row swapped across shards (pending):
    ``(table, the copy plan it must publish)``."""
    t = sp.ShardedPageTable(
        ROWS, MAX_LEN, 256, PAGE_SIZES, num_shards=SHARDS, pages_per_shard=POOL, warmup=False
    )
    try:
        fill(t)
        t.commit(ROWS)
        yield t, swap_everything(t)
    finally:
        t.close()


def test_swapping_every_row_across_shards_commits_locally(swapped):
    t, plan = swapped
    assert all(p.shape[1] == t.wire_limits.max_copies(g) for g, p in enumerate(plan))
    receipt = t.commit(ROWS)
    for g in range(len(WIDTHS)):
        np.testing.assert_array_equal(receipt.kv_copies[g], plan[g])
        np.testing.assert_array_equal(t.device_snapshot(g), expected_table(g))


def test_an_epoch_over_the_limits_is_refused_before_anything_is_sent(swapped):
    """Whatever makes an epoch too large, the coordinator refuses it as the caller's error:
    nothing is sent, published or failed, and the same changes commit once they fit."""
    t, plan = swapped
    before = [t.device_snapshot(g) for g in range(len(WIDTHS))], t.shard_status(), t.epoch
    limits = t.wire_limits
    t._committer.wire_limits = WireLimits(RPS, WIDTHS, ROWS // 2)  # half the copies fit
    with pytest.raises(sp.BatchTooLargeError, match="copy plan of group 0"):
        t.commit(ROWS)
    after = [t.device_snapshot(g) for g in range(len(WIDTHS))], t.shard_status(), t.epoch
    for a, b in zip(before[0], after[0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert before[1:] == after[1:]
    t._committer.wire_limits = limits
    receipt = t.commit(ROWS)  # no recovery was needed: the table never failed
    assert t.recoveries == [] and receipt.epoch == before[2] + 1
    np.testing.assert_array_equal(receipt.kv_copies[0], plan[0])


@pytest.mark.ray
@pytest.mark.multiprocess
@pytest.mark.parametrize("channel", ["socket", "actor"])
def test_largest_epoch_commits_on_ray(local_ray, channel):
    """Every row of both shards rewritten at full width with a full copy plan (the issue's
    "12-16 rows of 256 pages" case, taken to the limit) commits over either channel."""
    t = sp.ShardedPageTable(
        ROWS,
        MAX_LEN,
        256,
        PAGE_SIZES,
        num_shards=SHARDS,
        pages_per_shard=POOL,
        backend="ray",
        ray={"devices_per_shard": 1, "timeout_s": 60, "channel": channel},
    )
    try:
        fill(t)
        t.commit(ROWS)
        plan = swap_everything(t)
        receipt = t.commit(ROWS)
        assert receipt.epoch == 2 and t.recoveries == []
        assert {e for e, _ in t.shard_status()} == {2}
        for g in range(len(WIDTHS)):
            np.testing.assert_array_equal(receipt.kv_copies[g], plan[g])
            np.testing.assert_array_equal(t.device_snapshot(g), expected_table(g))
        # The step after it carries a full schedule too.
        sched = np.zeros(ROWS, np.int64)
        sched[[0, RPS]] = 1
        receipt = t.commit(ROWS, num_scheduled_tokens=sched, num_computed_tokens=sched * 0)
        assert receipt.epoch == 3
    finally:
        t.close()


def test_copies_into_pages_no_row_holds_never_outgrow_the_plan():
    """Moving a row onto new pages and clearing the target again, over and over before a
    commit, leaves copies into pages nobody holds; the plan drops them once it would hold
    more copies than the table has cells, so the epoch still fits and still commits."""
    rows, width = 16, 2  # 2 shards of 8 rows; 2 pages per row: at most 32 copies per plan
    t = sp.ShardedPageTable(rows, width * 16, 64, (16,), num_shards=2, pages_per_shard=512)
    try:
        src_pages = list(range(width))  # row 0, shard 0's pool
        t.add_row([src_pages], 0)
        t.commit(rows)
        last = []
        for i in range(20):  # 20 x 2 = 40 copies pending, 8 more than the table's cells
            last = [512 + width * i + j for j in range(width)]  # shard 1's pool
            t.move_row(0, 8, page_ids=[last])
            if i < 19:
                t.clear_row(8)
        receipt = t.commit(rows)
        np.testing.assert_array_equal(receipt.kv_copies[0], [src_pages, last])
        assert t.device_snapshot(0)[8].tolist() == last
    finally:
        t.close()
