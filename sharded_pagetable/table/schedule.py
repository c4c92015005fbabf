"""A model step's schedule, checked on the host before anything is sent.

A scheduler gives, per row below ``num_reqs``, the tokens it schedules now and the tokens
already computed (the vLLM and EasyDeL convention). :func:`check_schedule` refuses one that
no shard could serve and widens it to every row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..constants import cdiv
from ..shard.messages import Schedule
from .validation import int_vector


def check_schedule(
    counts: Sequence[np.ndarray],
    sched: object,
    done: object,
    num_reqs: int,
    page_sizes: Sequence[int],
    num_shards: int,
    tokens_per_shard: int,
) -> Schedule:
    """Validate a step's schedule on the host and widen it to all ``R`` rows.

    Args:
      counts: per group ``i32[R]`` pages each row holds.
      sched, done: ``int[num_reqs]`` scheduled and already computed tokens per row.
      num_reqs: rows in use; rows ``>= num_reqs`` get zeros.
      page_sizes: tokens per page, per group.
      num_shards, tokens_per_shard: ``R`` rows in ``num_shards`` equal blocks, each with a
        budget of ``tokens_per_shard`` tokens.

    Raises ``ValueError`` naming the row (negative value, pages that do not cover
    ``done + sched`` tokens in some group) or shard (budget exceeded), or the bad length.
    """
    if len(counts) != len(page_sizes) or not counts:
        raise ValueError(f"{len(counts)} groups of counts for page_sizes {list(page_sizes)}")
    num_rows = len(counts[0])
    if num_shards < 1 or num_rows % num_shards:
        raise ValueError(f"num_shards={num_shards} must be positive and divide {num_rows} rows")
    if not 0 <= num_reqs <= num_rows:
        raise ValueError(f"num_reqs={num_reqs} is out of range 0..{num_rows}")
    arrays = {"num_scheduled_tokens": sched, "num_computed_tokens": done}
    full = {}
    for what, values in arrays.items():
        arr = int_vector(values, what)
        if arr.size != num_reqs:
            raise ValueError(f"{what} has {arr.size} entries, but num_reqs={num_reqs}")
        if arr.size and arr.min() < 0:
            row = int(np.argmin(arr))
            raise ValueError(f"{what} of row {row} is {int(arr[row])}, must be >= 0")
        full[what] = np.zeros(num_rows, dtype=np.int64)
        full[what][:num_reqs] = arr
    sched_all, done_all = full["num_scheduled_tokens"], full["num_computed_tokens"]
    need = sched_all + done_all  # i64[R] tokens each row's pages must cover
    if need.size and need.max() > np.iinfo(np.int32).max:
        row = int(np.argmax(need))
        raise ValueError(f"row {row} needs {int(need[row])} tokens, more than int32 holds")
    for group, (count, size) in enumerate(zip(counts, page_sizes, strict=True)):
        count = np.asarray(count, dtype=np.int64)
        if count.shape != (num_rows,):
            raise ValueError(f"counts of group {group} have shape {count.shape}, want {num_rows}")
        short = need > count * size
        if short.any():
            row = int(np.flatnonzero(short)[0])
            raise ValueError(
                f"row {row} needs {int(need[row])} tokens (computed {int(done_all[row])} + "
                f"scheduled {int(sched_all[row])}) but holds {int(count[row])} pages of "
                f"{size} tokens in group {group} (needs {cdiv(int(need[row]), size)} pages)"
            )
    per_shard = sched_all.reshape(num_shards, -1).sum(axis=1)  # i64[S]
    over = per_shard > tokens_per_shard
    if over.any():
        shard = int(np.flatnonzero(over)[0])
        rows_per_shard = num_rows // num_shards
        raise ValueError(
            f"shard {shard} (rows {shard * rows_per_shard}..{(shard + 1) * rows_per_shard - 1}) "
            f"schedules {int(per_shard[shard])} tokens, over its budget of {tokens_per_shard}"
        )
    return Schedule(sched_all.astype(np.int32), done_all.astype(np.int32))
