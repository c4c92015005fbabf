"""Survivable shard jobs (``ray.survivable``): a dead shard process is replaced alone.

JAX's coordination service runs in a process that holds no shard and every process has JAX
recoverability on, so when one of four shard processes is SIGKILLed the other three keep
their processes, their tables and device buffers, and what a model step keeps in them (a
marker left in each process stands for its KV). Checked against the reference model.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from reference_model import ReferenceModel

import sharded_pagetable as sp
from sharded_pagetable.testing.chaos import kill_after_send, wait_for_exit

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.multiprocess, pytest.mark.chaos]

ROWS, MAX_LEN, PAGE_SIZES, SHARDS = 32, 256, (16, 64), 4
RPS = ROWS // SHARDS


def make(recover: str = "manual") -> sp.ShardedPageTable:
    return sp.ShardedPageTable(
        ROWS,
        MAX_LEN,
        128,
        PAGE_SIZES,
        num_shards=SHARDS,
        backend="ray",
        warmup=False,
        recover=recover,
        ray={"devices_per_shard": 1, "timeout_s": 10, "survivable": True},
    )


def pids(t: sp.ShardedPageTable) -> list[int]:
    return [where["pid"] for where in t._backend.placements]


def fill(tables) -> None:
    """Rows on every shard, two of them per shard, one row left empty on shard 3."""
    for t in tables:
        for s in range(SHARDS):
            t.add_row([[100 * s + 1, 100 * s + 2], [100 * s + 3]], s * RPS)
            if s != 3:
                t.add_row([[100 * s + 7], []], s * RPS + 5)
        t.commit(ROWS)


def step(tables, k: int) -> None:
    for t in tables:
        for s in range(SHARDS):
            t.append_row([[1000 + 10 * k + s], [2000 + 10 * k + s]], s * RPS)


def assert_same(t: sp.ShardedPageTable, ref: ReferenceModel) -> None:
    for g in range(len(PAGE_SIZES)):
        np.testing.assert_array_equal(t[g].get_cpu_tensor(), ref.host_array(g))
        np.testing.assert_array_equal(t.device_snapshot(g), ref.device_array(g))


def commit_both(t: sp.ShardedPageTable, ref: ReferenceModel) -> None:
    t.commit(ROWS)
    ref.commit(ROWS)
    assert_same(t, ref)


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    assert wait_for_exit(pid, 20), f"process {pid} outlived SIGKILL"


def kv_marker():
    """``(remember, recall)`` for ``run_on_shards``: a marker standing for the KV a model step
    keeps in its process, which survives only with the process (closures: shipped by value)."""

    def remember(arrays):
        import os

        os.environ["SPT_TEST_KV"] = str(os.getpid())
        return os.getpid()

    def recall(arrays):
        import os

        return os.environ.get("SPT_TEST_KV")

    return remember, recall


def live_rows_of(ref: ReferenceModel, shard: int) -> list[int]:
    rows = range(shard * RPS, (shard + 1) * RPS)
    return [r for r in rows if any(len(ref.device[g][r]) for g in range(len(PAGE_SIZES)))]


def check_survivors(t, ref, before: list[int], victim: int) -> None:
    after = pids(t)
    assert [p for s, p in enumerate(after) if s != victim] == [
        p for s, p in enumerate(before) if s != victim
    ], "a survivor was restarted"
    assert after[victim] != before[victim]
    assert t.lost_kv_rows.tolist() == live_rows_of(ref, victim)
    kept = t.run_on_shards(kv_marker()[1])
    for s in range(SHARDS):
        assert kept[s] == (None if s == victim else str(before[s])), (s, kept)
    assert len(t.recoveries) == 1


def kill_then_recover(t, ref, before: list[int], victim: int, k: int) -> None:
    """Shard ``victim``'s process dies between commits: the next commit (step ``k``) fails
    naming it, and ``recover()`` replaces it alone."""
    kill(before[victim])
    step([t, ref], k)
    with pytest.raises(sp.ShardFailedError, match=f"shard {victim}"):
        t.commit(ROWS)
    t.recover()
    check_survivors(t, ref, before, victim)


def test_a_shard_killed_between_commits_is_replaced_alone(local_ray):
    t = make()
    ref = ReferenceModel.for_multigroup(ROWS, MAX_LEN, PAGE_SIZES)
    try:
        fill([t, ref])
        before = pids(t)
        assert t.run_on_shards(kv_marker()[0]) == before
        kill_then_recover(t, ref, before, victim=2, k=1)
        for g in range(len(PAGE_SIZES)):  # published as before; the step is still pending
            np.testing.assert_array_equal(t.device_snapshot(g), ref.device_array(g))
        commit_both(t, ref)
        assert {e for e, _ in t.shard_status()} == {t.epoch}
        step([t, ref], 2)  # and it goes on
        commit_both(t, ref)
    finally:
        t.close()


def test_a_shard_killed_inside_a_blocking_commit_is_replaced_alone_with_auto_recovery(local_ray):
    t = make(recover="auto")
    ref = ReferenceModel.for_multigroup(ROWS, MAX_LEN, PAGE_SIZES)
    try:
        fill([t, ref])
        before = pids(t)
        t.run_on_shards(kv_marker()[0])
        step([t, ref], 1)
        with kill_after_send(t, np.random.default_rng(7)):
            receipt = t.commit(ROWS)  # sent, one shard killed before it answered, retried
        ref.commit(ROWS)
        victim = next(s for s, (a, b) in enumerate(zip(before, pids(t), strict=True)) if a != b)
        check_survivors(t, ref, before, victim)
        assert receipt.epoch == t.epoch == 2
        assert_same(t, ref)
    finally:
        t.close()


def test_two_shards_at_once_then_the_same_shard_again(local_ray):
    t = make()
    ref = ReferenceModel.for_multigroup(ROWS, MAX_LEN, PAGE_SIZES)
    try:
        fill([t, ref])
        before = pids(t)
        for victim in (0, 3):
            kill(before[victim])
        step([t, ref], 1)
        with pytest.raises(sp.ShardFailedError):
            t.commit(ROWS)
        t.recover()
        after = pids(t)
        assert [after[s] == before[s] for s in range(SHARDS)] == [False, True, True, False]
        assert t.lost_kv_rows.tolist() == live_rows_of(ref, 0) + live_rows_of(ref, 3)
        commit_both(t, ref)
        # The replacement of shard 3 dies too, while an epoch is in flight (pipelined).
        step([t, ref], 2)
        with kill_after_send(t, None, shard=3):  # stopped before the epoch goes out
            t.commit(ROWS, wait=False)
        assert wait_for_exit(after[3], 20)
        with pytest.raises(sp.ShardFailedError):
            t.wait()
        t.recover()
        again = pids(t)
        assert again[:3] == after[:3] and again[3] not in (before[3], after[3])
        assert t.lost_kv_rows.tolist() == live_rows_of(ref, 3)
        commit_both(t, ref)  # the pending step goes out again
    finally:
        t.close()


def test_the_service_process_dying_restarts_every_shard(local_ray):
    """Where the job cannot survive (the process hosting JAX's service died), every shard
    is replaced and lost_kv_rows names every live row."""
    t = make()
    ref = ReferenceModel.for_multigroup(ROWS, MAX_LEN, PAGE_SIZES)
    try:
        fill([t, ref])
        before = pids(t)
        service = ray.get(t._backend._set.service.pid.remote(), timeout=30)
        kill(service)
        t.recover()
        assert not set(pids(t)) & set(before)
        every = [r for s in range(SHARDS) for r in live_rows_of(ref, s)]
        assert t.lost_kv_rows.tolist() == every
        step([t, ref], 1)
        commit_both(t, ref)
    finally:
        t.close()


def test_a_shard_killed_during_a_model_step_is_replaced_alone(local_ray):
    """Shard 1's process dies inside a ``run_on_shards`` function (a model step): the call
    fails the table closed, and recovery replaces that shard only."""
    t = make()
    ref = ReferenceModel.for_multigroup(ROWS, MAX_LEN, PAGE_SIZES)
    try:
        fill([t, ref])
        before = pids(t)
        t.run_on_shards(kv_marker()[0])
        victim = before[1]

        def model_step(arrays):
            import os
            import signal

            if os.getpid() == victim:
                os.kill(os.getpid(), signal.SIGKILL)
            return int(arrays[0].shape[0])

        with pytest.raises(sp.ShardFailedError, match="shard 1"):
            t.run_on_shards(model_step)
        with pytest.raises(sp.ShardFailedError, match="fail-closed"):
            t.commit(ROWS)
        t.recover()
        check_survivors(t, ref, before, 1)
        assert t.run_on_shards(model_step) == [ROWS] * SHARDS
        step([t, ref], 1)
        commit_both(t, ref)
    finally:
        t.close()


def test_a_new_coordinator_attaches_and_replaces_one_shard_alone(local_ray):
    """Detached survivable shards: a second coordinator attaches (and fences the first),
    a shard dies under it, and its recovery replaces that shard alone under the same name;
    the first coordinator stays fenced off, a third can still attach after it."""
    from sharded_pagetable.config import TableConfig

    cfg = TableConfig.from_dict(
        {
            "max_num_reqs": ROWS,
            "max_model_len": MAX_LEN,
            "max_num_batched_tokens": 128,
            "page_sizes": list(PAGE_SIZES),
            "num_shards": SHARDS,
            "backend": "ray",
            "ray": {
                "devices_per_shard": 1,
                "timeout_s": 10,
                "survivable": True,
                "detached": True,
                "name": "surv-attach",
                "namespace": "spt_survivable_attach",
            },
        }
    )
    first = sp.ShardedPageTable.from_config(cfg, warmup=False)
    ref = ReferenceModel.for_multigroup(ROWS, MAX_LEN, PAGE_SIZES)
    last = first
    try:
        fill([first, ref])
        before = pids(first)
        first.run_on_shards(kv_marker()[0])
        second = last = sp.ShardedPageTable.attach(cfg)
        assert pids(second) == before
        assert_same(second, ref)
        step([first], 1)
        with pytest.raises(sp.FencedError):
            first.commit(ROWS)
        kill_then_recover(second, ref, before, victim=1, k=2)
        commit_both(second, ref)
        now = pids(second)
        second.close(stop_shards=False)
        third = last = sp.ShardedPageTable.attach(cfg)  # the replacement is in the roster
        assert pids(third) == now
        assert_same(third, ref)
        step([third, ref], 3)
        commit_both(third, ref)
    finally:
        first.close(stop_shards=False)
        last.close(stop_shards=True)
    import time

    import ray as _ray

    def named() -> list:
        return [
            a
            for a in _ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "spt_survivable_attach"
        ]

    deadline = time.monotonic() + 20  # the service, the shards and the spare all went
    while named() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert named() == []
