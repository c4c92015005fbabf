"""Slot mapping for a paged-attention kernel, computed from a host page table.

For scheduled token ``i`` of request row ``req_indices[i]`` at position ``positions[i]``::

    slot[i] = table[row, pos // page_size] * page_size + pos % page_size

padded with ``SLOT_MAPPING_PADDING_VAL`` to ``max_num_batched_tokens``.
"""

from __future__ import annotations

import numpy as np

from ..constants import SLOT_MAPPING_PADDING_VAL
from .validation import int_vector


def compute_slot_mapping(
    table: np.ndarray,
    counts: np.ndarray,
    page_size: int,
    req_indices: object,
    positions: object,
    max_num_batched_tokens: int,
) -> np.ndarray:
    """``i32[max_num_batched_tokens]`` KV-cache slots of the scheduled tokens.

    Args:
      table: ``i32[R, P]`` host page table; counts: ``i32[R]`` pages held per row.
      page_size: tokens per page of this group.
      req_indices, positions: per-token row and position (same length).
      max_num_batched_tokens: length of the padded output.

    Raises ``ValueError`` for mismatched lengths or too many tokens, ``IndexError`` for a row
    out of range or a position past the pages its row holds.
    """
    rows = int_vector(req_indices, "req_indices")
    pos = int_vector(positions, "positions")
    if rows.size != pos.size:
        raise ValueError(f"{rows.size} req_indices but {pos.size} positions")
    if rows.size > max_num_batched_tokens:
        raise ValueError(
            f"{rows.size} tokens exceed max_num_batched_tokens={max_num_batched_tokens}"
        )
    out = np.full(max_num_batched_tokens, SLOT_MAPPING_PADDING_VAL, dtype=np.int32)
    if rows.size == 0:
        return out
    num_rows = table.shape[0]
    bad_row = (rows < 0) | (rows >= num_rows)
    if bad_row.any():
        i = int(np.flatnonzero(bad_row)[0])
        raise IndexError(f"token {i}: row {int(rows[i])} is out of range 0..{num_rows - 1}")
    page = pos // page_size
    bad_pos = (pos < 0) | (page >= counts[rows])
    if bad_pos.any():
        i = int(np.flatnonzero(bad_pos)[0])
        raise IndexError(
            f"token {i}: position {int(pos[i])} of row {int(rows[i])} needs page "
            f"{int(page[i])} but the row holds {int(counts[rows[i]])} pages of {page_size} tokens"
        )
    slots = table[rows, page].astype(np.int64) * page_size + pos % page_size
    if slots.max() > np.iinfo(np.int32).max:
        raise ValueError("slot ids overflow int32: page id * page_size must stay below 2**31")
    out[: rows.size] = slots
    return out
