"""Pure checks for every public argument. Each returns a normalised value or raises.

Nothing here mutates state; callers validate a whole call first and only then write.
"""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Sequence

import numpy as np

from ..constants import MAX_PAGE_ID

_EMPTY = np.empty(0, dtype=np.int32)
_EMPTY.flags.writeable = False  # shared by every empty call
# Sequences of characters or bytes, never of page ids or rows (a bytearray's items are ints).
_BYTE_STRINGS = (str, bytes, bytearray, memoryview)

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 8


def describe(value: object) -> str:
    """A bounded repr of ``value`` for an error message: a caller's huge list or string must
    not make the message (or the time to build it) huge."""
    return _REPR.repr(value)


def _not_an_int(value: object) -> bool:
    return isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral)


def plain_array(value: np.ndarray, what: str) -> np.ndarray:
    """``value`` as a plain ``np.ndarray`` over the same memory, so no subclass method
    (``min``, ``astype``, iteration) decides what its values are.

    Masked arrays are refused: ``min()``/``max()`` skip masked entries and a cast keeps
    whatever the data buffer holds there, which is how -7 and ``2**40 + 7`` (stored as 7)
    once got past the range check.
    """
    if isinstance(value, np.ma.MaskedArray):
        raise ValueError(
            f"{what} must not be a masked array (masked entries have no value; pass "
            f"arr.filled(...) or a plain array), got {describe(value)}"
        )
    return value if type(value) is np.ndarray else value.view(np.ndarray)


def check_list(value: object, what: str) -> Sequence | np.ndarray:
    """``value`` if it is a list one can measure and index twice: a sequence that is not a
    string, or a plain array of at least one dimension.

    Generators and iterators (one pass, no length), sets and dicts (no order, or keys read
    as items), strings, masked and 0-d arrays raise ``ValueError``.
    """
    if type(value) is list:
        return value
    if isinstance(value, np.ndarray):
        arr = plain_array(value, what)
        if arr.ndim == 0:
            raise ValueError(f"{what} must be a list, got a 0-d array {describe(value)}")
        return arr
    if isinstance(value, _BYTE_STRINGS) or not isinstance(value, Sequence):
        raise ValueError(f"{what} must be a list, got {type(value).__name__} {describe(value)}")
    return value


def check_index(value: object, size: int, what: str = "row") -> int:
    """Return ``value`` as an int in ``[0, size)``; ``IndexError`` if outside, ``ValueError`` if
    it is not an integer (bools, floats and 0-d arrays are refused, negatives never wrap)."""
    if _not_an_int(value):
        raise ValueError(
            f"{what} must be an integer, got {describe(value)} ({type(value).__name__})"
        )
    idx = int(value)
    if not 0 <= idx < size:
        raise IndexError(f"{what} {idx} is out of range: valid {what}s are 0..{size - 1}")
    return idx


def check_count(value: object, upper: int, what: str) -> int:
    """Return ``value`` as an int in ``[0, upper]`` or raise ``ValueError`` (the same types
    as :func:`check_index`)."""
    if type(value) is int and 0 <= value <= upper:  # the hot path: every commit asks
        return value
    if _not_an_int(value):
        raise ValueError(
            f"{what} must be an integer, got {describe(value)} ({type(value).__name__})"
        )
    n = int(value)
    if not 0 <= n <= upper:
        raise ValueError(f"{what}={n} is out of range: allowed 0..{upper}")
    return n


def page_id_array(page_ids: object, num_pages: int | None) -> np.ndarray:
    """Convert one row's page ids to a new ``i32[n]``, refusing anything that is not an exact id.

    Accepts a sequence of integers (Python or numpy) or a 1-D integer numpy array, strided
    views included. Floats (even integral ones), bools, strings, nested lists, masked, object
    and 0-d arrays, iterators and ids outside ``[0, 2**31)`` (or ``[0, num_pages)``) raise
    ``ValueError``. The ids are copied before they are checked, so a caller's later write to
    its own array cannot change what was validated.
    """
    if isinstance(page_ids, np.ndarray):
        ids = _array_ids(page_ids)
        if ids.size == 0:
            return _EMPTY
        lo, hi = int(ids.min()), int(ids.max())  # exact for every integer dtype
    elif isinstance(page_ids, Sequence) and not isinstance(page_ids, _BYTE_STRINGS):
        ids = int_items(page_ids, "page ids")
        if not ids:
            return _EMPTY
        lo, hi = min(ids), max(ids)
    else:
        raise ValueError(
            f"page ids must be a list or 1-D integer array, got {type(page_ids).__name__} "
            f"{describe(page_ids)}"
        )
    limit = MAX_PAGE_ID if num_pages is None else num_pages - 1
    if lo < 0 or hi > limit:
        bad = lo if lo < 0 else hi
        raise ValueError(f"page id {bad} is out of range: allowed 0..{limit}")
    return np.array(ids, dtype=np.int32)  # every id is in range: the cast is exact


def _array_ids(page_ids: np.ndarray) -> np.ndarray:
    """A contiguous copy of a 1-D integer array (any integer dtype, values unchecked)."""
    arr = plain_array(page_ids, "page ids")
    if arr.ndim != 1:
        raise ValueError(f"page ids must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"page ids must be integers, got dtype {arr.dtype}: {describe(page_ids)}")
    return arr.copy()


def read_once(values: Sequence | np.ndarray, what: str) -> list:
    """The items of ``values`` as a new list, read in one pass: every later check and write
    sees these, whatever the caller's sequence holds by then. A sequence that cannot be
    read (its ``__iter__`` or ``__len__`` raises ``TypeError``) is a ``ValueError``."""
    try:
        return list(values)
    except TypeError as exc:
        raise ValueError(
            f"{what} could not be read as a list ({type(values).__name__}): {exc}"
        ) from None


def int_items(values: Sequence, what: str) -> list[int]:
    """The items of a sequence as Python ints, read in one pass (bools and anything that is
    not an integer raise ``ValueError``; values are not range-checked)."""
    items = read_once(values, what)
    for v in items:
        if _not_an_int(v):
            raise ValueError(f"{what} must be integers, got {describe(v)} ({type(v).__name__})")
    return [int(v) for v in items]


def group_lists(page_ids: object, num_groups: int) -> list:
    """The outer ``[group]`` level of a ``[group][pages]`` argument, read once into a new
    list of ``num_groups`` items (each group's ids are checked by its own table)."""
    what = "page ids (one list per KV-cache group)"
    groups = read_once(check_list(page_ids, what), what)
    if len(groups) != num_groups:
        raise ValueError(
            f"page ids name {len(groups)} groups but the table has {num_groups} KV-cache groups"
        )
    return groups


def int_vector(values: object, what: str) -> np.ndarray:
    """A new ``i64[n]`` holding exactly ``values``: a list of integers or a 1-D integer array.

    Bools (also inside a list), floats, masked arrays, 0-d arrays, strings and iterators
    raise ``ValueError``, as do values that do not fit in int64 (a cast would wrap them).
    """
    values = check_list(values, what)
    if isinstance(values, np.ndarray):
        arr = values
    else:
        values = read_once(values, what)  # ours: every pass below reads the same items
        if {*map(type, values)} - {int}:  # one C-level pass; the per-item check only if needed
            values = int_items(values, what)
        try:
            arr = np.array(values, dtype=np.int64)
        except OverflowError:
            bad = max(values, key=abs)
            raise ValueError(f"{what} value {bad} is out of range (int64)") from None
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype == np.uint64 and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{what} value {int(arr.max())} is out of range (int64)")
    return arr.astype(np.int64)  # a copy: checks and lookups below see the same values
