"""Who may drive the shards: attach that never destroys, fencing between coordinators,
run_on_shards errors that are the caller's, and a stopped shard process that recovery kills.

Real Ray, real shard processes joined by jax.distributed, on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import sharded_pagetable as sp
from sharded_pagetable.config import TableConfig

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.multiprocess]

ROWS, MAX_LEN, PAGE_SIZES, BUDGET = 32, 1024, (16, 64), 256
NAMESPACE = "spt_fencing_tests"


def config(name: str, detached: bool = True, **ray_opts) -> TableConfig:
    return TableConfig.from_dict(
        {
            "max_num_reqs": ROWS,
            "max_model_len": MAX_LEN,
            "max_num_batched_tokens": BUDGET,
            "page_sizes": list(PAGE_SIZES),
            "num_shards": 2,
            "backend": "ray",
            "ray": {
                "devices_per_shard": 1,
                "timeout_s": 30,
                "namespace": NAMESPACE,
                "name": name,
                "detached": detached,
                **ray_opts,
            },
        }
    )


def fill(t: sp.ShardedPageTable) -> None:
    t.add_row([[1, 2, 3], [4]], 0)  # shard 0
    t.add_row([[5], [6, 7]], ROWS - 1)  # shard 1
    t.commit(ROWS)


def pids(t: sp.ShardedPageTable) -> list[int]:
    return [where["pid"] for where in t._backend.placements]


def alive(pid: int) -> bool:
    from ray_actors.cluster import _is_zombie, process_start_ticks

    return process_start_ticks(pid) is not None and not _is_zombie(pid)


def test_failed_attach_leaves_every_shard_running_and_untouched(local_ray):
    cfg = config("attach-fails")
    t = sp.ShardedPageTable.from_config(cfg)
    try:
        fill(t)
        status = t.shard_status()
        snapshots = [t.device_snapshot(g) for g in range(len(PAGE_SIZES))]
        before = pids(t)
        # Three ways to fail an attach: a shard that does not exist, a table shape the shards
        # do not have (their export does not decode), a mesh that cannot hold the shards.
        with pytest.raises(sp.ShardFailedError, match="no running actor"):
            sp.ShardedPageTable.attach(cfg, num_shards=4)
        with pytest.raises(sp.ShardFailedError, match="shape"):
            sp.ShardedPageTable.attach(cfg, max_model_len=MAX_LEN // 2)
        assert all(alive(pid) for pid in before)
        # Neither attach got as far as fencing: the first coordinator still drives the shards,
        # which hold their epoch, checksum and rows.
        assert t.shard_status() == status
        t.append_row([[8], []], 0)
        assert t.commit(ROWS).epoch == 2
        status = t.shard_status()
        snapshots = [t.device_snapshot(g) for g in range(len(PAGE_SIZES))]
        third = sp.ShardedPageTable.attach(cfg)
        try:
            assert third.epoch == t.epoch
            assert [c for _, c in third.shard_status()] == [c for _, c in status]
            for g, snap in enumerate(snapshots):
                np.testing.assert_array_equal(third.device_snapshot(g), snap)
                np.testing.assert_array_equal(third[g].get_cpu_tensor(), snap)
            assert pids(third) == before
        finally:
            third.close(stop_shards=True)  # an attached coordinator stops them only if asked
    finally:
        t.close()


@pytest.mark.parametrize("channel", ["socket", "actor"])
def test_second_coordinator_takes_over_and_fences_the_first(local_ray, channel):
    cfg = config(f"fence-{channel}", channel=channel)
    first = sp.ShardedPageTable.from_config(cfg)
    second = None
    try:
        fill(first)
        second = sp.ShardedPageTable.attach(cfg)
        assert second.generation > first.generation
        # The first coordinator's next change is refused by every shard, and stays refused.
        first.append_row([[8], []], 0)
        with pytest.raises(sp.FencedError, match="newer coordinator"):
            first.commit(ROWS)
        with pytest.raises(sp.FencedError):
            first.commit(ROWS)
        with pytest.raises(sp.FencedError):
            first.recover()  # it must never restart the new owner's shards
        # Nothing of it was published: the new owner sees the old epoch and commits on.
        assert second.epoch == first.epoch
        assert second.device_snapshot(0)[0, :4].tolist() == [1, 2, 3, 0]
        second.append_row([[9], []], 0)
        receipt = second.commit(ROWS)
        assert receipt.epoch == first.epoch + 1
        assert second.device_snapshot(0)[0, :5].tolist() == [1, 2, 3, 9, 0]
        # Closing the fenced coordinator lets go of the shards without stopping them.
        first.close()
        second.append_row([[10], []], 0)
        assert second.commit(ROWS).epoch == receipt.epoch + 1
        # Both commits of the new owner changed shard 0 only; shard 1 holds fill()'s epoch.
        assert [e for e, _ in second.shard_status()] == [receipt.epoch + 1, first.epoch]
    finally:
        first.close()
        if second is not None:
            second.close(stop_shards=True)


def test_run_on_shards_errors_are_the_callers_and_leave_the_table_healthy(local_ray):
    t = sp.ShardedPageTable.from_config(config("run", detached=False, timeout_s=4))
    try:
        fill(t)

        def boom(arrays):
            raise KeyError("no such thing")

        def lock(arrays):
            return threading.Lock()  # cannot be pickled back to the driver

        with pytest.raises(sp.RunOnShardsError, match="KeyError") as info:
            t.run_on_shards(boom)
        assert info.value.shard == 0 and info.value.kind == "KeyError"
        with pytest.raises(sp.RunOnShardsError, match="TypeError"):
            t.run_on_shards(lock)
        # Healthy: the next commit goes through with no recovery.
        t.append_row([[11], []], 0)
        assert t.commit(ROWS).epoch == 2
        assert t.recoveries == []
        assert t.run_on_shards(lambda arrays: int(arrays[0].shape[0])) == [ROWS, ROWS]

        def slow(arrays):
            time.sleep(8)

        with pytest.raises(sp.ShardFailedError) as info:
            t.run_on_shards(slow)
        assert "commit" not in str(info.value) and "run_on_shards" in str(info.value)
        with pytest.raises(sp.ShardFailedError, match="fail-closed"):
            t.commit(ROWS)
        t.recover()
        assert t.device_snapshot(0)[0, :5].tolist() == [1, 2, 3, 11, 0]
    finally:
        t.close()


def test_stopped_shard_process_is_killed_by_recovery(local_ray):
    t = sp.ShardedPageTable.from_config(config("stopped", detached=False, timeout_s=3))
    try:
        fill(t)
        victim = pids(t)[1]
        os.kill(victim, signal.SIGSTOP)
        t.append_row([[12], [13]], ROWS - 1)
        with pytest.raises(sp.ShardFailedError, match="shard 1"):
            t.commit(ROWS)
        t.recover()
        assert not alive(victim), "the stopped shard process outlived its replacement"
        assert victim not in pids(t)
        assert t.commit(ROWS).epoch == 2
        assert t.device_snapshot(1)[ROWS - 1, :3].tolist() == [6, 7, 13]
    finally:
        t.close()
