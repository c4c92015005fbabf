"""Pipelined commits on the Ray backend: a shard that dies or stalls while an epoch is in
flight. The epoch is either confirmed whole or never published, later calls say so, and
with recover="auto" the next commit recovers and publishes every pending change.
"""

from __future__ import annotations

import copy
import os
import signal

import numpy as np
import pytest
from reference_model import ReferenceModel

import sharded_pagetable as sp
from sharded_pagetable.testing.chaos import wait_for_exit

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.multiprocess, pytest.mark.chaos]

ROWS, MAX_LEN, PAGE_SIZES = 32, 256, (16, 64)


@pytest.fixture(scope="module")
def table(local_ray):
    t = sp.ShardedPageTable(
        ROWS,
        MAX_LEN,
        128,
        PAGE_SIZES,
        num_shards=2,
        backend="ray",
        recover="auto",
        ray={"devices_per_shard": 1, "timeout_s": 4},
    )
    yield t
    t.close()


def published(t: sp.ShardedPageTable) -> list[np.ndarray]:
    return [t.device_snapshot(g) for g in range(len(PAGE_SIZES))]


def step_ops(k: int) -> list[tuple[str, tuple]]:
    return [
        ("append_row", ([[100 + k], []], 0)),
        ("append_row", ([[200 + k], [300 + k]], ROWS - 1)),
        ("add_row", ([[400 + k, 401 + k], [402 + k]], 1 + k % 3)),
    ]


def apply(tables, ops) -> None:
    for tab in tables:
        for name, args in ops:
            getattr(tab, name)(*args)


@pytest.mark.parametrize("fault", ["killed-before-send", "stalled-after-send", "killed-after-send"])
def test_a_shard_lost_while_an_epoch_is_in_flight(table, fault):
    t = table
    ref = ReferenceModel.for_multigroup(ROWS, MAX_LEN, PAGE_SIZES)
    t.clear()
    apply([t, ref], step_ops(0))
    t.commit(ROWS)
    ref.commit(ROWS)
    before = published(t)
    recoveries = len(t.recoveries)
    apply([t, ref], step_ops(1))
    sent = copy.deepcopy(ref)
    sent.commit(ROWS)  # what the shards hold if the epoch in flight is confirmed
    victim = t._backend.placements[1]["pid"]
    if fault == "killed-before-send":
        os.kill(victim, signal.SIGKILL)
        assert wait_for_exit(victim, 20)
    elif fault == "stalled-after-send":
        os.kill(victim, signal.SIGSTOP)  # it never answers: the ack times out
    receipt = t.commit(ROWS, wait=False)
    assert not receipt.confirmed
    if fault == "killed-after-send":
        os.kill(victim, signal.SIGKILL)
        assert wait_for_exit(victim, 20)
    apply([t, ref], step_ops(2))  # the next step is built meanwhile
    try:
        confirmed = t.wait()
    except sp.ShardFailedError as exc:
        assert exc.epoch == receipt.epoch and exc.shard == 1
        confirmed = None
    if fault != "killed-after-send":
        assert confirmed is None  # a dead or stalled shard cannot have confirmed it
    # A read recovers (recover="auto"): the shards then hold epoch 1, or the whole epoch 2
    # if it was confirmed, never a mix; every later change is still pending.
    want = before if confirmed is None else [sent.device_array(g) for g in range(2)]
    for snap, expect in zip(published(t), want, strict=True):
        np.testing.assert_array_equal(snap, expect)
    assert t.epoch == receipt.epoch - (confirmed is None)
    final = t.commit(ROWS)
    ref.commit(ROWS)
    assert final.confirmed and len(t.recoveries) == recoveries + 1
    for g, snap in enumerate(published(t)):
        np.testing.assert_array_equal(snap, ref.device_array(g))
    assert {e for e, _ in t.shard_status()} == {t.epoch}
