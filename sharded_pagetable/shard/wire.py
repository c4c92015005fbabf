"""Wire format between coordinator and shard: every message both ways, each strictly decoded.

A batch (one per shard per commit, and the full-state messages of recovery and attach) is a
msgpack map ``{"v", "epoch", "base", "shard", "groups"}`` plus ``"gen"`` (the coordinator's
generation; absent means 0), for a commit with a step schedule ``"sched"`` and ``"done"``
(one int32 per shard row), and for a commit with KV copies ``"copies"`` (a list of one
``i32[2, K]`` plan per group: source pages then destination pages, each destination once;
absent when no group has a copy), and ``"touched"`` (how many shards the epoch reaches; absent
means not said). ``groups`` holds one map per KV-cache group with the
columns of :class:`~.messages.GroupBatch`. Every array is sent as little-endian int32 bytes.
A reply is ``{"v", "ack": [shard, epoch, checksum, rows, applied, generation, apply_us]}`` or
``{"v", "refused": [shard, kind, message, generation]}``.

Decoding is strict: exact keys, bounded sizes, no extension types, consistent lengths and
values. Anything else raises :class:`WireFormatError` before a single cell is written. A
message laid out as :func:`encode` writes it is read in one compiled pass (:func:`.frame.scan`,
under half the strict path's CPU at commit cadence) that accepts only what the strict
decoder accepts and steps aside for anything else. An ack is packed with ``struct``: the
msgpack map the reply format names, every int in its 64-bit form.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from ..constants import MAX_PAGE_ID
from ..errors import BatchTooLargeError, WireFormatError
from ..routing.layout import ShardLayout
from ..rows.messages import REFUSAL_KINDS, Ack, GroupBatch, Refusal, Schedule, ShardBatch
from . import frame

VERSION = 1

_KEYS = frozenset({"v", "epoch", "base", "shard", "groups"})
_OPTIONAL_KEYS = frozenset({"gen", "sched", "done", "copies", "touched"})
_MAX_TOKENS = 2**31 - 1
_GROUP_KEYS = ("op", "row", "start", "count", "pages")
_GROUP_KEY_SET = frozenset(_GROUP_KEYS)
_I32 = np.dtype("<i4")
_MAX_EPOCH = 2**63 - 1
_MAX_U64 = 2**64 - 1
_MAX_REPLY = 4096  # bytes; a refusal's message is cut to fit
_MAX_REASON = 1024  # characters of a refusal's message
_VALUE_ERRORS = {  # what each error code of frame.check_values means
    frame.ROWS_ORDER: "rows must be strictly increasing within the shard",
    frame.RANGE: "need 0 <= start <= count <= pages per row for every op",
    frame.OP_CODE: "unknown op code",
    frame.SET_CLEAR: "SET must start at 0 and CLEAR must empty the row",
    frame.APPEND_SHAPE: "APPEND must add pages after a non-empty row",
    frame.NEG_PAGE: f"page ids must be in 0..{MAX_PAGE_ID}",
}


@dataclass(frozen=True)
class WireLimits:
    """What a shard can accept: its row count, each group's pages per row, and the rows of
    the whole table (every shard receives the whole KV copy plan).

    The limits are the largest *legitimate* batch, not a guess: every row of the shard
    rewritten to full width, a schedule, and per group a copy plan of one copy per page of
    every row of the table (a plan's destinations are distinct pages given to moved rows,
    so no commit of a correct coordinator can carry more). ``table_rows`` defaults to
    ``num_rows`` (a table of one shard).
    """

    num_rows: int
    widths: tuple[int, ...]
    table_rows: int | None = None

    @classmethod
    def for_layout(cls, layout: ShardLayout, widths: Sequence[int]) -> WireLimits:
        """What each shard of ``layout`` accepts, with ``widths`` pages per row per group."""
        return cls(layout.rows_per_shard, tuple(widths), layout.max_num_reqs)

    def max_copies(self, group: int) -> int:
        """KV copies group ``group``'s plan may hold: one per page of every table row."""
        rows = self.num_rows if self.table_rows is None else self.table_rows
        return rows * self.widths[group]

    @functools.cached_property
    def width_array(self) -> np.ndarray:
        """``i64[G]`` pages per row of each group (what the compiled scan takes)."""
        return np.array(self.widths, np.int64)

    @functools.cached_property
    def max_bytes(self) -> int:
        n = self.num_rows
        rows = sum(n * 4 * (4 + w) + _GROUP_OVERHEAD for w in self.widths)
        copies = sum(8 * self.max_copies(g) + _BIN_OVERHEAD for g in range(len(self.widths)))
        schedule = 2 * (4 * n + _BIN_OVERHEAD)
        return _MESSAGE_OVERHEAD + rows + schedule + copies

    def check(self, batch: ShardBatch) -> None:
        """Refuse ``batch`` (``BatchTooLargeError``) if it holds more than a shard accepts,
        before it is encoded or sent: the coordinator's guard, so an oversized epoch is the
        caller's error and never a shard failure."""
        if len(batch.groups) != len(self.widths):
            raise BatchTooLargeError(
                f"a batch for shard {batch.shard} has {len(batch.groups)} groups, the shard "
                f"{len(self.widths)}"
            )
        for g, (group, width) in enumerate(zip(batch.groups, self.widths, strict=True)):
            if group.size > self.num_rows or group.pages.size > self.num_rows * width:
                raise BatchTooLargeError(
                    f"group {g} of the batch for shard {batch.shard} rewrites {group.size} rows "
                    f"({group.pages.size} pages); a shard holds {self.num_rows} rows of {width}"
                )
        for g, plan in enumerate(batch.kv_copies):
            copies = plan.shape[-1] if plan.ndim == 2 else plan.size
            if copies > self.max_copies(g):
                raise BatchTooLargeError(
                    f"the KV copy plan of group {g} holds {copies} copies, more than the "
                    f"{self.max_copies(g)} pages of every row of the table that a shard accepts"
                )


# Bytes of msgpack framing a message can add besides its arrays (map and bin headers, keys,
# 64-bit ints), with room to spare; ``test_largest_message_fits_the_size_limit`` holds it.
_MESSAGE_OVERHEAD = 256
_GROUP_OVERHEAD = 64
_BIN_OVERHEAD = 8


# -- batches ----------------------------------------------------------------------------


def encode(batch: ShardBatch) -> bytes:
    """Serialise ``batch`` (arrays are sent as raw little-endian int32 bytes)."""
    groups = [
        {key: np.ascontiguousarray(getattr(g, key), dtype=_I32).tobytes() for key in _GROUP_KEYS}
        for g in batch.groups
    ]
    msg = {"v": VERSION, "epoch": batch.epoch, "base": batch.base, "shard": batch.shard}
    if batch.generation:
        msg["gen"] = batch.generation
    if batch.schedule is not None:
        msg["sched"] = np.ascontiguousarray(batch.schedule.sched, dtype=_I32).tobytes()
        msg["done"] = np.ascontiguousarray(batch.schedule.done, dtype=_I32).tobytes()
    if any(c.size for c in batch.kv_copies):
        msg["copies"] = [np.ascontiguousarray(c, dtype=_I32).tobytes() for c in batch.kv_copies]
    if batch.touched:
        msg["touched"] = batch.touched
    msg["groups"] = groups
    return msgpack.packb(msg, use_bin_type=True)


def _refuse_ext(code: int, data: bytes) -> None:
    raise WireFormatError(f"extension type {code} is not allowed")


def _unpack(data: object, max_bytes: int, max_array: int, max_str: int) -> object:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireFormatError(f"message must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireFormatError(f"message of {len(data)} bytes exceeds the limit {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_bin_len=max_bytes,
            max_str_len=max_str,
            max_array_len=max_array,
            max_map_len=16,
            max_ext_len=0,
        )
    except WireFormatError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireFormatError(f"not a valid msgpack message: {exc}") from None


def _int_field(msg: dict, key: str, upper: int) -> int:
    value = msg[key]
    if type(value) is not int or not 0 <= value <= upper:
        raise WireFormatError(f"{key} must be an int in 0..{upper}, got {value!r}")
    return value


def _check_version(
    msg: object, keys: frozenset[str], what: str, optional: frozenset[str] = frozenset()
) -> dict:
    if type(msg) is not dict or not keys <= set(msg) <= keys | optional:
        got = sorted(map(str, msg)) if isinstance(msg, dict) else type(msg).__name__
        raise WireFormatError(f"{what} must be a map with keys {sorted(keys)}, got {got}")
    if type(msg["v"]) is not int or msg["v"] != VERSION:
        raise WireFormatError(f"unsupported wire version {msg['v']!r}; this side speaks {VERSION}")
    return msg


def _column(group: dict, key: str, g: int) -> np.ndarray:
    raw = group[key]
    if type(raw) is not bytes or len(raw) % 4:
        raise WireFormatError(
            f"group {g} field {key!r} must be int32 bytes, got {type(raw).__name__}"
        )
    return np.frombuffer(raw, dtype=_I32)


def _decode_group(group: object, g: int, limits: WireLimits) -> GroupBatch:
    if type(group) is not dict or group.keys() != _GROUP_KEY_SET:
        keys = sorted(map(repr, group)) if isinstance(group, dict) else type(group).__name__
        raise WireFormatError(f"group {g} must be a map with keys {list(_GROUP_KEYS)}, got {keys}")
    op, row, start, count, pages = [_column(group, k, g) for k in _GROUP_KEYS]
    k = row.size
    if not op.size == start.size == count.size == k:
        raise WireFormatError(
            f"group {g}: op/row/start/count lengths differ: "
            f"{op.size}/{row.size}/{start.size}/{count.size}"
        )
    if k > limits.num_rows:
        raise WireFormatError(f"group {g}: {k} ops for a shard of {limits.num_rows} rows")
    width = limits.widths[g]
    code, i, expected = frame.check_values(op, row, start, count, pages, limits.num_rows, width)
    if code:
        raise WireFormatError(f"group {g}: {_VALUE_ERRORS[code]} (entry {i})")
    if pages.size != expected:
        raise WireFormatError(f"group {g}: {pages.size} page ids for {expected} written cells")
    return GroupBatch(op, row, start, count, pages)


def decode(data: bytes, limits: WireLimits) -> ShardBatch:
    """Parse and check a batch for a shard described by ``limits``."""
    return decode_columns(data, limits)[0]


def decode_columns(data: bytes, limits: WireLimits) -> tuple[ShardBatch, np.ndarray, np.ndarray]:
    """:func:`decode`, with the batch's group columns as one array the way
    :func:`.frame.apply_groups` takes them: ``(batch, i32[n] columns, i64[5 G + 1]
    offsets)``; the batch's columns are read-only views of it.

    A message as :func:`encode` writes it is read in one compiled pass
    (:func:`.frame.scan`); any other, valid or not, goes through the strict decoder.
    """
    got = None
    if type(data) is bytes and len(data) <= limits.max_bytes:
        got = frame.scan(data, VERSION, limits.num_rows, limits.width_array)
    if got is None:
        batch = _decode_strict(data, limits)
        flat, offs = frame.flat_columns(batch.groups)
        return batch, flat, offs
    epoch, base, shard, generation, touched, flat, offs, has_sched = got
    return batch_of(epoch, base, shard, generation, touched, flat, offs, has_sched), flat, offs


def batch_of(
    epoch: int,
    base: int,
    shard: int,
    generation: int,
    touched: int,
    flat: np.ndarray,
    offs: np.ndarray,
    has_sched: bool,
) -> ShardBatch:
    """The batch :func:`.frame.scan` read: its columns are read-only views of ``flat``
    (``i32[n]``, the group columns one after the other, ``offs`` where each starts, then
    with ``has_sched`` the schedule's two columns), and it carries no KV copies."""
    flat.flags.writeable = False
    o = offs.tolist()
    cols = [flat[i:j] for i, j in itertools.pairwise(o)]
    schedule = None
    if has_sched:
        rows = (flat.size - o[-1]) // 2
        schedule = Schedule(flat[o[-1] : o[-1] + rows], flat[o[-1] + rows :])
    if not _FILL:
        groups = tuple(GroupBatch(*cols[i : i + 5]) for i in range(0, len(cols), 5))
        return ShardBatch(epoch, base, shard, groups, generation, schedule, (), touched)
    # The values are checked already: fill the frozen dataclasses' fields directly, ~40%
    # less CPU than their __init__ at commit cadence (it runs once per frame).
    groups = tuple(_filled(GroupBatch, zip(_GROUP_KEYS, cols[i : i + 5], strict=True))
                   for i in range(0, len(cols), 5))  # fmt: skip
    fields = (epoch, base, shard, groups, generation, schedule, (), touched)
    return _filled(ShardBatch, zip(_BATCH_FIELDS, fields, strict=True))


def _filled(cls: type, fields: Iterable[tuple[str, object]]) -> Any:
    obj = object.__new__(cls)
    object.__setattr__(obj, "__dict__", dict(fields))
    return obj


def _plain(cls: type) -> tuple[str, ...] | None:
    """The fields of dataclass ``cls`` if filling them is all its ``__init__`` does."""
    if hasattr(cls, "__post_init__") or hasattr(cls, "__slots__"):
        return None
    return tuple(f.name for f in dataclasses.fields(cls))


_BATCH_FIELDS = _plain(ShardBatch)
_FILL = _plain(GroupBatch) == _GROUP_KEYS and _BATCH_FIELDS == (
    "epoch", "base", "shard", "groups", "generation", "schedule", "kv_copies", "touched",
)  # fmt: skip


def warm_up(limits: WireLimits) -> None:
    """Compile (or load from numba's cache) the one-pass reader of :func:`decode_columns`
    before the first commit."""
    empty = GroupBatch.empty()
    message = encode(ShardBatch(1, 0, 0, (empty,) * len(limits.widths)))
    if decode_columns(message, limits)[0].epoch != 1:
        raise AssertionError("the compiled batch reader failed its warm-up")


def _decode_strict(data: bytes, limits: WireLimits) -> ShardBatch:
    msg = _check_version(
        _unpack(data, limits.max_bytes, len(limits.widths), 16), _KEYS, "message", _OPTIONAL_KEYS
    )
    epoch = _int_field(msg, "epoch", _MAX_EPOCH)
    base = _int_field(msg, "base", _MAX_EPOCH)
    shard = _int_field(msg, "shard", 2**31 - 1)
    if base >= epoch:
        raise WireFormatError(f"epoch {epoch} must come after its base epoch {base}")
    groups = msg["groups"]
    if type(groups) is not list or len(groups) != len(limits.widths):
        raise WireFormatError(f"expected a list of {len(limits.widths)} groups")
    generation = _int_field(msg, "gen", _MAX_U64) if "gen" in msg else 0
    touched = _int_field(msg, "touched", 2**31 - 1) if "touched" in msg else 0
    return ShardBatch(
        epoch,
        base,
        shard,
        tuple(_decode_group(gr, g, limits) for g, gr in enumerate(groups)),
        generation,
        _decode_schedule(msg, limits),
        _decode_copies(msg, limits),
        touched,
    )


def _decode_copies(msg: dict, limits: WireLimits) -> tuple[np.ndarray, ...]:
    """Per group ``i32[2, K]`` KV copies: page ids in range, every destination once."""
    if "copies" not in msg:
        return ()
    plans = msg["copies"]
    if type(plans) is not list or len(plans) != len(limits.widths):
        raise WireFormatError(f"copies must list one plan per group ({len(limits.widths)})")
    out = []
    for g, raw in enumerate(plans):
        if type(raw) is not bytes or len(raw) % 8:
            raise WireFormatError(f"copies of group {g} must be int32 (source, destination) pairs")
        plan = np.frombuffer(raw, dtype=_I32).reshape(2, -1)
        if plan.shape[1] > limits.max_copies(g):
            raise WireFormatError(
                f"copies of group {g}: {plan.shape[1]} copies, over {limits.max_copies(g)}"
            )
        if plan.size and plan.min() < 0:
            raise WireFormatError(f"copies of group {g}: page ids must be in 0..{MAX_PAGE_ID}")
        if np.unique(plan[1]).size != plan.shape[1]:
            raise WireFormatError(f"copies of group {g}: a destination page appears twice")
        out.append(plan)
    return tuple(out)


def _decode_schedule(msg: dict, limits: WireLimits) -> Schedule | None:
    """A step's per-row token counts: both columns or neither, one entry per shard row,
    non-negative, and no row past ``2**31 - 1`` tokens."""
    if "sched" not in msg and "done" not in msg:
        return None
    if "sched" not in msg or "done" not in msg:
        raise WireFormatError("a schedule needs both sched and done")
    cols = []
    for key in ("sched", "done"):
        raw = msg[key]
        if type(raw) is not bytes or len(raw) != 4 * limits.num_rows:
            raise WireFormatError(f"{key} must be {limits.num_rows} int32 values")
        cols.append(np.frombuffer(raw, dtype=_I32))
    sched, done = cols
    if sched.min() < 0 or done.min() < 0:
        raise WireFormatError("scheduled and computed token counts must be non-negative")
    if (sched.astype(np.int64) + done).max() > _MAX_TOKENS:
        raise WireFormatError(f"a row's tokens must stay below {_MAX_TOKENS}")
    return Schedule(sched, done)


# -- replies ----------------------------------------------------------------------------

_ACK_KEYS = frozenset({"v", "ack"})
_REFUSED_KEYS = frozenset({"v", "refused"})


# An ack as msgpack with every int in its 64-bit form (valid msgpack, read by any decoder):
# one struct call instead of msgpack's packer, ~30 us less CPU per commit at commit cadence.
_ACK_HEAD = msgpack.packb({"v": VERSION, "ack": [0] * 7})[:-7]  # map, "v", "ack", array(7)
_ACK = struct.Struct(">" + f"{len(_ACK_HEAD)}s" + "BQ" * 4 + "B" + "BQ" * 2)
_U64, _TRUE, _FALSE = 0xCF, 0xC3, 0xC2


def encode_reply(reply: Ack | Refusal) -> bytes:
    """Serialise a shard's answer; a refusal's message is cut to a bounded length."""
    if isinstance(reply, Ack):
        s, e, c, n = reply.shard, reply.epoch, reply.checksum, reply.rows
        a, g, u = reply.applied, reply.generation, reply.apply_us
        if (
            type(a) is bool and type(s) is int and type(e) is int and type(c) is int
            and type(n) is int and type(g) is int and type(u) is int
        ):  # fmt: skip
            try:
                return _ACK.pack(
                    _ACK_HEAD, _U64, s, _U64, e, _U64, c, _U64, n, _TRUE if a else _FALSE,
                    _U64, g, _U64, u,
                )  # fmt: skip
            except struct.error:  # a field outside 0..2**64-1: msgpack's own form
                pass
        return msgpack.packb({"v": VERSION, "ack": [s, e, c, n, a, g, u]})
    body = [reply.shard, reply.kind, reply.message[:_MAX_REASON], reply.generation]
    return msgpack.packb({"v": VERSION, "refused": body})


def decode_reply(data: bytes, num_shards: int) -> Ack | Refusal:
    """Parse a shard's answer; anything but a well-formed ack or refusal raises."""
    msg = _unpack(data, _MAX_REPLY, 7, _MAX_REASON * 4)
    if type(msg) is dict and "refused" in msg:
        msg = _check_version(msg, _REFUSED_KEYS, "refusal")
        body = msg["refused"]
        if (
            type(body) is not list
            or len(body) != 4
            or type(body[0]) is not int
            or not 0 <= body[0] < num_shards
            or body[1] not in REFUSAL_KINDS
            or type(body[2]) is not str
            or type(body[3]) is not int
            or not 0 <= body[3] <= _MAX_U64
        ):
            raise WireFormatError(
                "a refusal must be [shard, kind, message (str), generation (u64)] with kind in "
                f"{REFUSAL_KINDS}"
            )
        return Refusal(*body)
    msg = _check_version(msg, _ACK_KEYS, "reply")
    body = msg["ack"]
    if type(body) is not list or len(body) != 7:
        raise WireFormatError(
            "an ack must be [shard, epoch, checksum, rows, applied, generation, apply_us]"
        )
    shard, epoch, checksum, rows, applied, generation, apply_us = body
    for name, value, upper in (
        ("shard", shard, num_shards - 1),
        ("epoch", epoch, _MAX_EPOCH),
        ("checksum", checksum, _MAX_U64),
        ("rows", rows, 2**31 - 1),
        ("generation", generation, _MAX_U64),
        ("apply_us", apply_us, 2**63 - 1),
    ):
        if type(value) is not int or not 0 <= value <= upper:
            raise WireFormatError(f"ack field {name} must be an int in 0..{upper}, got {value!r}")
    if type(applied) is not bool:
        raise WireFormatError(f"ack field applied must be a bool, got {applied!r}")
    return Ack(shard, epoch, checksum, rows, applied, generation, apply_us)
