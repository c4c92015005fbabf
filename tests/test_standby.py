"""ray.standby: a recovery switches to a pre-started, warmed set of shard processes, loses
nothing, and a new standby set is started in the background."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import sharded_pagetable as sp
from sharded_pagetable.config import ConfigError, RayOptions
from sharded_pagetable.testing.chaos import wait_for_exit

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.multiprocess, pytest.mark.chaos]

ROWS, MAX_LEN, PAGE_SIZES = 32, 256, (16, 64)


def pids(placements) -> set[int]:
    return {where["pid"] for where in placements}


def test_recovery_switches_to_the_standby_set(local_ray):
    t = sp.ShardedPageTable(
        ROWS, MAX_LEN, 128, PAGE_SIZES, num_shards=2, backend="ray", recover="auto",
        ray={"devices_per_shard": 1, "timeout_s": 10, "standby": True},
    )  # fmt: skip
    try:
        backend = t._backend
        t.add_row([[1, 2], [3]], 0)
        t.add_row([[4], [5, 6]], ROWS - 1)
        t.commit(ROWS)
        primary, standby = pids(backend.placements), pids(backend._standby.placements)
        assert not primary & standby and len(standby) == 2
        victim = backend.placements[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        assert wait_for_exit(victim, 20)
        t.append_row([[7], []], 0)
        t.append_row([[8], []], ROWS - 1)  # the commit reaches the dead shard 1
        receipt = t.commit(ROWS)  # recovers onto the standby set, then commits
        assert receipt.epoch == 2 and len(t.recoveries) == 1
        assert pids(backend.placements) == standby  # switched, not started anew
        assert sorted(t.lost_kv_rows.tolist()) == [0, ROWS - 1]
        snap = t.device_snapshot(0)
        assert snap[0, :4].tolist() == [1, 2, 7, 0] and snap[ROWS - 1, :3].tolist() == [4, 8, 0]
        backend._replacing.join(120)  # the next standby set starts in the background
        fresh = pids(backend._standby.placements)
        assert len(fresh) == 2 and not fresh & (primary | standby)
        all_pids = pids(backend.placements) | fresh
    finally:
        t.close()
    for pid in all_pids:  # close stops the standby set too
        assert wait_for_exit(pid, 30), f"shard process {pid} outlived close()"
    assert np.all(snap >= 0)


def test_standby_and_detached_do_not_mix():
    with pytest.raises(ConfigError, match="standby"):
        RayOptions(standby=True, detached=True)
    with pytest.raises(ConfigError, match="standby"):
        RayOptions(standby="yes")


def test_survivable_goes_with_detached_but_not_with_standby():
    with pytest.raises(ConfigError, match=r"survivable does not go with ray\.standby"):
        RayOptions(survivable=True, standby=True)
    assert RayOptions(survivable=True, detached=True).detached  # attach works (test_survivable)
