"""Take-over of detached shards when something dies on the way, and who stops shards.

An attach that fails before its fence leaves the previous coordinator in charge; one that
loses a shard after it completes the take-over as a fail-closed table that ``recover()``
rebuilds from what it read. Only the coordinator that started shards stops them in
``close()``. Real Ray, real shard processes (SIGKILLed), checked against the reference model.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from reference_model import ReferenceModel

import sharded_pagetable as sp
from sharded_pagetable.config import TableConfig

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.multiprocess, pytest.mark.chaos]

ROWS, MAX_LEN, PAGE_SIZES = 16, 512, (16, 64)


def config(name: str, **ray_opts) -> TableConfig:
    return TableConfig.from_dict(
        {
            "max_num_reqs": ROWS,
            "max_model_len": MAX_LEN,
            "max_num_batched_tokens": 128,
            "page_sizes": list(PAGE_SIZES),
            "num_shards": 2,
            "backend": "ray",
            "warmup": False,
            "ray": {
                "devices_per_shard": 1,
                "timeout_s": 20,
                "namespace": "spt_takeover_tests",
                "name": name,
                "detached": True,
                **ray_opts,
            },
        }
    )


def pids(t: sp.ShardedPageTable) -> list[int]:
    return [where["pid"] for where in t._backend.placements]


def alive(pid: int) -> bool:
    from ray_actors.cluster import _is_zombie, process_start_ticks

    return process_start_ticks(pid) is not None and not _is_zombie(pid)


def kill(pid: int) -> None:
    from sharded_pagetable.testing.chaos import wait_for_exit

    os.kill(pid, signal.SIGKILL)
    assert wait_for_exit(pid, 20), f"shard process {pid} did not exit"


def fill(tables) -> None:
    """Two epochs on both tables: rows on both shards, one of them appended to later."""
    for t in tables:
        t.add_row([[1, 2, 3], [4]], 0)
        t.add_row([[5], [6, 7]], ROWS - 1)
        t.commit(ROWS)
        t.append_row([[8], []], ROWS - 1)
        t.commit(ROWS)


def assert_published(t: sp.ShardedPageTable, ref: ReferenceModel) -> None:
    for g in range(len(PAGE_SIZES)):
        np.testing.assert_array_equal(t[g].get_cpu_tensor(), ref.host_array(g))
        np.testing.assert_array_equal(t.device_snapshot(g), ref.device_array(g))


def test_a_shard_lost_after_the_fence_still_completes_the_take_over(local_ray, monkeypatch):
    """The fence is the point of no return: shard 1 dies right after it (before it is
    settled and exported). The new coordinator owns the table anyway, fail-closed, and
    rebuilds shard 1 from what it read of it before the fence; the old one is fenced off."""
    from ray_actors.backend import RayBackend

    cfg = config("lost-after-fence")
    first = sp.ShardedPageTable.from_config(cfg)
    ref = ReferenceModel.for_multigroup(ROWS, MAX_LEN, PAGE_SIZES)
    second = None
    try:
        fill([first, ref])
        victim = pids(first)[1]
        fence = RayBackend.fence

        def fence_then_die(self, generation):
            results = fence(self, generation)
            kill(victim)
            return results

        monkeypatch.setattr(RayBackend, "fence", fence_then_die)
        second = sp.ShardedPageTable.attach(cfg)
        monkeypatch.setattr(RayBackend, "fence", fence)
        assert second.epoch == first.epoch == 2
        for g in range(len(PAGE_SIZES)):  # the mirror holds every row, shard 1's included
            np.testing.assert_array_equal(second[g].get_cpu_tensor(), ref.device_array(g))
        first.append_row([[9], []], 0)
        with pytest.raises(sp.FencedError):
            first.commit(ROWS)  # the old coordinator cannot take the table back
        second.append_row([[10], []], 0)
        ref.append_row([[10], []], 0)
        with pytest.raises(sp.ShardFailedError, match="fail-closed") as info:
            second.commit(ROWS)
        assert info.value.shard == 1
        second.recover()
        assert second.epoch == 2 and victim not in pids(second)
        assert_published(second, ref)
        assert second.commit(ROWS).epoch == 3
        ref.commit(ROWS)
        assert_published(second, ref)
        assert [e for e, _ in second.shard_status()] == [3, 2]  # epoch 3 changed row 0 only
    finally:
        first.close()
        if second is not None:
            second.close(stop_shards=True)


def test_an_attach_that_fails_before_the_fence_leaves_the_old_coordinator_in_charge(local_ray):
    cfg = config("lost-before-fence", timeout_s=5)
    first = sp.ShardedPageTable.from_config(cfg)
    ref = ReferenceModel.for_multigroup(ROWS, MAX_LEN, PAGE_SIZES)
    try:
        fill([first, ref])
        kill(pids(first)[1])
        with pytest.raises(sp.ShardFailedError, match="shard 1"):
            sp.ShardedPageTable.attach(cfg)
        # Never fenced: the old coordinator finds the dead shard at its next commit that
        # reaches it, recovers it and goes on.
        first.append_row([[11], [12]], ROWS - 1)
        ref.append_row([[11], [12]], ROWS - 1)
        with pytest.raises(sp.ShardFailedError, match="shard 1"):
            first.commit(ROWS)
        first.recover()
        first.commit(ROWS)
        ref.commit(ROWS)
        assert_published(first, ref)
    finally:
        first.close()


def test_only_the_coordinator_that_started_shards_stops_them(local_ray):
    cfg = config("who-stops")
    first = sp.ShardedPageTable.from_config(cfg)
    started = pids(first)
    ref = ReferenceModel.for_multigroup(ROWS, MAX_LEN, PAGE_SIZES)
    fill([first, ref])
    first._backend.detach()  # the old driver is gone; its detached shards run on
    second = sp.ShardedPageTable.attach(cfg)
    second.close()  # attached: lets go, stops nothing
    assert all(alive(pid) for pid in started)
    third = sp.ShardedPageTable.attach(cfg)
    try:
        assert pids(third) == started
        assert_published(third, ref)
    finally:
        third.close(stop_shards=True)  # the explicit final shutdown of a detached table
    from sharded_pagetable.testing.chaos import wait_for_exit

    assert all(wait_for_exit(pid, 20) for pid in started)
    with pytest.raises(sp.ShardFailedError, match="no running actor"):
        sp.ShardedPageTable.attach(cfg)
