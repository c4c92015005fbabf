"""A commit reaches only the shards it touches (changed rows, a new part of the step
schedule, KV copies); the others keep their epoch, are not waited on, and stay consistent.

Checked against the reference model (rows), the independent step-input reference
(schedules), and, in-process, by counting what each real ``Shard`` was handed. The Ray half
stops and kills shards the commits do not touch.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference_model import ReferenceModel
from step_reference import step_inputs_reference

import sharded_pagetable as sp
from sharded_pagetable.coordinator.attach import take_over
from sharded_pagetable.coordinator.mirror import Mirror

ROWS, MAX_LEN, PAGE_SIZES, TOKENS = 64, 256, (16, 64), 128
WIDTHS = tuple(sp.cdiv(MAX_LEN, s) for s in PAGE_SIZES)


def make(num_shards: int, **kw) -> sp.ShardedPageTable:
    return sp.ShardedPageTable(
        ROWS, MAX_LEN, TOKENS, PAGE_SIZES, num_shards=num_shards, warmup=False, **kw
    )


def count_applies(t: sp.ShardedPageTable) -> list[int]:
    """A list whose entry ``s`` counts the batches in-process shard ``s`` is handed."""
    calls = [0] * t.num_shards
    for s, shard in enumerate(t._backend.shards):
        apply = shard.apply

        def counted(batch, s=s, apply=apply):
            calls[s] += 1
            return apply(batch)

        shard.apply = counted
    return calls


def assert_same(t: sp.ShardedPageTable, ref: ReferenceModel) -> None:
    for g in range(len(PAGE_SIZES)):
        np.testing.assert_array_equal(t[g].get_cpu_tensor(), ref.host_array(g))
        np.testing.assert_array_equal(t.device_snapshot(g), ref.device_array(g))


@pytest.mark.parametrize("seed", range(3))
def test_a_commit_reaches_only_the_shards_whose_rows_changed(seed):
    rng = np.random.default_rng(seed)
    shards = 8
    rps = ROWS // shards
    with make(shards) as t:
        ref = ReferenceModel(ROWS, WIDTHS)
        calls = count_applies(t)
        held = [0] * shards  # the epoch each shard must hold, from the changes alone
        sums = [0] * shards
        handed = [0] * shards  # the commits that changed a row of each shard
        for _ in range(30):
            hit = sorted(rng.choice(shards, size=int(rng.integers(1, 4)), replace=False).tolist())
            for s in hit:
                row = s * rps + int(rng.integers(rps))
                pages = [[int(rng.integers(1, 5000))], [int(rng.integers(1, 5000))]]
                if ref.count(0, row) + 1 > WIDTHS[0] or ref.count(1, row) + 1 > WIDTHS[1]:
                    t.clear_row(row)
                    ref.clear_row(row)
                t.append_row(pages, row)
                ref.append_row(pages, row)
                handed[s] += 1
            receipt = t.commit(ROWS)
            ref.commit(ROWS)
            assert [r.shard for r in receipt.shards] == hit
            for r in receipt.shards:
                held[r.shard], sums[r.shard] = receipt.epoch, r.checksum
            assert t.shard_status() == list(zip(held, sums, strict=True))
            assert calls == handed
        assert_same(t, ref)
        assert max(held) == t.epoch


def test_untouched_shards_are_never_handed_anything():
    with make(4) as t:
        calls = count_applies(t)
        rps = ROWS // 4
        t.add_row([[1], [2]], 0)
        t.add_row([[3], [4]], 3 * rps)
        assert [r.shard for r in t.commit(ROWS).shards] == [0, 3]
        for k in range(5):
            t.append_row([[10 + k], []], 1)
            t.commit(ROWS)
        assert calls == [6, 0, 0, 1]
        assert [e for e, _ in t.shard_status()] == [6, 0, 0, 1]
        # Nothing changed: no epoch, no message.
        receipt = t.commit(ROWS)
        assert not receipt.changed and receipt.shards == () and calls == [6, 0, 0, 1]


def test_a_schedule_reaches_only_the_shards_whose_part_changed():
    shards = 4
    rps = ROWS // shards
    with make(shards) as t:
        for row in range(0, ROWS, 3):
            t.add_row([[row + 1, row + 2], [row + 3]], row)
        sched = np.zeros(ROWS, np.int64)
        done = np.zeros(ROWS, np.int64)
        sched[[0, rps + 2, 2 * rps + 1, 3 * rps]] = [3, 2, 1, 4]
        calls = count_applies(t)

        def check(receipt_shards, want):
            assert [r.shard for r in receipt_shards] == want
            host = [t.device_snapshot(g) for g in range(len(PAGE_SIZES))]
            expect = step_inputs_reference(
                host, sched.astype(np.int32), done.astype(np.int32), PAGE_SIZES, shards,
                TOKENS // shards,
            )  # fmt: skip
            got = t.step_snapshot()
            for field in ("token_rows", "positions", "kv_lens", "cu_q_lens"):
                np.testing.assert_array_equal(getattr(got, field), getattr(expect, field))
            for g in range(len(PAGE_SIZES)):
                np.testing.assert_array_equal(got.slot_mapping[g], expect.slot_mapping[g])

        first = t.commit(ROWS, sched, done)  # rows and the first schedule: every shard
        check(first.shards, [0, 1, 2, 3])
        # Shard 1's rows compute on; the others' counts are what they hold already.
        done[rps + 2], sched[rps + 2] = 2, 1
        check(t.commit(ROWS, sched, done).shards, [1])
        # The same schedule again changes nothing anywhere.
        again = t.commit(ROWS, sched, done)
        assert not again.changed and again.epoch == first.epoch + 1
        # A row change on shard 3 plus a schedule change on shard 2.
        t.append_row([[77], []], 3 * rps)
        sched[2 * rps + 1] = 0
        check(t.commit(ROWS, sched, done).shards, [2, 3])
        assert calls == [1, 2, 2, 2]
        assert [e for e, _ in t.shard_status()] == [1, 2, 3, 3]
        # An epoch without a schedule reaches every shard: none keeps the old step.
        assert [r.shard for r in t.commit(ROWS).shards] == [0, 1, 2, 3]
        with pytest.raises(RuntimeError):
            t.step_snapshot()


def test_kv_copies_reach_every_shard():
    pool = 100
    with make(4, pages_per_shard=pool) as t:
        rps = ROWS // 4
        t.add_row([[1, 2], [3]], 0)
        t.commit(ROWS)
        t.move_row(0, 2 * rps, page_ids=[[2 * pool + 1, 2 * pool + 2], [2 * pool + 3]])
        receipt = t.commit(ROWS)
        assert [r.shard for r in receipt.shards] == [0, 1, 2, 3]
        assert receipt.kv_copies[0].shape == (2, 2)
        assert {e for e, _ in t.shard_status()} == {2}


def test_recovery_rebuilds_shards_at_different_epochs():
    """Shards hold different epochs; one is corrupted behind the coordinator's back and the
    next commit that touches it fails; recovery brings every shard back to what the mirror
    published (the reference), and the table goes on."""
    with make(4) as t:
        ref = ReferenceModel(ROWS, WIDTHS)
        rps = ROWS // 4
        for s in range(4):
            for tab in (t, ref):
                tab.add_row([[s + 1], [s + 2]], s * rps)
            t.commit(ROWS)  # shard s last touched at epoch s + 1
            ref.commit(ROWS)
        assert [e for e, _ in t.shard_status()] == [1, 2, 3, 4]
        t._backend.shards[1].tables[0][0, 0] = 999  # shard 1, epoch 2
        for tab in (t, ref):
            tab.append_row([[50], []], rps)
        with pytest.raises(sp.ShardFailedError, match="shard 1"):
            t.commit(ROWS)
        t.recover()
        t.commit(ROWS)
        ref.commit(ROWS)
        assert_same(t, ref)
        assert t.epoch == 5 and [e for e, _ in t.shard_status()] == [4, 5, 4, 4]


def _mirror_of(t: sp.ShardedPageTable) -> Mirror:
    return Mirror(t.layout, t.widths, t.page_sizes, TOKENS, None, None)


@pytest.mark.parametrize("reached", [[0], [0, 2]])
def test_attach_settles_shards_at_different_epochs(reached):
    """A new coordinator takes over in-process shards that hold different epochs, the newest
    of which was sent to shards 0 and 2: if only shard 0 applied it (the old coordinator
    died while sending), shard 0 steps back; if both did, it stands."""
    t = make(4)
    try:
        ref = ReferenceModel(ROWS, WIDTHS)
        rps = ROWS // 4
        for s in (1, 3, 0):
            for tab in (t, ref):
                tab.add_row([[s + 1, s + 9], [s + 2]], s * rps + 1)
            t.commit(ROWS)
            ref.commit(ROWS)
        before = [ref.device_array(g) for g in range(len(PAGE_SIZES))]
        for tab in (t, ref):
            tab.append_row([[70], [71]], 1)
            tab.append_row([[72], []], 2 * rps)
        plan = t.stage(ROWS)
        assert [m.shard for m in plan.messages] == [0, 2]
        assert all(m.touched == 2 for m in plan.messages)
        backend = t._backend
        for m in plan.messages:
            if m.shard in reached:
                backend.shards[m.shard].apply(m)
        mirror = _mirror_of(t)
        taken = take_over(backend, mirror)
        assert taken.lost is None
        if reached == [0]:  # unfinished: shard 0 stepped back to the epoch it held
            assert taken.held == [3, 1, 0, 2] and taken.epoch == 3
            want = before
        else:
            ref.commit(ROWS)
            assert taken.held == [4, 1, 4, 2] and taken.epoch == 4
            want = [ref.device_array(g) for g in range(len(PAGE_SIZES))]
        for g, host in enumerate(mirror.hosts):
            table, _ = host.published_rows(0, ROWS)
            np.testing.assert_array_equal(table, want[g])
            np.testing.assert_array_equal(backend.device_snapshot(g), want[g])
        assert [a.epoch for a in backend.status()] == taken.held
        assert [a.checksum for a in backend.status()] == taken.expected
    finally:
        t.close(stop_shards=False)
