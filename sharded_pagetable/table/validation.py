"""Pure checks for every public argument. Each returns a normalised value or raises.

Nothing here mutates state; callers validate a whole call first and only then write.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from ..constants import MAX_PAGE_ID
from ..errors import PageTableFullError

_EMPTY = np.empty(0, dtype=np.int32)


def check_index(value: object, size: int, what: str = "row") -> int:
    """Return ``value`` as an int in ``[0, size)``; ``IndexError`` if outside, ``ValueError`` if
    it is not an integer (bools and floats are refused, negatives never wrap)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    idx = int(value)
    if not 0 <= idx < size:
        raise IndexError(f"{what} {idx} is out of range: valid {what}s are 0..{size - 1}")
    return idx


def check_count(value: object, upper: int, what: str) -> int:
    """Return ``value`` as an int in ``[0, upper]`` or raise ``ValueError``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    n = int(value)
    if not 0 <= n <= upper:
        raise ValueError(f"{what}={n} is out of range: allowed 0..{upper}")
    return n


def page_id_array(page_ids: object, num_pages: int | None) -> np.ndarray:
    """Convert one row's page ids to ``i32[n]``, refusing anything that is not an exact id.

    Accepts a sequence of Python ints or an integer numpy array. Floats (even integral ones),
    bools, strings, nested lists and ids outside ``[0, 2**31)`` (or ``[0, num_pages)``) raise
    ``ValueError``.
    """
    if isinstance(page_ids, np.ndarray):
        arr = page_ids
        if arr.ndim != 1:
            raise ValueError(f"page ids must be one-dimensional, got shape {arr.shape}")
        if arr.size == 0:
            return _EMPTY
        if arr.dtype.kind not in "iu":
            raise ValueError(f"page ids must be integers, got dtype {arr.dtype}")
    elif isinstance(page_ids, Sequence) and not isinstance(page_ids, str | bytes):
        if len(page_ids) == 0:
            return _EMPTY
        for pid in page_ids:
            if isinstance(pid, bool | np.bool_) or not isinstance(pid, numbers.Integral):
                raise ValueError(f"page ids must be integers, got {pid!r} ({type(pid).__name__})")
        try:
            arr = np.asarray(page_ids, dtype=np.int64)
        except OverflowError:
            bad = max(page_ids, key=lambda p: abs(int(p)))
            raise ValueError(f"page id {bad} is out of range: allowed 0..{MAX_PAGE_ID}") from None
    else:
        raise ValueError(
            f"page ids must be a list or 1-D integer array, got {type(page_ids).__name__}"
        )
    limit = MAX_PAGE_ID if num_pages is None else num_pages - 1
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > limit:
        bad = lo if lo < 0 else hi
        raise ValueError(f"page id {bad} is out of range: allowed 0..{limit}")
    return arr.astype(np.int32, copy=False)


def check_capacity(row: int, count: int, extra: int, capacity: int) -> None:
    """Raise ``PageTableFullError`` if a row holding ``count`` pages cannot take ``extra`` more."""
    if count + extra > capacity:
        raise PageTableFullError(
            f"row {row} holds {count} pages; appending {extra} would exceed its capacity of "
            f"{capacity} pages"
        )


def group_lists(page_ids: object, num_groups: int) -> Sequence:
    """Check the outer ``[group]`` level of a ``[group][pages]`` argument."""
    if isinstance(page_ids, str | bytes) or not isinstance(page_ids, Sequence | np.ndarray):
        raise ValueError(f"page ids must be a list with one entry per group, got {page_ids!r}")
    if len(page_ids) != num_groups:
        raise ValueError(
            f"page ids name {len(page_ids)} groups but the table has {num_groups} KV-cache groups"
        )
    return page_ids
