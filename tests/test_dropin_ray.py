"""The drop-in contract on Ray shard processes (issue 20): a table that is never committed
starts no process, shards start at first use, dropped tables leave no shard process, and
row counts that do not divide work as on ``MultiGroupPageTable``."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
from differential import random_ops, run_differential

import sharded_pagetable as sp
from sharded_pagetable.testing.chaos import wait_for_exit

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.multiprocess]

MAX_LEN, TOKENS, PAGE_SIZES = 256, 64, (16, 64)
WIDTHS = tuple(sp.cdiv(MAX_LEN, s) for s in PAGE_SIZES)
RAY = {"devices_per_shard": 1, "timeout_s": 60}


def ray_table(rows: int = 8, num_shards: int = 1) -> sp.ShardedPageTable:
    # Only the seed's arguments: the rest comes from the default (sp.configure below).
    return sp.ShardedPageTable(rows, MAX_LEN, TOKENS, list(PAGE_SIZES))


@pytest.fixture
def ray_default(local_ray):
    """Ray tables by default, as an engine user would configure them once."""
    sp.configure(backend="ray", ray=RAY)
    yield
    sp.configure()


def shard_pids(table: sp.ShardedPageTable) -> list[int]:
    return [where["pid"] for where in table._backend.placements]


def test_dropped_tables_leave_no_shard_process(ray_default):
    """Sixteen Ray tables built and dropped without close(), as an engine does: the ones
    never committed started nothing (and cost no more than their host mirror); the ones
    used start at their first commit, and their shard processes exit once they are
    dropped."""
    t0 = time.perf_counter()
    tables = [ray_table() for _ in range(16)]
    built = time.perf_counter() - t0
    assert built < 2.0, f"building 16 never-committed Ray tables took {built:.2f}s"
    assert not any(t.started for t in tables)
    used = tables[:2]
    for i, t in enumerate(used):
        t.add_row([[i + 1], [i + 2]], 3)
        t.commit(8)
    assert [t.device_snapshot(0)[3, 0] for t in used] == [1, 2]
    pids = [pid for t in used for pid in shard_pids(t)]
    assert len(pids) == 2 and all(t.started for t in used)
    del tables, used, t
    gc.collect()
    gone = [wait_for_exit(pid, 30) for pid in pids]
    assert all(gone), f"shard processes of dropped tables still run: {pids} {gone}"


def test_rows_that_do_not_divide_work_on_ray(ray_default):
    """Three rows on two shard processes of one device each: the capacity is four, row 3 is
    refused as MultiGroupPageTable(3, ...) refuses it, and the shards hold the same table."""
    t = sp.ShardedPageTable(3, MAX_LEN, TOKENS, list(PAGE_SIZES), num_shards=2)
    ref = sp.MultiGroupPageTable(3, MAX_LEN, TOKENS, list(PAGE_SIZES), warmup=False)
    try:
        assert (t.layout.max_num_reqs, t.layout.rows_per_shard, t.started) == (4, 2, False)
        assert (
            run_differential(
                t, ref, random_ops(5, 3, WIDTHS, 80), lambda x, g: x.device_snapshot(g)
            )
            > 5
        )
        for call in (lambda x: x.add_row([[1], [2]], 3), lambda x: x.commit(4)):
            errors = []
            for table in (t, ref):
                with pytest.raises((ValueError, IndexError)) as info:
                    call(table)
                errors.append((type(info.value), str(info.value)))
            assert errors[0] == errors[1]
        assert t.device_snapshot(0).shape == (3, WIDTHS[0])
        last = t.run_on_shards(lambda arrays: np.asarray(arrays[0].addressable_shards[0].data))
        assert last[1].shape == (2, WIDTHS[0]) and not last[1][1].any()  # capacity row 3
    finally:
        t.close()
