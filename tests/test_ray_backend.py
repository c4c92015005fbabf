"""ShardedPageTable with backend="ray": real Ray actors, each a JAX process joined with
jax.distributed, against the single-process table."""

import numpy as np
import pytest
from differential import random_ops, run_differential

import sharded_pagetable as sp
from sharded_pagetable.cli.checks import addressable_rows, host_row_digests, row_digests
from sharded_pagetable.shard.wire import decode_reply

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.multiprocess]

ROWS, MAX_LEN, PAGE_SIZES = 32, 256, (16, 64)
WIDTHS = tuple(sp.cdiv(MAX_LEN, s) for s in PAGE_SIZES)


def kill_and_wait(table, actor, shard: int) -> None:
    """ray.kill is asynchronous: wait until the shard's process is really gone."""
    from sharded_pagetable.testing.chaos import wait_for_exit

    pid = table._backend.placements[shard]["pid"]
    ray.kill(actor)
    assert wait_for_exit(pid, 20), f"shard {shard} (pid {pid}) did not exit"


def make(num_shards: int, **ray_opts) -> sp.ShardedPageTable:
    opts = {"devices_per_shard": 2, "timeout_s": 30, **ray_opts}
    return sp.ShardedPageTable(
        ROWS, MAX_LEN, 128, PAGE_SIZES, num_shards=num_shards, backend="ray", ray=opts
    )


@pytest.fixture(scope="module", params=[2, 4], ids=["2procs", "4procs"])
def table(request, local_ray):
    t = make(request.param)
    yield t
    t.close()


def test_local_ray_is_bound_to_loopback(local_ray):
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert [n["NodeManagerAddress"] for n in nodes] == ["127.0.0.1"]


def test_shards_are_separate_jax_processes(table):
    placements = table._backend.placements
    assert len({p["pid"] for p in placements}) == table.num_shards
    for s, p in enumerate(placements):
        assert p["rows"] == (s * ROWS // table.num_shards, (s + 1) * ROWS // table.num_shards)
        assert len(p["devices"]) == 2 and p["node_ip"] == "127.0.0.1"


@pytest.mark.parametrize("seed", [0, 1])
def test_differential_ray(table, seed):
    table.clear()
    reference = sp.MultiGroupPageTable(ROWS, MAX_LEN, 128, PAGE_SIZES, warmup=False)
    ops = random_ops(100 + seed, ROWS, WIDTHS, 120)
    commits = run_differential(table, reference, ops, lambda t, g: t.device_snapshot(g))
    assert commits > 5


def test_run_on_shards_cross_process_reduction(table):
    table.clear()
    rng = np.random.default_rng(7)
    for r in range(ROWS):
        table.add_row([rng.integers(0, 999, 3).tolist(), [r]], r)
    table.commit(ROWS)
    per_process = table.run_on_shards(row_digests)
    assert len(per_process) == table.num_shards
    for g in range(2):
        want = host_row_digests(table[g].get_cpu_tensor())
        for got in per_process:  # every process holds the replicated result of one SPMD jit
            np.testing.assert_array_equal(got[g], want)


def test_each_process_holds_exactly_its_rows(table):
    per_process = table.run_on_shards(addressable_rows)
    rps = ROWS // table.num_shards
    for s, groups in enumerate(per_process):
        for blocks in groups:
            assert {p for p, _, _ in blocks} == {s}
            assert min(lo for _, lo, _ in blocks) == s * rps
            assert max(hi for _, _, hi in blocks) == (s + 1) * rps
            assert sum(hi - lo for _, lo, hi in blocks) == rps


def test_device_tensor_points_to_run_on_shards(table):
    with pytest.raises(RuntimeError, match="run_on_shards"):
        table[0].get_device_tensor()


def test_killed_shard_fails_the_next_commit_and_publishes_nothing(local_ray):
    t = make(2, timeout_s=20)
    try:
        t.add_row([[1, 2], [3]], 0)
        t.add_row([[4], [5]], 20)
        first = t.commit(ROWS)
        before = t.device_snapshot(0)
        survivor, victim = t._backend.actors
        kill_and_wait(t, victim, 1)
        t.append_row([[6], [7]], 1)  # shard 0
        t.append_row([[8], [9]], 21)  # shard 1
        with pytest.raises(sp.ShardFailedError, match="shard 1") as info:
            t.commit(ROWS)
        assert info.value.shard == 1 and info.value.epoch == first.epoch + 1
        assert t.epoch == first.epoch
        # The surviving shard applied the batch and stepped back: it still holds the old epoch
        # and the old rows on its devices.
        assert decode_reply(ray.get(survivor.status.remote(), timeout=20), 2).epoch == first.epoch
        np.testing.assert_array_equal(
            ray.get(survivor.snapshot.remote(0), timeout=20), before[: ROWS // 2]
        )
        # Fail-closed: later commits and reads refuse until the table is recovered.
        with pytest.raises(sp.ShardFailedError, match="fail-closed"):
            t.commit(ROWS)
        with pytest.raises(sp.ShardFailedError):
            t.device_snapshot(0)
        # The mirror kept every change.
        assert t[0].get_cpu_tensor()[[1, 21], 0].tolist() == [6, 8]
        assert t[0].num_pages_per_row[[0, 1, 20, 21]].tolist() == [2, 1, 1, 1]
    finally:
        t.close()


def test_refused_batch_rolls_back_every_shard_and_manual_recover_restores(local_ray):
    """A live shard that refuses its batch (here: it lost its state behind the coordinator's
    back) makes commit raise naming it; the shards that applied step back, nothing is
    published, and recover() rebuilds every shard at the last published epoch."""
    t = make(4)
    try:
        rps = ROWS // 4
        for s in range(4):
            t.add_row([[s + 1, s + 2], [s]], s * rps)
        first = t.commit(ROWS)
        before = [t.device_snapshot(g) for g in range(2)]
        ray.get(t._backend.actors[2].reseed.remote(None, t.generation), timeout=30)  # forgets
        for s in range(4):
            t.append_row([[40 + s], [50 + s]], s * rps)
        with pytest.raises(sp.ShardFailedError, match="shard 2") as info:
            t.commit(ROWS)
        assert info.value.shard == 2 and t.epoch == first.epoch
        epochs = [a.epoch for a in t._backend.status()]
        assert epochs == [first.epoch, first.epoch, 0, first.epoch]
        t.recover()
        assert [a.epoch for a in t._backend.status()] == [first.epoch] * 4
        for g in range(2):
            np.testing.assert_array_equal(t.device_snapshot(g), before[g])
        # The pending appends were kept and go out with the next commit.
        receipt = t.commit(ROWS)
        assert receipt.epoch == first.epoch + 1 and receipt.rows == 8
        assert t.device_snapshot(0)[2 * rps, :3].tolist() == [3, 4, 42]
    finally:
        t.close()


def test_mesh_with_rows_on_another_process_is_refused(local_ray):
    with pytest.raises(sp.ShardFailedError, match="mesh refused"):
        sp.ShardedPageTable(
            ROWS,
            MAX_LEN,
            128,
            PAGE_SIZES,
            num_shards=2,
            backend="ray",
            row_axis="data",
            mesh={"model": 2, "data": 2},
            ray={"devices_per_shard": 2, "timeout_s": 30},
        ).start()  # a table starts its shards when first needed
