"""A serving workload end to end: schedule, commit with the schedule, and in the shard
processes KV copies, K/V writes and paged attention through the committed table. After every
step every scheduled token's attention output must equal dense causal attention recomputed
on the driver from that request's own K/V (float32, 1e-4), migrated rows included.
"""

from __future__ import annotations

import numpy as np
import pytest

import sharded_pagetable as sp
from sharded_pagetable.serving.runner import AttentionConfig, drop_cache, max_error, serve_step
from sharded_pagetable.serving.sharded_workload import ShardedServingWorkload
from sharded_pagetable.serving.workload import WorkloadConfig, apply_ops

ROWS, MAX_LEN, PAGE_SIZES, BUDGET, POOL = 32, 256, (16, 32), 64, 128
TOL = 1e-4


def workload(num_shards: int, seed: int, migrate: bool) -> ShardedServingWorkload:
    config = WorkloadConfig(
        seed=seed,
        arrivals_per_step=1.5,
        prompt_len=(4, 48),
        output_len=(8, 40),
        token_budget=BUDGET,
    )
    return ShardedServingWorkload(
        config, ROWS, MAX_LEN, PAGE_SIZES, num_shards, POOL, migrate=migrate
    )


def serve(table: sp.ShardedPageTable, wl: ShardedServingWorkload, steps: int, name: str):
    """Run ``steps`` steps; returns (tokens checked, worst error, migrations, copies)."""
    cfg = AttentionConfig(name, PAGE_SIZES, table.num_shards, POOL)
    checked = worst = copies = 0
    try:
        for _ in range(steps):
            st = wl.step()
            apply_ops(table, st.ops)
            receipt = table.commit(
                st.num_reqs, num_scheduled_tokens=st.scheduled, num_computed_tokens=st.computed
            )
            copies += sum(p.shape[1] for p in receipt.kv_copies)
            uids = np.full(ROWS, -1, np.int32)
            uids[: st.num_reqs] = st.row_uids
            results = table.run_on_shards(serve_step, cfg, uids, step=True)
            n, err = max_error(cfg, results, uids)
            assert err < TOL, f"attention differs from dense by {err}"
            checked += n
            worst = max(worst, err)
    finally:
        table.run_on_shards(lambda arrays, name: drop_cache(name), name)
    return checked, worst, wl.migrations, copies


@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_local_serving_steps_match_dense_attention(num_shards):
    with sp.ShardedPageTable(
        ROWS, MAX_LEN, BUDGET, PAGE_SIZES, num_shards=num_shards, pages_per_shard=POOL
    ) as t:
        checked, worst, _, _ = serve(t, workload(num_shards, 1, False), 25, f"e2e-{num_shards}")
    assert checked > 200 and worst < TOL


@pytest.mark.parametrize("num_shards", [2, 4])
def test_local_migrations_carry_their_kv(num_shards):
    with sp.ShardedPageTable(
        ROWS, MAX_LEN, BUDGET, PAGE_SIZES, num_shards=num_shards, pages_per_shard=POOL
    ) as t:
        wl = workload(num_shards, 7, True)
        checked, worst, migrations, copies = serve(t, wl, 60, f"mig-{num_shards}")
    assert migrations > 0 and copies > 0, "the workload never migrated a row"
    assert checked > 500 and worst < TOL


ray = pytest.importorskip("ray")


@pytest.mark.ray
@pytest.mark.multiprocess
@pytest.mark.parametrize("processes", [2, 4])
def test_ray_serving_steps_in_the_shard_processes(local_ray, processes):
    t = sp.ShardedPageTable(
        ROWS,
        MAX_LEN,
        BUDGET,
        PAGE_SIZES,
        num_shards=processes,
        pages_per_shard=POOL,
        backend="ray",
        ray={"devices_per_shard": 4 // processes if processes < 4 else 1, "timeout_s": 60},
    )
    try:
        wl = workload(processes, 7, True)
        checked, worst, migrations, copies = serve(t, wl, 40, f"ray-{processes}")
        pids = {where["pid"] for where in t._backend.placements}
        assert len(pids) == processes  # computed in the shard processes themselves
    finally:
        t.close()
    assert checked > 300 and worst < TOL
    assert migrations > 0 and copies > 0
