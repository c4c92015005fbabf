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

MAX_GENERATION = 2**64 - 1
"""Largest coordinator generation: a u64 on the wire, a take-over counter in the high 32 bits
and 32 random bits below it (two coordinators taking over at once still differ)."""

GENERATION_STEP = 2**16
"""Most that one fence may raise a shard's take-over counter (a generation's high 32 bits)
above the shard's own. A take-over adds 1 to the highest counter among the shards, and
shards that a take-over fenced only part-way differ by a few; the bound keeps one call (a
bug, a forged or corrupted request) from using up the 2**32 counters, after which no
coordinator could take the table over."""

MAX_FIRST_COUNTER = 2**31
"""Highest take-over counter a shard that obeys no coordinator yet (generation 0: a new
process) takes: a recovery fences new processes with the coordinator's own generation,
however many take-overs came before; half the counters stay for later ones."""
