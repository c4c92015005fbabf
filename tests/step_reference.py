"""An independent numpy model of a step's inputs (a per-token loop), for tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sharded_pagetable.constants import SLOT_MAPPING_PADDING_VAL
from sharded_pagetable.shard.step_inputs import StepInputs


def step_inputs_reference(
    host_tables: Sequence[np.ndarray],
    sched: np.ndarray,
    done: np.ndarray,
    page_sizes: Sequence[int],
    num_shards: int,
    tokens_per_shard: int,
    row_offset: int = 0,
) -> StepInputs:
    """Numpy model of ``build_step_inputs`` (a per-token loop), for tests.

    Takes full-length ``i32[R]`` ``sched``/``done`` and per group ``i32[R, P_g]`` tables.
    """
    num_rows = len(sched)
    rows_per_shard = num_rows // num_shards
    total = num_shards * tokens_per_shard
    token_rows = np.full(total, -1, dtype=np.int32)
    positions = np.zeros(total, dtype=np.int32)
    slots = [np.full(total, SLOT_MAPPING_PADDING_VAL, dtype=np.int32) for _ in page_sizes]
    cu_q_lens = np.zeros((num_shards, rows_per_shard + 1), dtype=np.int32)
    for shard in range(num_shards):
        slot = shard * tokens_per_shard
        for i in range(rows_per_shard):
            row = shard * rows_per_shard + i
            for j in range(int(sched[row])):
                pos = int(done[row]) + j
                token_rows[slot] = row_offset + row
                positions[slot] = pos
                for g, size in enumerate(page_sizes):
                    slots[g][slot] = int(host_tables[g][row, pos // size]) * size + pos % size
                slot += 1
            cu_q_lens[shard, i + 1] = cu_q_lens[shard, i] + int(sched[row])
    kv_lens = (np.asarray(done) + np.asarray(sched)).astype(np.int32)
    return StepInputs(token_rows, positions, tuple(slots), kv_lens, cu_q_lens)
