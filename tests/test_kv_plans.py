"""Cross-shard moves and swaps with page_ids: the copy plans they publish, and every bad
page_ids refused with nothing changed.

The expected plan is computed here from the rule (the KV of the source row's pages goes to
the new pages, in slot order; within one epoch every copy reads before any writes, so a
chain resolves to the page holding the KV now), independently of the implementation.
"""

from __future__ import annotations

import numpy as np
import pytest

import sharded_pagetable as sp

ROWS, MAX_LEN, PAGE_SIZES, SHARDS, POOL = 32, 256, (16, 64), 4, 100
RPS = ROWS // SHARDS


@pytest.fixture
def table():
    t = sp.ShardedPageTable(
        ROWS, MAX_LEN, 128, PAGE_SIZES, num_shards=SHARDS, pages_per_shard=POOL, warmup=False
    )
    yield t
    t.close()


def pool(row: int) -> int:
    return (row // RPS) * POOL


def fill(t: sp.ShardedPageTable) -> None:
    t.add_row([[pool(0) + 1, pool(0) + 2, pool(0) + 3], [pool(0) + 4]], 0)
    t.add_row([[pool(RPS) + 5], [pool(RPS) + 6, pool(RPS) + 7]], RPS)
    t.add_row([[pool(2 * RPS) + 8, pool(2 * RPS) + 9], []], 2 * RPS)
    t.commit(ROWS)


def assert_unchanged(t, before) -> None:
    """``t`` holds exactly ``before`` (its :func:`state`) and has nothing to commit."""
    after = state(t)
    for x, y in zip(before, after, strict=True):
        for a, b in zip(x, y, strict=True):
            assert a.tobytes() == b.tobytes()
    receipt = t.commit(ROWS)
    assert not receipt.changed and receipt.kv_copies == ()


def plans(receipt) -> list[list[tuple[int, int]]]:
    return [list(zip(p[0].tolist(), p[1].tolist(), strict=True)) for p in receipt.kv_copies]


def state(t):
    return (
        [t[g].get_cpu_tensor().copy() for g in range(2)],
        [t[g].num_pages_per_row.copy() for g in range(2)],
        [t.device_snapshot(g) for g in range(2)],
    )


def test_cross_shard_move_publishes_its_copy_plan(table):
    fill(table)
    tgt = 3 * RPS + 1
    new = [[pool(tgt) + 10, pool(tgt) + 11, pool(tgt) + 12], [pool(tgt) + 13]]
    table.move_row(0, tgt, page_ids=new)
    receipt = table.commit(ROWS)
    assert plans(receipt) == [
        [(1, pool(tgt) + 10), (2, pool(tgt) + 11), (3, pool(tgt) + 12)],
        [(4, pool(tgt) + 13)],
    ]
    snap = table.device_snapshot(0)
    assert snap[tgt, :4].tolist() == [*new[0], 0]
    assert snap[0, :4].tolist() == [1, 2, 3, 0]  # the source keeps its pages (a copy)
    # The plan was published with that epoch: the next commit has none.
    table.append_row([[pool(0) + 20], []], 0)
    assert [p.shape[1] for p in table.commit(ROWS).kv_copies] == [0, 0]


def test_cross_shard_swap_publishes_both_copies(table):
    fill(table)
    a, b = 0, RPS  # shard 0 <-> shard 1
    for_a = [[pool(a) + 50], [pool(a) + 51, pool(a) + 52]]  # a takes b's counts (1, 2)
    for_b = [[pool(b) + 60, pool(b) + 61, pool(b) + 62], [pool(b) + 63]]
    table.swap_row(a, b, page_ids=(for_a, for_b))
    receipt = table.commit(ROWS)
    want = [
        sorted(
            [(pool(b) + 5, pool(a) + 50), (1, pool(b) + 60), (2, pool(b) + 61), (3, pool(b) + 62)],
            key=lambda c: c[1],
        ),
        sorted(
            [(pool(b) + 6, pool(a) + 51), (pool(b) + 7, pool(a) + 52), (4, pool(b) + 63)],
            key=lambda c: c[1],
        ),
    ]
    assert plans(receipt) == want
    assert table[0].num_pages_per_row[[a, b]].tolist() == [1, 3]
    assert table[1].num_pages_per_row[[a, b]].tolist() == [2, 1]


def test_chained_moves_in_one_epoch_copy_from_where_the_kv_is(table):
    fill(table)
    mid, end = RPS + 3, 2 * RPS + 3
    table.move_row(
        0, mid, page_ids=[[pool(mid) + 30, pool(mid) + 31, pool(mid) + 32], [pool(mid) + 33]]
    )
    table.clear_row(0)
    table.move_row(
        mid, end, page_ids=[[pool(end) + 40, pool(end) + 41, pool(end) + 42], [pool(end) + 43]]
    )
    receipt = table.commit(ROWS)
    # end's pages take the KV of row 0's original pages (reads come before writes).
    g0 = dict((d, s) for s, d in plans(receipt)[0])
    assert [g0[pool(end) + 40 + i] for i in range(3)] == [1, 2, 3]
    assert [g0[pool(mid) + 30 + i] for i in range(3)] == [1, 2, 3]


def test_a_failed_commit_keeps_the_plan_pending(table):
    fill(table)
    tgt = 3 * RPS
    table.move_row(
        0, tgt, page_ids=[[pool(tgt) + 1, pool(tgt) + 2, pool(tgt) + 3], [pool(tgt) + 4]]
    )
    table._backend.shards[3].epoch = 99  # shard 3 refuses the next batch (wrong base)
    with pytest.raises(sp.ShardFailedError, match="shard 3"):
        table.commit(ROWS)
    table.recover()
    receipt = table.commit(ROWS)
    assert plans(receipt)[0] == [(1, pool(tgt) + 1), (2, pool(tgt) + 2), (3, pool(tgt) + 3)]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda t, tgt: t.move_row(0, tgt, page_ids=[[pool(tgt)], [pool(tgt) + 1]]),
            "exactly 3 new pages in group 0",
        ),
        (lambda t, tgt: t.move_row(0, tgt, page_ids=[[1, 2, 3], [4]]), "not in row .* pool"),
        (
            lambda t, tgt: t.move_row(
                0, tgt, page_ids=[[pool(tgt) + 1, pool(tgt) + 1, pool(tgt) + 2], [pool(tgt)]]
            ),
            "appears twice",
        ),
        (
            lambda t, tgt: t.move_row(
                0, tgt, page_ids=[[pool(tgt) + 8, pool(tgt) + 9, pool(tgt) + 1], [pool(tgt)]]
            ),
            "held by live row",
        ),
        (
            lambda t, tgt: t.move_row(
                0, tgt, page_ids=[[pool(tgt) + 1, pool(tgt) + 2, -1], [pool(tgt)]]
            ),
            "out of range",
        ),
        (
            lambda t, tgt: t.move_row(
                0, tgt, page_ids=[[pool(tgt) + 1, pool(tgt) + 2, pool(tgt) + 3]]
            ),
            "groups",
        ),
        (lambda t, tgt: t.swap_row(0, tgt, page_ids=([[]], [[]], [[]])), "pair"),
        (
            lambda t, tgt: t.swap_row(
                0,
                tgt,
                page_ids=(
                    [[1, 2], []],
                    [[pool(tgt) + 1, pool(tgt) + 2, pool(tgt) + 3], [pool(tgt) + 4]],
                ),
            ),
            "exactly 0 new pages",
        ),
        (lambda t, tgt: t.move_row(0, tgt), "needs pages of its own pool"),
    ],
)
def test_bad_page_ids_are_refused_and_nothing_changes(table, call, match):
    fill(table)
    tgt = 2 * RPS + 1  # shard 2: live row 2*RPS holds pool(tgt)+8 and +9
    before = state(table)
    with pytest.raises(ValueError, match=match):
        call(table, tgt)
    assert_unchanged(table, before)


def test_a_batch_with_every_optional_part_round_trips_the_wire(table):
    """What a pipelined, scheduled, migrating commit sends decodes to the same batch."""
    from sharded_pagetable.coordinator.epochs import EpochId, shard_messages
    from sharded_pagetable.shard.wire import WireLimits, decode, encode

    fill(table)
    tgt = 3 * RPS + 1
    table.move_row(
        0, tgt, page_ids=[[pool(tgt) + 10, pool(tgt) + 11, pool(tgt) + 12], [pool(tgt) + 13]]
    )
    sched = np.zeros(ROWS, np.int64)
    sched[[0, tgt]] = 2
    plan = table.stage(ROWS, sched, np.zeros(ROWS, np.int64))  # what commit would send
    batches, plans, schedule = plan.batches, plan.kv_copies, plan.schedule
    epoch = EpochId(5, 4, 2**63 + 5)
    every = np.arange(table.num_shards)
    bases = np.full(table.num_shards, 4)
    messages = shard_messages(
        epoch, batches, plan.cuts, table.layout.bounds, schedule, plans, every, bases
    )
    assert [m.shard for m in messages] == every.tolist()  # KV copies reach every shard
    limits = WireLimits(RPS, table.widths)
    for m in messages:
        back = decode(encode(m), limits)
        assert (back.epoch, back.base, back.shard, back.generation) == (5, 4, m.shard, 2**63 + 5)
        np.testing.assert_array_equal(back.schedule.sched, m.schedule.sched)
        np.testing.assert_array_equal(back.schedule.done, m.schedule.done)
        for a, b in zip(back.kv_copies, m.kv_copies, strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(back.groups, m.groups, strict=True):
            for col in ("op", "row", "start", "count", "pages"):
                np.testing.assert_array_equal(getattr(a, col), getattr(b, col))


@pytest.mark.parametrize("holder", ["first", "last"])
@pytest.mark.parametrize("op", ["move_row", "swap_row"])
def test_a_page_held_by_the_first_or_last_row_of_its_shard_is_refused(table, holder, op):
    """The rows searched for a page's holder are the whole shard, its last row included."""
    fill(table)
    tgt = 2 * RPS + 3  # shard 2, rows 2*RPS .. 3*RPS-1
    row = 2 * RPS if holder == "first" else 3 * RPS - 1
    held = pool(tgt) + 40
    table.add_row([[held], []], row)
    table.commit(ROWS)
    before = state(table)
    new = [[pool(tgt) + 30, held, pool(tgt) + 31], [pool(tgt) + 32]]  # row 0 holds 3 + 1
    with pytest.raises(ValueError, match=f"page {held} \\(group 0\\) is held by live row {row}"):
        if op == "move_row":
            table.move_row(0, tgt, page_ids=new)
        else:
            table.swap_row(0, tgt, page_ids=([[], []], new))  # tgt is empty: row 0 gets none
    assert_unchanged(table, before)


def test_a_move_during_a_failed_epoch_copies_from_where_the_kv_still_is(table):
    """A -> B (a KV copy) goes out with an epoch that fails; B -> C is made while it is in
    flight. B never received A's KV, so the next epoch must fill both B and C from A."""
    fill(table)
    a, b, c = 0, RPS + 2, 2 * RPS + 2  # shards 0, 1, 2
    a_pages = [[pool(a) + 1, pool(a) + 2, pool(a) + 3], [pool(a) + 4]]  # fill() gave row 0
    b_pages = [[pool(b) + 20, pool(b) + 21, pool(b) + 22], [pool(b) + 23]]
    c_pages = [[pool(c) + 30, pool(c) + 31, pool(c) + 32], [pool(c) + 33]]
    table.move_row(a, b, page_ids=b_pages)
    table._backend.shards[3].epoch = 99  # shard 3 refuses this epoch (wrong base)
    table.commit(ROWS, wait=False)
    table.move_row(b, c, page_ids=c_pages)  # while the epoch carrying A -> B is in flight
    with pytest.raises(sp.ShardFailedError, match="shard 3"):
        table.wait()
    table.recover()
    receipt = table.commit(ROWS)
    for g in range(2):
        want = {
            d: s
            for src, dst in ((a_pages, b_pages), (a_pages, c_pages))
            for s, d in zip(src[g], dst[g], strict=True)
        }
        got = dict((d, s) for s, d in plans(receipt)[g])
        assert got == want, f"group {g}"
    assert table.device_snapshot(0)[c, :4].tolist() == [*c_pages[0], 0]
