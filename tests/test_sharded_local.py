"""ShardedPageTable with in-process shards against the single-process table."""

import jax
import numpy as np
import pytest
from differential import random_ops, run_differential

import sharded_pagetable as sp
from sharded_pagetable.cli.checks import addressable_rows, host_row_digests, row_digests

ROWS, MAX_LEN, PAGE_SIZES = 64, 512, (16, 64)
WIDTHS = tuple(sp.cdiv(MAX_LEN, s) for s in PAGE_SIZES)


def make(num_shards: int, **kw) -> sp.ShardedPageTable:
    return sp.ShardedPageTable(ROWS, MAX_LEN, 256, PAGE_SIZES, num_shards=num_shards, **kw)


def snapshot(table, g):
    return table.device_snapshot(g)


@pytest.mark.parametrize("num_shards", [1, 2, 4])
@pytest.mark.parametrize("seed", range(12))
def test_differential_local(num_shards, seed):
    table = make(num_shards)
    reference = sp.MultiGroupPageTable(ROWS, MAX_LEN, 256, PAGE_SIZES)
    commits = run_differential(table, reference, random_ops(seed, ROWS, WIDTHS, 250), snapshot)
    assert commits > 10
    # The global array is row-sharded over the mesh and equals the snapshot.
    arr = table[0].get_device_tensor()
    assert arr.sharding.spec == jax.sharding.PartitionSpec("data", None)
    np.testing.assert_array_equal(np.asarray(arr), table.device_snapshot(0))


def test_cross_shard_move_and_swap_reach_both_shards():
    with make(4) as t:
        rps = t.layout.rows_per_shard
        t.add_row([[1, 2, 3], [4]], 0)
        t.add_row([[9], [8, 7]], 3 * rps + 1)
        t.move_row(0, rps + 5)  # shard 0 -> shard 1
        t.swap_row(0, 3 * rps + 1)  # shard 0 <-> shard 3
        receipt = t.commit(ROWS)
        # rows x groups per shard; shard 2 has no change, so it is not sent anything
        assert [(s.shard, s.rows) for s in receipt.shards] == [(0, 2), (1, 2), (3, 2)]
        snap = t.device_snapshot(0)
        assert snap[rps + 5, :4].tolist() == [1, 2, 3, 0]
        assert snap[0, :2].tolist() == [9, 0]
        assert snap[3 * rps + 1, :4].tolist() == [1, 2, 3, 0]


def test_commit_receipt_epochs_and_idle_commit():
    with make(2) as t:
        assert not t.commit(ROWS).changed
        t.append_row([[1], [2]], 5)
        r1 = t.commit(ROWS)
        assert (r1.epoch, r1.changed, r1.rows) == (1, True, 2)
        # Only shard 0 holds row 5: shard 1 is neither sent anything nor waited on.
        assert r1.shards[0].bytes > 0 and [s.shard for s in r1.shards] == [0]
        assert t.shard_status()[1] == (0, 0)
        r2 = t.commit(ROWS)
        assert (r2.epoch, r2.changed, r2.rows, r2.bytes) == (1, False, 0, 0)
        # A change past num_reqs waits for a commit that covers it.
        t.append_row([[3], [4]], 40)
        assert not t.commit(40).changed
        assert t.commit(41).epoch == 2


def test_run_on_shards_jitted_reduction_matches_mirror():
    with make(4) as t:
        for r in range(0, ROWS, 3):
            t.add_row([[r, r + 1], [r * 2]], r)
        t.commit(ROWS)
        results = t.run_on_shards(row_digests)
        assert len(results) == 4
        for g in range(2):
            want = host_row_digests(t[g].get_cpu_tensor())
            for per_shard in results:
                np.testing.assert_array_equal(per_shard[g], want)
        blocks = t.run_on_shards(addressable_rows)[0][0]
        assert [(lo, hi) for _, lo, hi in blocks] == [(i * 8, i * 8 + 8) for i in range(8)]


def test_bad_calls_change_nothing():
    with make(2) as t:
        t.add_row([[1, 2], [3]], 10)
        t.commit(ROWS)
        host = [t[g].get_cpu_tensor().copy() for g in range(2)]
        counts = [t[g].num_pages_per_row.copy() for g in range(2)]
        dev = [t.device_snapshot(g) for g in range(2)]
        bad = [
            lambda: t.append_row([[1], [2]], ROWS),
            lambda: t.append_row([[1], [2]], -1),
            lambda: t.append_row([[1], [2.5]], 3),
            lambda: t.append_row([[1], [2], [3]], 3),
            lambda: t.add_row([list(range(WIDTHS[0] + 1)), [1]], 3),
            lambda: t.move_row(1, ROWS),
            lambda: t.swap_row(-1, 0),
            lambda: t.append_rows_batch([[[1], [2]]], [1, 2]),
            lambda: t.commit(ROWS + 1),
        ]
        for call in bad:
            with pytest.raises((ValueError, IndexError)):
                call()
            for g in range(2):
                np.testing.assert_array_equal(t[g].get_cpu_tensor(), host[g])
                np.testing.assert_array_equal(t[g].num_pages_per_row, counts[g])
                np.testing.assert_array_equal(t.device_snapshot(g), dev[g])


def test_shard_count_errors_name_a_valid_size_and_any_row_count_works():
    with pytest.raises(ValueError, match=r"num_shards=3 .* try num_shards in \[1, 2, 4, 8\]"):
        make(3)
    # 60 rows do not divide over the 8 devices: the capacity rounds up to 64, and rows
    # 60..63 are refused exactly as MultiGroupPageTable(60, ...) refuses them.
    ref = sp.MultiGroupPageTable(60, MAX_LEN, 256, PAGE_SIZES, warmup=False)
    with sp.ShardedPageTable(60, MAX_LEN, 256, PAGE_SIZES, num_shards=2) as t:
        assert (t.layout.max_num_reqs, t.max_num_reqs, t[0].get_cpu_tensor().shape[0]) == (
            64,
            60,
            60,
        )
        calls = [
            lambda x: x.append_row([[1], [2]], 60),
            lambda x: x.move_row(0, 63),
            lambda x: x.swap_row(64, 0),
            lambda x: x.commit(61),
        ]
        for call in calls:
            errors = []
            for table in (t, ref):
                with pytest.raises((ValueError, IndexError)) as info:
                    call(table)
                errors.append((type(info.value), str(info.value)))
            assert errors[0] == errors[1]


def test_two_axis_mesh_replicates_rows_over_the_other_axis():
    with make(2, mesh={"data": 4, "model": 2}) as t:
        t.add_row([[4, 5], [6]], 20)
        t.commit(ROWS)
        arr = t[0].get_device_tensor()
        assert len(arr.addressable_shards) == 8
        for shard in arr.addressable_shards:
            lo = shard.index[0].start
            np.testing.assert_array_equal(
                np.asarray(shard.data), t[0].get_cpu_tensor()[lo : lo + 16]
            )


def test_corrupted_local_shard_fails_the_next_commit_naming_it():
    """A local shard confirms each epoch with the checksum of what its own table holds: a
    page changed behind the coordinator's back is caught at the next commit that touches the
    row, nothing is published, and the other shards step back."""
    with make(4) as t:
        rps = t.layout.rows_per_shard
        victim_row = 2 * rps + 3  # shard 2
        t.add_row([[1, 2, 3], [4]], victim_row)
        t.add_row([[5], [6]], 0)
        t.commit(ROWS)
        before = [t.device_snapshot(g) for g in range(len(PAGE_SIZES))]
        shard = t._backend.shards[2]
        shard.tables[0][3, 1] = 77  # behind the coordinator's back
        t.append_row([[8], []], victim_row)
        t.append_row([[9], []], 0)  # shard 0 applies too, then must step back
        with pytest.raises(sp.ShardFailedError, match="shard 2") as info:
            t.commit(ROWS)
        assert info.value.shard == 2 and "checksum" in str(info.value)
        assert t.epoch == 1
        assert t._backend.shards[0].epoch == 1  # stepped back
        # Fail-closed: the table refuses to publish until recovered; recovery rebuilds every
        # shard from the coordinator's published rows and the pending appends then go out.
        with pytest.raises(sp.ShardFailedError):
            t.device_snapshot(0)
        t.recover()
        for g, snap in enumerate(before):
            np.testing.assert_array_equal(t.device_snapshot(g), snap)
        assert t.commit(ROWS).epoch == 2
        assert t.device_snapshot(0)[victim_row, :5].tolist() == [1, 2, 3, 8, 0]
        assert t.device_snapshot(0)[0, :3].tolist() == [5, 9, 0]
        # Epoch 2 touched shards 0 and 2 (rows 0 and victim_row); 1 and 3 keep epoch 1.
        assert [e for e, _ in t.shard_status()] == [2, 1, 2, 1]


def test_a_recovery_that_failed_half_way_still_reports_what_it_replaced():
    """A recovery that gave shard 1 a new (empty) process and then failed (another shard
    would not take the fence) must not forget it: the next recovery that succeeds re-seeds
    shard 1 and names its live rows in ``lost_kv_rows``, though by then no shard is dead."""
    from sharded_pagetable.shard.shard import Shard

    t = sp.ShardedPageTable(32, 256, 128, (16, 32), num_shards=4, warmup=False)
    try:
        for s in range(4):
            t.add_row([[10 * s + 1], [10 * s + 2]], 8 * s)
        t.add_row([[50], []], 8 + 3)
        t.commit(32)
        backend = t._backend
        attempts = []
        fence = backend.fence

        def replace_dead():  # shard 1 died once: its replacement holds nothing
            attempts.append(1)
            if len(attempts) > 1:
                return []
            backend.shards[1] = Shard(backend.specs[1], backend.sharding)
            backend._arrays.clear()
            return [1]

        def flaky_fence(generation):  # the first attempt fails after replacing
            if len(attempts) == 1:
                return [RuntimeError("shard 2 did not answer")] * 4
            return fence(generation)

        backend.replace_dead, backend.fence = replace_dead, flaky_fence
        with pytest.raises(sp.ShardFailedError):
            t.recover()
        t.recover()
        assert len(attempts) == 2
        assert t.lost_kv_rows.tolist() == [8, 11]  # shard 1's live rows
        for g in range(2):
            np.testing.assert_array_equal(t.device_snapshot(g), t[g].get_cpu_tensor())
        assert {e for e, _ in t.shard_status()} == {t.epoch}
    finally:
        t.close()
