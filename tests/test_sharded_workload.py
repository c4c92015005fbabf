"""The data-parallel serving workload against a pooled ShardedPageTable and the reference model.

Every step is replayed on a real ``ShardedPageTable(..., pages_per_shard=P)`` (which refuses
foreign pages, over-budget shards and uncovered positions) and on the reference model; the
checks below are made from the table's mirror and the step's own arrays, not from the
workload's bookkeeping.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from reference_model import ReferenceModel

import sharded_pagetable as sp
from sharded_pagetable.serving.sharded_workload import ShardedServingWorkload, offset_op
from sharded_pagetable.serving.workload import ServingWorkload, WorkloadConfig, apply_ops

ROWS, MAX_LEN, PAGE_SIZES, BUDGET, POOL = 32, 256, (16, 64), 64, 96

# Decode-heavy: many long-lived decode rows, so a shard whose requests finish late fills its
# budget while another, whose requests finished, has room.
DECODE_HEAVY = WorkloadConfig(
    seed=0, arrivals_per_step=1.0, prompt_len=(4, 48), output_len=(16, 128), token_budget=BUDGET
)
BUSY = dataclasses.replace(DECODE_HEAVY, arrivals_per_step=2.5, prompt_len=(8, 96))


def workload(cfg: WorkloadConfig, shards: int, *, migrate: bool = False) -> ShardedServingWorkload:
    return ShardedServingWorkload(cfg, ROWS, MAX_LEN, PAGE_SIZES, shards, POOL, migrate=migrate)


def table(shards: int) -> sp.ShardedPageTable:
    return sp.ShardedPageTable(
        ROWS, MAX_LEN, BUDGET, PAGE_SIZES, num_shards=shards, pages_per_shard=POOL, warmup=False
    )


def replay_on_model(model: ReferenceModel, ops) -> list[list[list[int]]]:
    """Apply ``ops`` to the model; a pooled cross-shard ``move_row(src, tgt, new)`` gives
    ``tgt`` the pages ``new``. Returns, per such move, the pages ``src`` held ([group])."""
    moved_from = []
    for name, args in ops:
        if name == "move_row" and len(args) == 3:
            src, tgt, new = args
            moved_from.append([list(model.host[g][src]) for g in range(model.num_groups)])
            model.add_row(new, tgt)
        else:
            model.apply(name, *args)
    return moved_from


class Tracker:
    """Per-request history read from the steps: next position, shard, lengths."""

    def __init__(self, wl: ShardedServingWorkload) -> None:
        self.wl = wl
        self.next_pos: dict[int, int] = {}
        self.shard: dict[int, int] = {}
        self.lengths: dict[int, tuple[int, int]] = {}
        self.done: set[int] = set()
        self.moves = 0

    def check(self, step, where: str) -> None:
        rps = self.wl.rows_per_shard
        n = step.num_reqs
        for name in ("scheduled", "computed", "row_uids"):
            arr = getattr(step, name)
            assert arr.dtype == np.int32 and arr.shape == (n,), f"{where}: {name}"
        uids = step.row_uids
        live = uids[uids >= 0].tolist()
        assert len(live) == len(set(live)), f"{where}: a request in two rows"
        assert n == 0 or uids[n - 1] >= 0, f"{where}: num_reqs past the last live row"
        reqs = {r.rid: r for shard in self.wl.shards for r in shard.rows}
        assert set(live) == set(reqs), where
        for s in range(self.wl.num_shards):
            block = uids[s * rps : (s + 1) * rps]
            k = int((block >= 0).sum())
            assert np.all(block[:k] >= 0), f"{where}: shard {s}'s block has a hole"
            # Decode rows first in every shard (prefill: computed before this step < prompt).
            prefill = [
                step.computed[s * rps + i] < reqs[int(u)].prompt_len
                for i, u in enumerate(block[:k])
            ]
            assert prefill == sorted(prefill), f"{where}: shard {s} not decode-first"
        # Finished: every token of the request was scheduled exactly once, in order.
        for rid in set(self.next_pos) - set(live) - self.done:
            prompt, output = self.lengths[rid]
            assert self.next_pos[rid] == prompt + output - 1, f"{where}: request {rid}"
            self.done.add(rid)
        # Tokens: row order, consecutive positions from each request's computed count,
        # which carries on across migrations.
        assert step.token_rows.tolist() == sorted(step.token_rows.tolist()), where
        for row, uid in enumerate(uids.tolist()):
            pos = step.token_positions[step.token_rows == row]
            if uid < 0:
                assert pos.size == 0 and step.scheduled[row] == 0, f"{where}: row {row}"
                continue
            computed = int(step.computed[row])
            assert computed == self.next_pos.get(uid, 0), f"{where}: request {uid}'s position"
            assert pos.tolist() == list(range(computed, computed + int(step.scheduled[row])))
            self.next_pos[uid] = computed + pos.size
            self.lengths[uid] = (reqs[uid].prompt_len, reqs[uid].output_len)
            shard = row // rps
            if self.shard.setdefault(uid, shard) != shard:
                self.moves += 1
                self.shard[uid] = shard


def run(shards: int, cfg: WorkloadConfig, steps: int, *, migrate: bool) -> dict[str, int]:
    wl = workload(cfg, shards, migrate=migrate)
    model = ReferenceModel.for_multigroup(ROWS, MAX_LEN, PAGE_SIZES)
    tracker = Tracker(wl)
    rps = ROWS // shards
    migrations = kv_pages = 0
    with table(shards) as t:
        for step_no in range(steps):
            step = wl.step()
            where = f"S={shards} step {step_no}"
            moves_before = tracker.moves
            apply_ops(t, step.ops)
            moved_from = replay_on_model(model, step.ops)
            for name, args in step.ops:
                if name == "move_row" and len(args) == 3:  # a migration: fresh target pages
                    src, tgt, new = args
                    assert src // rps != tgt // rps, where
                    lo = tgt // rps * POOL
                    assert all(lo <= p < lo + POOL for ids in new for p in ids), where
            receipt = t.commit(
                step.num_reqs,
                num_scheduled_tokens=step.scheduled,
                num_computed_tokens=step.computed,
            )
            model.commit(step.num_reqs)
            tracker.check(step, where)
            assert tracker.moves - moves_before == step.migrations == len(moved_from), where
            assert step.token_rows.size == int(step.scheduled.sum()), where
            for s in range(shards):
                assert step.scheduled[s * rps : (s + 1) * rps].sum() <= BUDGET // shards, where
            for g in range(len(PAGE_SIZES)):
                cpu, counts = t[g].get_cpu_tensor(), t[g].num_pages_per_row
                np.testing.assert_array_equal(cpu, model.host_array(g), where)
                np.testing.assert_array_equal(counts, model.counts_array(g), where)
                held = []
                for row in range(ROWS):
                    pages = cpu[row, : counts[row]]
                    live = row < step.num_reqs and step.row_uids[row] >= 0
                    assert (counts[row] > 0) == live, f"{where}: row {row}"
                    s = row // rps
                    assert np.all((pages >= s * POOL) & (pages < (s + 1) * POOL)), where
                    held.extend(pages.tolist())
                assert len(held) == len(set(held)), f"{where}: group {g} page held twice"
                assert sorted(held) == sorted(wl.live_pages()[g]), where
                # Migrations: the receipt's copies are the moved requests' old pages into
                # their new ones; the old pages stay out of every live row this step.
                copies = receipt.kv_copies[g] if receipt.kv_copies else np.zeros((2, 0))
                old = [p for pages in moved_from for p in pages[g]]
                assert sorted(copies[0].tolist()) == sorted(old), where
                assert not set(old) & set(held), where
                assert sorted(wl.copying_pages()[g]) == sorted(old), where
            kv = sum(len(p) for pages in moved_from for p in pages)
            assert step.kv_pages_moved == kv, where
            migrations += step.migrations
            kv_pages += step.kv_pages_moved
            if step_no % 25 == 0:
                for g in range(len(PAGE_SIZES)):
                    np.testing.assert_array_equal(t.device_snapshot(g), model.device_array(g))
    assert migrations == wl.migrations and kv_pages == wl.kv_pages_moved
    return {"served": wl.served, "migrations": migrations, "kv_pages": kv_pages}


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_pinned_requests_fit_their_shards_schedule(shards):
    out = run(shards, BUSY, 200, migrate=False)
    assert out["served"] > 10 * shards
    assert out["migrations"] == 0


@pytest.mark.parametrize("shards", [2, 4])
def test_migration_moves_decode_requests_with_their_kv(shards):
    out = run(shards, DECODE_HEAVY, 200, migrate=True)
    assert out["migrations"] > 5
    assert out["kv_pages"] >= out["migrations"]  # every moved request holds pages
    assert out["served"] > 20


def step_key(step):
    return (
        step.ops,
        step.num_reqs,
        step.token_rows.tolist(),
        step.token_positions.tolist(),
        step.scheduled.tolist(),
        step.computed.tolist(),
        step.row_uids.tolist(),
        step.finished,
        step.admitted,
    )


@pytest.mark.parametrize("migrate", [False, True])
@pytest.mark.parametrize("cfg", [BUSY, DECODE_HEAVY], ids=["busy", "decode_heavy"])
def test_one_shard_is_the_serving_workload(cfg, migrate):
    """S=1 runs ServingWorkload's algorithm on the whole table: the same steps, op for op."""
    single = ServingWorkload(
        dataclasses.replace(cfg, pages_per_group=(POOL,) * len(PAGE_SIZES)),
        ROWS,
        MAX_LEN,
        PAGE_SIZES,
    )
    sharded = workload(cfg, 1, migrate=migrate)
    for _ in range(200):
        assert step_key(sharded.step()) == step_key(single.step())
    assert sharded.served == single.served > 0


def test_step_fields_match_tokens_for_serving_workload():
    wl = ServingWorkload(BUSY, ROWS, MAX_LEN, PAGE_SIZES)
    for _ in range(60):
        step = wl.step()
        assert step.row_uids.tolist() == [r.rid for r in wl.rows]
        rows = np.repeat(np.arange(step.num_reqs, dtype=np.int32), step.scheduled)
        assert step.token_rows.tolist() == rows.tolist()
        starts = np.repeat(step.computed, step.scheduled)
        offsets = np.arange(rows.size) - np.repeat(
            np.cumsum(step.scheduled) - step.scheduled, step.scheduled
        )
        assert step.token_positions.tolist() == (starts + offsets).tolist()
        assert step.migrations == step.kv_pages_moved == 0


def test_offset_op_and_validation():
    assert offset_op(("swap_row", (1, 2)), 8, 100) == ("swap_row", (9, 10))
    assert offset_op(("add_row", ([[0, 1], [2]], 3)), 8, 100) == (
        "add_row",
        ([[100, 101], [102]], 11),
    )
    assert offset_op(("append_rows_batch", ([[[0], []]], [0])), 8, 100) == (
        "append_rows_batch",
        ([[[100], []]], [8]),
    )
    with pytest.raises(ValueError, match="divide"):
        ShardedServingWorkload(BUSY, 30, MAX_LEN, PAGE_SIZES, 4, POOL)
    with pytest.raises(ValueError, match="pages_per_group"):
        ShardedServingWorkload(
            dataclasses.replace(BUSY, pages_per_group=(10, 10)), ROWS, MAX_LEN, PAGE_SIZES, 2, POOL
        )
    with pytest.raises(ValueError, match="pool"):
        ShardedServingWorkload(BUSY, ROWS, MAX_LEN, PAGE_SIZES, 2, 4)
