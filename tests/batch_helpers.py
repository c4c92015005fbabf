"""Group-batch helpers the wire and checksum tests share, over the library's own kernels."""

from __future__ import annotations

import numpy as np

from sharded_pagetable.constants import MAX_PAGE_ID, OP_SET
from sharded_pagetable.rows import kernels
from sharded_pagetable.rows.checksum import GroupConsts
from sharded_pagetable.rows.messages import GroupBatch
from sharded_pagetable.shard.shard import check_appends


def apply_group(table: np.ndarray, counts: np.ndarray, batch: GroupBatch) -> None:
    """Write ``batch`` into ``table`` (``i32[rows, P]``) and ``counts`` with the shard's apply
    kernel (its checksum terms are thrown away)."""
    inner = np.zeros(counts.size, np.uint64)
    consts = GroupConsts.build(0, table.shape[1], counts.size)
    kernels.apply_batch(table, counts, inner, batch, consts)


def check_group(counts: np.ndarray, batch: GroupBatch, group: int) -> None:
    """The shard's append check of one group."""
    check_appends(counts, batch, group)


def empty_group() -> GroupBatch:
    return GroupBatch.empty()


def full_width_group(num_rows: int, width: int) -> GroupBatch:
    """Every one of ``num_rows`` rows SET to ``width`` pages of the largest page id: the
    largest group a shard of that shape accepts."""
    return GroupBatch(
        np.full(num_rows, OP_SET, np.int32),
        np.arange(num_rows, dtype=np.int32),
        np.zeros(num_rows, np.int32),
        np.full(num_rows, width, np.int32),
        np.full(num_rows * width, MAX_PAGE_ID, np.int32),
    )
