"""Pipelined commits: commit(wait=False) returns once every shard's message is on its way,
the scheduler changes rows for the next step meanwhile, and wait() (or any later call)
confirms the epoch or steps everything back.

Semantics are checked against an independent reference model (tests/reference_model.py)
that knows nothing about pipelining: a confirmed epoch is one plain commit of the rows as
they were when it was sent; a failed one never happened.
"""

from __future__ import annotations

import numpy as np
import pytest
from differential import random_ops
from reference_model import ReferenceModel

import sharded_pagetable as sp

ROWS, MAX_LEN, PAGE_SIZES = 32, 256, (16, 64)
WIDTHS = tuple(sp.cdiv(MAX_LEN, s) for s in PAGE_SIZES)


def make(num_shards: int = 4) -> sp.ShardedPageTable:
    return sp.ShardedPageTable(ROWS, MAX_LEN, 128, PAGE_SIZES, num_shards=num_shards)


def model() -> ReferenceModel:
    return ReferenceModel.for_multigroup(ROWS, MAX_LEN, PAGE_SIZES)


def assert_published(t: sp.ShardedPageTable, ref: ReferenceModel) -> None:
    for g in range(len(PAGE_SIZES)):
        np.testing.assert_array_equal(t.device_snapshot(g), ref.device_array(g))


def assert_mirror(t: sp.ShardedPageTable, ref: ReferenceModel) -> None:
    for g in range(len(PAGE_SIZES)):
        np.testing.assert_array_equal(t[g].get_cpu_tensor(), ref.host_array(g))
        np.testing.assert_array_equal(t[g].num_pages_per_row, ref.counts_array(g))


def test_wait_confirms_and_changes_made_meanwhile_go_out_next():
    with make() as t:
        ref = model()
        for tab in (t, ref):
            tab.add_row([[1, 2], [3]], 0)
            tab.add_row([[4], [5]], 20)
        receipt = t.commit(ROWS, wait=False)
        assert not receipt.confirmed and receipt.epoch == 1 and t.epoch == 0
        ref.commit(ROWS)
        # The next step is built while epoch 1 is on its way, touching its rows too.
        for tab in (t, ref):
            tab.append_row([[6], []], 0)
            tab.clear_row(20)
            tab.add_row([[7, 8, 9], [10]], 21)
        confirmed = t.wait()
        assert confirmed.confirmed and confirmed.epoch == 1 == t.epoch
        assert t.wait() is None  # nothing in flight
        assert_published(t, ref)
        assert_mirror(t, ref)
        t.commit(ROWS)
        ref.commit(ROWS)
        assert_published(t, ref)


@pytest.mark.parametrize("num_shards", [1, 2, 4])
@pytest.mark.parametrize("seed", range(6))
def test_random_pipelined_commits_match_the_reference(num_shards, seed):
    rng = np.random.default_rng(seed)
    with make(num_shards) as t:
        ref = model()
        pending = False
        for name, args in random_ops(seed, ROWS, WIDTHS, 300):
            error = ref.expected_error(name, *args)
            if error is not None:
                with pytest.raises(error):
                    getattr(t, name)(*args)
                continue
            if name == "commit":
                if pending and rng.random() < 0.5:
                    t.wait()
                t.commit(*args, wait=bool(rng.random() < 0.6))
                pending = True
            else:
                getattr(t, name)(*args)
            getattr(ref, name)(*args)
        t.wait()
        assert_published(t, ref)
        assert_mirror(t, ref)


def corrupt(t: sp.ShardedPageTable, shard: int) -> None:
    """Make ``shard``'s next checksum disagree: a page changed behind the coordinator."""
    s = t._backend.shards[shard]
    s.tables[0][0, 0] += 1


@pytest.mark.parametrize("surface", ["wait", "commit", "read", "recover"])
def test_a_failed_epoch_in_flight_publishes_nothing_and_keeps_every_change(surface):
    with make() as t:
        ref = model()
        rps = t.layout.rows_per_shard
        for tab in (t, ref):
            tab.add_row([[1, 2], [3]], 2 * rps)
            tab.add_row([[4], [5]], 0)
        t.commit(ROWS)
        ref.commit(ROWS)
        corrupt(t, 2)
        for tab in (t, ref):  # epoch 2: shard 2's row is appended to, so it checks its pages
            tab.append_row([[6], []], 2 * rps)
            tab.append_row([[7], []], 0)
        t.commit(ROWS, wait=False)
        for tab in (t, ref):  # built while epoch 2 is in flight
            tab.append_row([[8], []], 2 * rps)
            tab.add_row([[9], [11]], 1)
        if surface == "wait":
            with pytest.raises(sp.ShardFailedError, match="epoch 2") as info:
                t.wait()
        elif surface == "commit":
            with pytest.raises(sp.ShardFailedError, match="epoch 2") as info:
                t.commit(ROWS)
        elif surface == "read":
            with pytest.raises(sp.ShardFailedError, match="epoch 2") as info:
                t.device_snapshot(0)
        else:
            t.recover()
            info = None
        if info is not None:
            assert info.value.shard == 2 and info.value.epoch == 2
        assert t.epoch == 1
        # Every change, before and during the flight, is still pending in the mirror.
        assert_mirror(t, ref)
        if surface != "recover":
            with pytest.raises(sp.ShardFailedError, match="fail-closed"):
                t.commit(ROWS)
            t.recover()
        # What the shards hold is epoch 1 exactly; the next commit publishes everything.
        assert {e for e, _ in t.shard_status()} == {1}
        receipt = t.commit(ROWS)
        ref.commit(ROWS)
        assert receipt.epoch == 2 and receipt.confirmed
        assert_published(t, ref)


def test_pipelined_schedules_build_step_inputs_in_order():
    with make(2) as t:
        t.add_row([[1, 2], [3]], 0)
        t.commit(1, num_scheduled_tokens=[4], num_computed_tokens=[0], wait=False)
        t.append_row([[4], []], 0)
        t.commit(1, num_scheduled_tokens=[1], num_computed_tokens=[4], wait=False)
        snap = t.step_snapshot()  # settles epoch 2 first
        assert t.epoch == 2
        assert snap.positions[0] == 4 and snap.token_rows[:2].tolist() == [0, -1]
        assert snap.slot_mapping[0][0] == 1 * 16 + 4


def test_close_settles_an_epoch_in_flight():
    t = make(2)
    t.add_row([[1], [2]], 0)
    t.commit(ROWS, wait=False)
    t.close()
    with pytest.raises(RuntimeError, match="closed"):
        t.wait()
