"""Wire format between coordinator and shard: one msgpack message per shard per commit.

A message is a map ``{"v", "epoch", "base", "shard", "groups"}``; ``groups`` holds one map per
KV-cache group with columnar little-endian int32 byte strings:

========  ===================================================================
``op``    ``OP_SET`` (row replaced), ``OP_APPEND`` (pages appended), ``OP_CLEAR``
``row``   local row index, strictly increasing (so each row appears once)
``start`` first column written (0 for SET/CLEAR, the row's held count for APPEND)
``count`` the row's new page count
``pages`` flat page ids: ``count - start`` of them per op, in op order
========  ===================================================================

Decoding is strict: exact keys, bounded sizes, no extension types, consistent lengths and
values. Anything else raises :class:`WireFormatError` before a single cell is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

from . import kernels
from .constants import MAX_PAGE_ID, OP_APPEND, OP_CLEAR, OP_SET  # noqa: F401 (wire API)
from .errors import WireFormatError

VERSION = 1

_KEYS = frozenset({"v", "epoch", "base", "shard", "groups"})
_GROUP_KEYS = ("op", "row", "start", "count", "pages")
_I32 = np.dtype("<i4")
_MAX_EPOCH = 2**63 - 1
_VALUE_ERRORS = {
    1: "rows must be strictly increasing within the shard",
    2: "need 0 <= start <= count <= pages per row for every op",
    3: "unknown op code",
    4: "SET must start at 0 and CLEAR must empty the row",
    5: "APPEND must add pages after a non-empty row",
    6: f"page ids must be in 0..{MAX_PAGE_ID}",
}


@dataclass(frozen=True)
class GroupBatch:
    """Columnar updates of one group; every array is ``i32``. ``pages`` is flat."""

    op: np.ndarray
    row: np.ndarray
    start: np.ndarray
    count: np.ndarray
    pages: np.ndarray

    @property
    def size(self) -> int:
        return int(self.row.size)


@dataclass(frozen=True)
class ShardBatch:
    """Everything one shard applies for one epoch, on top of epoch ``base``."""

    epoch: int
    base: int
    shard: int
    groups: tuple[GroupBatch, ...]

    @property
    def rows(self) -> int:
        return sum(g.size for g in self.groups)


@dataclass(frozen=True)
class WireLimits:
    """What a shard can accept: its row count and each group's pages per row."""

    num_rows: int
    widths: tuple[int, ...]

    @property
    def max_bytes(self) -> int:
        per_group = [self.num_rows * 4 * (4 + w) + 256 for w in self.widths]
        return 256 + sum(per_group)


def empty_group() -> GroupBatch:
    z = np.empty(0, dtype=np.int32)
    return GroupBatch(z, z, z, z, z)


def state_batch(
    epoch: int, shard: int, tables: Sequence[np.ndarray], counts: Sequence[np.ndarray]
) -> ShardBatch:
    """A full-state batch: one SET per non-empty row of ``tables`` (local rows), built on
    epoch 0. Shards are rebuilt and exported with it."""
    groups = []
    for table, count in zip(tables, counts, strict=True):
        rows = np.flatnonzero(count).astype(np.int32)
        n = count[rows].astype(np.int32)
        mask = np.arange(table.shape[1])[None, :] < n[:, None]
        pages = table[rows][mask].astype(np.int32)
        op = np.full(rows.size, OP_SET, np.int32)
        groups.append(GroupBatch(op, rows, np.zeros(rows.size, np.int32), n, pages))
    return ShardBatch(epoch, 0, shard, tuple(groups))


def encode(batch: ShardBatch) -> bytes:
    """Serialise ``batch`` (arrays are sent as raw little-endian int32 bytes)."""
    groups = [
        {key: np.ascontiguousarray(getattr(g, key), dtype=_I32).tobytes() for key in _GROUP_KEYS}
        for g in batch.groups
    ]
    return msgpack.packb(
        {
            "v": VERSION,
            "epoch": batch.epoch,
            "base": batch.base,
            "shard": batch.shard,
            "groups": groups,
        },
        use_bin_type=True,
    )


def _refuse_ext(code: int, data: bytes) -> None:
    raise WireFormatError(f"extension type {code} is not allowed")


def _int_field(msg: dict, key: str, upper: int) -> int:
    value = msg[key]
    if type(value) is not int or not 0 <= value <= upper:
        raise WireFormatError(f"{key} must be an int in 0..{upper}, got {value!r}")
    return value


def _column(group: dict, key: str, g: int) -> np.ndarray:
    raw = group[key]
    if type(raw) is not bytes or len(raw) % 4:
        raise WireFormatError(
            f"group {g} field {key!r} must be int32 bytes, got {type(raw).__name__}"
        )
    return np.frombuffer(raw, dtype=_I32)


def _decode_group(group: object, g: int, limits: WireLimits) -> GroupBatch:
    if type(group) is not dict or set(group) != set(_GROUP_KEYS):
        keys = sorted(map(repr, group)) if isinstance(group, dict) else type(group).__name__
        raise WireFormatError(f"group {g} must be a map with keys {list(_GROUP_KEYS)}, got {keys}")
    op, row, start, count, pages = (_column(group, k, g) for k in _GROUP_KEYS)
    k = row.size
    if not op.size == start.size == count.size == k:
        raise WireFormatError(
            f"group {g}: op/row/start/count lengths differ: "
            f"{op.size}/{row.size}/{start.size}/{count.size}"
        )
    if k > limits.num_rows:
        raise WireFormatError(f"group {g}: {k} ops for a shard of {limits.num_rows} rows")
    width = limits.widths[g]
    code, i, expected = kernels.check_values(op, row, start, count, pages, limits.num_rows, width)
    if code:
        raise WireFormatError(f"group {g}: {_VALUE_ERRORS[code]} (entry {i})")
    if pages.size != expected:
        raise WireFormatError(f"group {g}: {pages.size} page ids for {expected} written cells")
    return GroupBatch(op, row, start, count, pages)


def decode(data: bytes, limits: WireLimits) -> ShardBatch:
    """Parse and check a message for a shard described by ``limits``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireFormatError(f"message must be bytes, got {type(data).__name__}")
    if len(data) > limits.max_bytes:
        raise WireFormatError(f"message of {len(data)} bytes exceeds the limit {limits.max_bytes}")
    try:
        msg = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_bin_len=limits.max_bytes,
            max_str_len=16,
            max_array_len=len(limits.widths),
            max_map_len=8,
            max_ext_len=0,
        )
    except WireFormatError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireFormatError(f"not a valid msgpack message: {exc}") from None
    if type(msg) is not dict or set(msg) != _KEYS:
        keys = sorted(map(str, msg)) if isinstance(msg, dict) else type(msg).__name__
        raise WireFormatError(f"message must be a map with keys {sorted(_KEYS)}, got {keys}")
    if msg["v"] != VERSION or type(msg["v"]) is not int:
        raise WireFormatError(f"unsupported wire version {msg['v']!r}; this side speaks {VERSION}")
    epoch = _int_field(msg, "epoch", _MAX_EPOCH)
    base = _int_field(msg, "base", _MAX_EPOCH)
    shard = _int_field(msg, "shard", 2**31 - 1)
    if base >= epoch:
        raise WireFormatError(f"epoch {epoch} must come after its base epoch {base}")
    groups = msg["groups"]
    if type(groups) is not list or len(groups) != len(limits.widths):
        raise WireFormatError(f"expected a list of {len(limits.widths)} groups")
    return ShardBatch(
        epoch, base, shard, tuple(_decode_group(gr, g, limits) for g, gr in enumerate(groups))
    )
