"""Ray shard processes a commit does not touch are not on its path: one may be stopped
(SIGSTOP) without delaying it, and one that died is found by the next read or the next
commit that touches it, never silently. Checked against the reference model."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from reference_model import ReferenceModel

import sharded_pagetable as sp
from sharded_pagetable.testing.chaos import wait_for_exit

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.multiprocess, pytest.mark.chaos]

ROWS, MAX_LEN, PAGE_SIZES, SHARDS = 32, 256, (16, 64), 4
RPS = ROWS // SHARDS
WIDTHS = tuple(sp.cdiv(MAX_LEN, s) for s in PAGE_SIZES)
TIMEOUT_S = 5  # a commit that waited on a stopped shard would fail after this


def make(recover: str = "manual") -> sp.ShardedPageTable:
    return sp.ShardedPageTable(
        ROWS, MAX_LEN, 128, PAGE_SIZES, num_shards=SHARDS, backend="ray", warmup=False,
        recover=recover,
        ray={"devices_per_shard": 1, "timeout_s": TIMEOUT_S, "survivable": True},
    )  # fmt: skip


def pids(t: sp.ShardedPageTable) -> list[int]:
    return [where["pid"] for where in t._backend.placements]


def both(t, ref, op: str, *args) -> None:
    getattr(t, op)(*args)
    getattr(ref, op)(*args)


def fill(t, ref) -> None:
    for s in range(SHARDS):
        both(t, ref, "add_row", [[100 * s + 1], [100 * s + 2]], s * RPS)
    t.commit(ROWS)
    ref.commit(ROWS)


def assert_same(t, ref) -> None:
    for g in range(len(PAGE_SIZES)):
        np.testing.assert_array_equal(t[g].get_cpu_tensor(), ref.host_array(g))
        np.testing.assert_array_equal(t.device_snapshot(g), ref.device_array(g))


def test_a_stopped_untouched_shard_does_not_delay_a_commit(local_ray):
    t, ref = make(), ReferenceModel(ROWS, WIDTHS)
    stopped = None
    try:
        fill(t, ref)
        stopped = pids(t)[3]
        os.kill(stopped, signal.SIGSTOP)
        for k in range(4):  # each would time out after TIMEOUT_S if it waited on shard 3
            both(t, ref, "append_row", [[1000 + k], []], 0)
            both(t, ref, "append_row", [[2000 + k], []], RPS + 1)
            receipt = t.commit(ROWS, wait=k % 2 == 0)
            ref.commit(ROWS)
            if not receipt.confirmed:
                receipt = t.wait()
            assert [r.shard for r in receipt.shards] == [0, 1]
        assert t.epoch == 5 and t.recoveries == []
        os.kill(stopped, signal.SIGCONT)
        stopped = None
        assert [e for e, _ in t.shard_status()] == [5, 5, 1, 1]
        both(t, ref, "append_row", [[3000], [3001]], 3 * RPS)  # shard 3 is touched again
        assert [r.shard for r in t.commit(ROWS).shards] == [3]
        ref.commit(ROWS)
        assert_same(t, ref)
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        t.close()


def test_an_untouched_shard_that_died_is_found_by_the_next_read(local_ray):
    t, ref = make(), ReferenceModel(ROWS, WIDTHS)
    try:
        fill(t, ref)
        before = pids(t)
        os.kill(before[2], signal.SIGKILL)
        assert wait_for_exit(before[2], 20)
        both(t, ref, "append_row", [[500], [501]], 1)  # shard 0 only: commits
        assert [r.shard for r in t.commit(ROWS).shards] == [0]
        ref.commit(ROWS)
        with pytest.raises(sp.ShardFailedError, match="shard 2"):
            t.device_snapshot(0)
        with pytest.raises(sp.ShardFailedError, match="fail-closed"):
            t.commit(ROWS)
        t.recover()
        after = pids(t)
        assert after[2] != before[2] and [after[s] for s in (0, 1, 3)] == [
            before[s] for s in (0, 1, 3)
        ]
        assert t.lost_kv_rows.tolist() == [2 * RPS]  # shard 2's one live row
        assert [e for e, _ in t.shard_status()] == [2, 1, 2, 1]  # survivors keep theirs
        assert_same(t, ref)
    finally:
        t.close()


def test_an_untouched_shard_that_died_is_found_by_the_commit_that_touches_it(local_ray):
    t, ref = make(recover="auto"), ReferenceModel(ROWS, WIDTHS)
    try:
        fill(t, ref)
        before = pids(t)
        os.kill(before[3], signal.SIGKILL)
        assert wait_for_exit(before[3], 20)
        for k in range(3):  # shards 0 and 1 only
            both(t, ref, "append_row", [[600 + k], []], RPS)
            t.commit(ROWS)
            ref.commit(ROWS)
        assert t.recoveries == []
        both(t, ref, "append_row", [[700], [701]], 3 * RPS)
        receipt = t.commit(ROWS)  # reaches shard 3: found dead, replaced, retried
        ref.commit(ROWS)
        assert len(t.recoveries) == 1 and [r.shard for r in receipt.shards] == [3]
        assert t.lost_kv_rows.tolist() == [3 * RPS]
        assert pids(t)[:3] == before[:3] and pids(t)[3] != before[3]
        assert [e for e, _ in t.shard_status()] == [1, 4, 1, 5]
        assert_same(t, ref)
    finally:
        t.close()
