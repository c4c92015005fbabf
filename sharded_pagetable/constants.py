"""Values shared with the seed page table and the limits every layer checks."""

PAGE_TABLE_PADDING_VAL = 0
"""Value of every page-table slot past a row's count, on the host and on the device."""

SLOT_MAPPING_PADDING_VAL = 0
"""Value of slot-mapping entries past the last scheduled token."""

MAX_PAGE_ID = 2**31 - 1
"""Largest page id an int32 table can hold."""


def cdiv(a: int, b: int) -> int:
    """Ceiling division for non-negative ``a`` and positive ``b``: ``cdiv(7, 3) == 3``."""
    return -(-a // b)


OP_SET, OP_APPEND, OP_CLEAR = 1, 2, 3
"""Wire op codes: a row replaced from slot 0, pages appended, a row emptied."""
