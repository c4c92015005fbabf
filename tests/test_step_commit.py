"""A commit with a schedule builds the step inputs in the shards: checked against an
independent per-token reference computed from the mirror; bad schedules publish nothing."""

from __future__ import annotations

import numpy as np
import pytest
from step_reference import step_inputs_reference

import sharded_pagetable as sp

ROWS, MAX_LEN, PAGE_SIZES, TOKENS = 32, 256, (16, 64), 128
WIDTHS = tuple(sp.cdiv(MAX_LEN, s) for s in PAGE_SIZES)


def make(num_shards: int, **kw) -> sp.ShardedPageTable:
    return sp.ShardedPageTable(ROWS, MAX_LEN, TOKENS, PAGE_SIZES, num_shards=num_shards, **kw)


def random_step(rng: np.random.Generator, t: sp.ShardedPageTable, num_shards: int):
    """Fill random rows with pages, then a schedule that fits every shard's budget."""
    budget = TOKENS // num_shards
    rps = ROWS // num_shards
    num_reqs = int(rng.integers(1, ROWS + 1))
    sched = np.zeros(num_reqs, np.int64)
    done = np.zeros(num_reqs, np.int64)
    for s in range(num_shards):
        left = budget
        for row in range(s * rps, min((s + 1) * rps, num_reqs)):
            kind = rng.integers(4)  # idle, decode, prefill chunk, empty
            if kind == 3:
                t.clear_row(row)
                continue
            d = int(rng.integers(0, 100))
            n = 0 if kind == 0 else 1 if kind == 1 else int(rng.integers(1, 40))
            n = min(n, left)
            left -= n
            need = d + n
            pages = [
                [int(x) for x in rng.integers(0, 10_000, sp.cdiv(max(need, 1), size))]
                for size in PAGE_SIZES
            ]
            t.add_row(pages, row)
            sched[row - 0], done[row] = n, d
    return num_reqs, sched, done


@pytest.mark.parametrize("num_shards", [1, 2, 4])
@pytest.mark.parametrize("seed", range(4))
def test_step_inputs_match_the_reference(num_shards, seed):
    rng = np.random.default_rng(seed)
    with make(num_shards) as t:
        for _ in range(3):
            num_reqs, sched, done = random_step(rng, t, num_shards)
            receipt = t.commit(num_reqs, num_scheduled_tokens=sched, num_computed_tokens=done)
            assert receipt.changed
            got = t.step_snapshot()
            full_sched = np.zeros(ROWS, np.int32)
            full_done = np.zeros(ROWS, np.int32)
            full_sched[:num_reqs], full_done[:num_reqs] = sched, done
            host = [t.device_snapshot(g) for g in range(len(PAGE_SIZES))]
            want = step_inputs_reference(
                host, full_sched, full_done, PAGE_SIZES, num_shards, TOKENS // num_shards
            )
            np.testing.assert_array_equal(got.token_rows, want.token_rows)
            np.testing.assert_array_equal(got.positions, want.positions)
            for g in range(len(PAGE_SIZES)):
                np.testing.assert_array_equal(got.slot_mapping[g], want.slot_mapping[g])
            np.testing.assert_array_equal(got.kv_lens, want.kv_lens)
            np.testing.assert_array_equal(got.cu_q_lens, want.cu_q_lens)


def test_a_schedule_alone_is_an_epoch_and_a_plain_commit_drops_the_step():
    with make(2) as t:
        t.add_row([[1, 2], [3]], 0)
        r1 = t.commit(1, num_scheduled_tokens=[5], num_computed_tokens=[0])
        r2 = t.commit(1, num_scheduled_tokens=[1], num_computed_tokens=[5])
        assert (r1.epoch, r2.epoch) == (1, 2) and r2.rows == 0
        snap = t.step_snapshot()
        assert snap.token_rows[:2].tolist() == [0, -1] and snap.positions[0] == 5
        assert snap.slot_mapping[0][0] == 1 * 16 + 5 and snap.slot_mapping[1][0] == 3 * 64 + 5
        t.append_row([[4], []], 0)
        t.commit(1)
        with pytest.raises(RuntimeError, match="no schedule"):
            t.step_snapshot()


@pytest.mark.parametrize(
    ("sched", "done", "match"),
    [
        ([1, -1], [0, 0], "row 1"),
        ([1], [0], "num_reqs=2"),
        ([1, 1], [0, 0, 0], "num_reqs=2"),
        ([40, 0], [0, 0], "row 0 needs 40 tokens"),
        ([0, 1], [0, 64], "row 1 needs 65 tokens"),
        ([33, 0], [0, 0], "row 0 needs 33"),
        ([1.0, 0], [0, 0], "integer"),
    ],
)
def test_bad_schedules_publish_nothing(sched, done, match):
    with make(4) as t:
        t.add_row([[1, 2], [3]], 0)
        t.add_row([[4, 5, 6, 7], [8]], 1)
        t.commit(2, num_scheduled_tokens=[1, 1], num_computed_tokens=[0, 0])
        before = (t.epoch, t.step_snapshot(), [t.device_snapshot(g) for g in range(2)])
        t.append_row([[9], []], 1)
        with pytest.raises(ValueError, match=match):
            t.commit(2, num_scheduled_tokens=sched, num_computed_tokens=done)
        assert t.epoch == before[0]
        after = t.step_snapshot()
        np.testing.assert_array_equal(after.token_rows, before[1].token_rows)
        for g in range(2):
            np.testing.assert_array_equal(t.device_snapshot(g), before[2][g])


def test_over_budget_shard_is_named():
    with make(4) as t:  # budget 32 tokens per shard, 8 rows per shard
        for row in (8, 9):
            t.add_row([[1, 2], [3]], row)
        sched = np.zeros(10, np.int64)
        sched[8], sched[9] = 20, 20
        with pytest.raises(ValueError, match=r"shard 1 .*40 tokens, over its budget of 32"):
            t.commit(10, num_scheduled_tokens=sched, num_computed_tokens=np.zeros(10, np.int64))
        assert t.epoch == 0


I64_MAX, U64_MAX = 2**63 - 1, 2**64 - 1


@pytest.mark.parametrize(
    ("sched", "done", "match"),
    [
        # The int64 sum of these wraps negative: once accepted, publishing position -1.
        ([1, 0], [I64_MAX, 0], f"num_computed_tokens of row 0 is {I64_MAX}"),
        ([0, 1], [0, I64_MAX], f"num_computed_tokens of row 1 is {I64_MAX}"),
        (
            np.array([1, 0], np.int64),
            np.array([I64_MAX, 0], np.int64),
            f"num_computed_tokens of row 0 is {I64_MAX}",
        ),
        (
            np.array([1, 0], np.uint64),
            np.array([2**63 - 1, 0], np.uint64),
            f"num_computed_tokens of row 0 is {I64_MAX}",
        ),
        ([2**62, 0], [2**62, 0], f"num_scheduled_tokens of row 0 is {2**62}"),
        ([1, 0], [2**31, 0], f"num_computed_tokens of row 0 is {2**31}"),
        # past int64: refused before any arithmetic
        ([1, 0], [2**64 + 1, 0], str(2**64 + 1)),
        ([1, 0], [2**64 - 1, 0], str(U64_MAX)),
        (np.array([1, 0], np.uint64), np.array([U64_MAX, 0], np.uint64), str(U64_MAX)),
        ([1, 0], [np.uint64(U64_MAX), 0], str(U64_MAX)),
    ],
)
def test_schedules_past_int32_are_refused_and_publish_nothing(sched, done, match):
    """Positions are published as int32: a count past it (or a sum that wraps int64) is
    refused, naming the row and value; epoch, devices, step inputs and mirror stay as they
    were, and the pending change publishes on the next commit."""
    with make(2, backend="local") as t:
        t.add_row([[1, 2], [3]], 0)
        t.add_row([[4], [5]], 1)
        t.commit(2, num_scheduled_tokens=[1, 1], num_computed_tokens=[0, 0])
        t.append_row([[9], []], 1)
        epoch, step = t.epoch, t.step_snapshot()
        devices = [t.device_snapshot(g) for g in range(2)]
        mirror = [(t[g].get_cpu_tensor().copy(), t[g].num_pages_per_row.copy()) for g in range(2)]
        with pytest.raises(ValueError, match=match):
            t.commit(2, num_scheduled_tokens=sched, num_computed_tokens=done)
        assert t.epoch == epoch
        after = t.step_snapshot()
        for name in ("token_rows", "positions", "kv_lens", "cu_q_lens"):
            np.testing.assert_array_equal(getattr(after, name), getattr(step, name))
        for g in range(2):
            np.testing.assert_array_equal(t.device_snapshot(g), devices[g])
            np.testing.assert_array_equal(t[g].get_cpu_tensor(), mirror[g][0])
            np.testing.assert_array_equal(t[g].num_pages_per_row, mirror[g][1])
        t.commit(2)
        assert t.epoch == epoch + 1
        assert t.device_snapshot(0)[1, :2].tolist() == [4, 9]
