"""A model step's schedule, checked on the host before anything is sent.

A scheduler gives, per row below ``num_reqs``, the tokens it schedules now and the tokens
already computed (the vLLM and EasyDeL convention). :func:`check_schedule` refuses one that
no shard could serve and widens it to every row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..constants import cdiv
from ..rows.messages import Schedule
from .validation import int_vector

_INT32_MAX = int(np.iinfo(np.int32).max)


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

    Raises ``ValueError`` naming the row (a value below 0 or past int32, a ``done + sched``
    past int32, pages that do not cover ``done + sched`` tokens in some group) or shard
    (budget exceeded), or the bad length. The caller's arrays are read once, into copies.
    """
    if len(counts) != len(page_sizes) or not counts:
        raise ValueError(f"{len(counts)} groups of counts for page_sizes {list(page_sizes)}")
    num_rows = len(counts[0])
    if num_shards < 1 or num_rows % num_shards:
        raise ValueError(f"num_shards={num_shards} must be positive and divide {num_rows} rows")
    if not 0 <= num_reqs <= num_rows:
        raise ValueError(f"num_reqs={num_reqs} is out of range 0..{num_rows}")
    sched_all = _widened(sched, "num_scheduled_tokens", num_reqs, num_rows)
    done_all = _widened(done, "num_computed_tokens", num_reqs, num_rows)
    # Each term is below 2**31, so the int64 sum is exact; only the sum can exceed int32.
    need = sched_all.astype(np.int64) + done_all  # i64[R] tokens each row's pages must cover
    if need.size and need.max() > _INT32_MAX:
        row = int(np.argmax(need))
        raise ValueError(
            f"row {row} needs {int(need[row])} tokens (computed {int(done_all[row])} + "
            f"scheduled {int(sched_all[row])}), more than int32 holds ({_INT32_MAX})"
        )
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
    per_shard = sched_all.reshape(num_shards, -1).sum(axis=1, dtype=np.int64)  # i64[S]
    over = per_shard > tokens_per_shard
    if over.any():
        shard = int(np.flatnonzero(over)[0])
        rows_per_shard = num_rows // num_shards
        raise ValueError(
            f"shard {shard} (rows {shard * rows_per_shard}..{(shard + 1) * rows_per_shard - 1}) "
            f"schedules {int(per_shard[shard])} tokens, over its budget of {tokens_per_shard}"
        )
    return Schedule(sched_all, done_all)


def _widened(values: object, what: str, num_reqs: int, num_rows: int) -> np.ndarray:
    """A new ``i32[num_rows]``: ``values`` (``int[num_reqs]``, each in ``0..2**31-1``, the
    range of the published int32 positions) then zeros.

    Every value is range-checked on our own copy before any arithmetic: a count past int32
    once wrapped the int64 sum ``done + sched`` negative and published position -1.
    """
    arr = int_vector(values, what)  # i64[n], a copy
    if arr.size != num_reqs:
        raise ValueError(f"{what} has {arr.size} entries, but num_reqs={num_reqs}")
    bad = np.flatnonzero((arr < 0) | (arr > _INT32_MAX))
    if bad.size:
        row = int(bad[0])
        allowed = "must be >= 0" if arr[row] < 0 else f"more than int32 holds ({_INT32_MAX})"
        raise ValueError(f"{what} of row {row} is {int(arr[row])}, {allowed}")
    full = np.zeros(num_rows, dtype=np.int32)
    full[:num_reqs] = arr  # exact: every value is in int32's range
    return full
