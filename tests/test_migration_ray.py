"""A shard killed with a KV copy plan pending (Ray): the plan is never copied twice and is
either still pending (the commit that carried it failed and is retried whole) or gone with
the KV it referred to (a recovery after it was published: lost_kv_rows names the rows)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import sharded_pagetable as sp
from sharded_pagetable.testing.chaos import kill_after_send, wait_for_exit

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.multiprocess, pytest.mark.chaos]

ROWS, MAX_LEN, PAGE_SIZES, POOL = 32, 256, (16, 64), 64
RPS = ROWS // 2


def test_a_kill_never_copies_a_plan_twice_or_in_part(local_ray):

    def pending_plans(arrays, step):  # in a shard process (shipped by value): its plans
        return [[p.tolist() for p in rounds] for rounds in step.kv_copies]

    t = sp.ShardedPageTable(
        ROWS, MAX_LEN, 128, PAGE_SIZES, num_shards=2, pages_per_shard=POOL, backend="ray",
        recover="auto", ray={"devices_per_shard": 1, "timeout_s": 10},
    )  # fmt: skip
    try:
        t.add_row([[1, 2, 3], [4]], 0)
        t.commit(ROWS)
        tgt = RPS + 2  # shard 1's pool is [64, 128)
        t.move_row(0, tgt, page_ids=[[70, 71, 72], [73]])
        plan = [[[1, 2, 3], [70, 71, 72]], [[4], [73]]]
        # Killed while the commit that carries the plan is in flight: nothing was
        # published, the commit is retried after the recovery, the plan goes out once.
        with kill_after_send(t, np.random.default_rng(0)):
            receipt = t.commit(ROWS)
        assert len(t.recoveries) == 1 and receipt.epoch == 2
        assert [p.tolist() for p in receipt.kv_copies] == plan
        for held in t.run_on_shards(pending_plans, step=True):
            assert held == [[plan[0]], [plan[1]]]  # every shard: one round, the whole plan
        # Killed after that epoch was published, before a model step took the plan: the
        # recovery replaces every shard process, the KV the plan referred to is gone, the
        # rows are reported, and no shard holds the plan any more.
        victim = t._backend.placements[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        assert wait_for_exit(victim, 20)
        snap = t.device_snapshot(0)  # recovers first
        assert len(t.recoveries) == 2
        assert snap[tgt, :4].tolist() == [70, 71, 72, 0]
        assert {0, tgt} <= set(t.lost_kv_rows.tolist())
        for held in t.run_on_shards(pending_plans, step=True):
            assert held == [[], []]
        # A later commit carries no stale copy.
        t.append_row([[5], []], 0)
        assert [p.shape[1] for p in t.commit(ROWS).kv_copies] == [0, 0]
    finally:
        t.close()
