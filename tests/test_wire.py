"""The coordinator -> shard wire format and the shard's all-or-nothing application of it.

* round trip: any valid ``ShardBatch`` encodes and decodes to equal arrays;
* strictness: every malformed message raises ``WireFormatError`` (a ``ValueError``);
* fuzz: mutated valid messages, arbitrary bytes and arbitrary msgpack objects either decode to
  a batch that obeys every rule of the format (and survives a re-encode) or raise
  ``WireFormatError`` -- never any other exception;
* ``Shard.apply``: a refused message (bad wire bytes, bad APPEND start, wrong base, re-used
  epoch with other content, wrong shard) leaves host tables, counts, checksum terms, epoch and
  device rows byte-identical; a valid one applies fully; ``rollback`` restores the previous
  epoch exactly; a re-sent epoch is acknowledged with ``applied=False``;
* ``apply_group`` (vectorised) equals a plain Python loop.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
from batch_helpers import apply_group, check_group, empty_group, full_width_group
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sharded_pagetable.constants import MAX_PAGE_ID, PAGE_TABLE_PADDING_VAL
from sharded_pagetable.errors import WireFormatError
from sharded_pagetable.routing.layout import ShardLayout
from sharded_pagetable.routing.mesh import build_mesh, row_sharding
from sharded_pagetable.rows import checksum
from sharded_pagetable.rows.messages import OP_APPEND, OP_CLEAR, OP_SET, GroupBatch, ShardBatch
from sharded_pagetable.shard.shard import Shard, ShardSpec
from sharded_pagetable.shard.wire import VERSION, WireLimits, decode, encode

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
KEYS = ("op", "row", "start", "count", "pages")
MAX_EPOCH = 2**63 - 1

# --------------------------------------------------------------------------- strategies

page_ids = st.one_of(
    st.integers(0, 64), st.integers(0, MAX_PAGE_ID), st.sampled_from([0, MAX_PAGE_ID])
)


@st.composite
def limits_st(draw) -> WireLimits:
    num_rows = draw(st.integers(1, 16))
    widths = tuple(draw(st.lists(st.integers(1, 8), min_size=1, max_size=3)))
    return WireLimits(num_rows, widths)


@st.composite
def group_st(draw, num_rows: int, width: int, counts: np.ndarray | None = None) -> GroupBatch:
    """A valid group batch. With ``counts`` (the rows' held counts) APPENDs start there, so the
    batch also passes ``check_group``; without, APPEND starts are free (decode-valid only)."""
    rows = sorted(draw(st.sets(st.integers(0, num_rows - 1), max_size=num_rows)))
    ops, starts, cnts, pages = [], [], [], []
    for r in rows:
        choices = [OP_SET, OP_CLEAR]
        if (counts is None and width >= 2) or (counts is not None and 0 < counts[r] < width):
            choices.append(OP_APPEND)
        op = draw(st.sampled_from(choices))
        if op == OP_SET:
            start, count = 0, draw(st.integers(0, width))
        elif op == OP_CLEAR:
            start = count = 0
        else:
            start = int(counts[r]) if counts is not None else draw(st.integers(1, width - 1))
            count = draw(st.integers(start + 1, width))
        ops.append(op)
        starts.append(start)
        cnts.append(count)
        pages.extend(draw(st.lists(page_ids, min_size=count - start, max_size=count - start)))

    def arr(xs):
        return np.asarray(xs, dtype=np.int32)

    return GroupBatch(arr(ops), arr(rows), arr(starts), arr(cnts), arr(pages))


@st.composite
def batch_st(
    draw, limits: WireLimits, counts: list[np.ndarray] | None = None, **fixed
) -> ShardBatch:
    if "epoch" in fixed:
        epoch, base = fixed["epoch"], fixed["base"]
    else:
        base = draw(st.one_of(st.integers(0, 10), st.integers(0, MAX_EPOCH - 1)))
        epoch = draw(st.one_of(st.just(base + 1), st.integers(base + 1, MAX_EPOCH)))
    shard = fixed.get("shard", draw(st.one_of(st.integers(0, 8), st.integers(0, 2**31 - 1))))
    groups = tuple(
        draw(group_st(limits.num_rows, w, None if counts is None else counts[g]))
        for g, w in enumerate(limits.widths)
    )
    return ShardBatch(epoch, base, shard, groups)


@st.composite
def limits_and_batch(draw) -> tuple[WireLimits, ShardBatch]:
    limits = draw(limits_st())
    return limits, draw(batch_st(limits))


# --------------------------------------------------------------------------- helpers


def assert_batches_equal(a: ShardBatch, b: ShardBatch) -> None:
    assert (a.epoch, a.base, a.shard) == (b.epoch, b.base, b.shard)
    assert len(a.groups) == len(b.groups)
    for ga, gb in zip(a.groups, b.groups, strict=True):
        for key in KEYS:
            x, y = getattr(ga, key), getattr(gb, key)
            assert x.dtype == y.dtype == np.int32, key
            np.testing.assert_array_equal(x, y, err_msg=key)


def assert_valid(batch: ShardBatch, limits: WireLimits) -> None:
    """Every rule of the wire docstring, checked independently of ``decode``."""
    assert type(batch.epoch) is int and type(batch.base) is int and type(batch.shard) is int
    assert 0 <= batch.base < batch.epoch <= MAX_EPOCH
    assert 0 <= batch.shard <= 2**31 - 1
    assert len(batch.groups) == len(limits.widths)
    for g, width in zip(batch.groups, limits.widths, strict=True):
        k = g.row.size
        assert g.op.size == g.start.size == g.count.size == k <= limits.num_rows
        expected = 0
        prev = -1
        for i in range(k):
            op, row, start, count = (int(g.op[i]), int(g.row[i]), int(g.start[i]), int(g.count[i]))
            assert prev < row < limits.num_rows
            prev = row
            assert 0 <= start <= count <= width
            assert op in (OP_SET, OP_APPEND, OP_CLEAR)
            if op == OP_SET:
                assert start == 0
            elif op == OP_CLEAR:
                assert start == count == 0
            else:
                assert 0 < start < count
            expected += count - start
        assert g.pages.size == expected
        assert all(0 <= int(p) <= MAX_PAGE_ID for p in g.pages)


def check_decode_total(data: bytes, limits: WireLimits) -> ShardBatch | None:
    """Decode must refuse with WireFormatError or return a valid batch that round-trips."""
    try:
        batch = decode(data, limits)
    except WireFormatError:
        event("refused")
        return None
    event("decoded")
    assert_valid(batch, limits)
    again = decode(encode(batch), limits)
    assert_batches_equal(batch, again)
    return batch


# A fixed shard shape for the byte-level strictness tests: 4 rows, groups of width 4 and 2.
LIM = WireLimits(4, (4, 2))


def good_msg() -> dict:
    """A valid message as a plain dict: group 0 SET row 0 [7, 8], APPEND row 2 [9] at 1,
    CLEAR row 3; group 1 empty."""

    def b(*xs: int) -> bytes:
        return np.asarray(xs, dtype="<i4").tobytes()

    return {
        "v": VERSION,
        "epoch": 2,
        "base": 1,
        "shard": 0,
        "groups": [
            {
                "op": b(OP_SET, OP_APPEND, OP_CLEAR),
                "row": b(0, 2, 3),
                "start": b(0, 1, 0),
                "count": b(2, 2, 0),
                "pages": b(7, 8, 9),
            },
            {key: b"" for key in KEYS},
        ],
    }


def pack(msg: object) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def i32(*xs: int) -> bytes:
    return np.asarray(xs, dtype="<i4").tobytes()


def with_group0(**cols) -> dict:
    msg = good_msg()
    for key, xs in cols.items():
        msg["groups"][0][key] = i32(*xs) if type(xs) is tuple else xs
    return msg


# --------------------------------------------------------------------------- round trip


def test_good_message_decodes() -> None:
    batch = decode(pack(good_msg()), LIM)
    assert (batch.epoch, batch.base, batch.shard, batch.rows) == (2, 1, 0, 3)
    assert batch.groups[0].pages.tolist() == [7, 8, 9]
    assert batch.groups[1].size == 0
    assert_batches_equal(batch, decode(encode(batch), LIM))
    # bytearray and memoryview are accepted as well
    assert_batches_equal(batch, decode(bytearray(pack(good_msg())), LIM))
    assert_batches_equal(batch, decode(memoryview(pack(good_msg())), LIM))


@SETTINGS
@given(limits_and_batch())
def test_round_trip(lb: tuple[WireLimits, ShardBatch]) -> None:
    limits, batch = lb
    assert_valid(batch, limits)  # the strategy only makes valid batches
    data = encode(batch)
    assert len(data) <= limits.max_bytes
    out = decode(data, limits)
    assert_batches_equal(batch, out)
    assert out.rows == batch.rows
    assert encode(out) == data  # canonical


@pytest.mark.parametrize("limits", [WireLimits(1, (1,)), WireLimits(16, (8, 3)), LIM])
def test_largest_message_fits_the_size_limit(limits: WireLimits) -> None:
    """Every row SET to full width with the largest page ids and epochs still decodes."""
    groups = tuple(full_width_group(limits.num_rows, w) for w in limits.widths)
    batch = ShardBatch(MAX_EPOCH, MAX_EPOCH - 1, 2**31 - 1, groups)
    assert_batches_equal(batch, decode(encode(batch), limits))


def test_empty_group_round_trips() -> None:
    batch = ShardBatch(1, 0, 0, (empty_group(), empty_group()))
    out = decode(encode(batch), LIM)
    assert out.rows == 0
    assert_batches_equal(batch, out)


# --------------------------------------------------------------------------- strictness


def _del(key: str) -> dict:
    msg = good_msg()
    del msg[key]
    return msg


def _set(**kv) -> dict:
    msg = good_msg()
    msg.update(kv)
    return msg


def _group_del(key: str) -> dict:
    msg = good_msg()
    del msg["groups"][0][key]
    return msg


def _group_add(key: object, value: object) -> dict:
    msg = good_msg()
    msg["groups"][1][key] = value
    return msg


BAD_MESSAGES = {
    # top-level keys
    "unknown key": _set(extra=1),
    "missing v": _del("v"),
    "missing epoch": _del("epoch"),
    "missing base": _del("base"),
    "missing shard": _del("shard"),
    "missing groups": _del("groups"),
    "bytes key": {**{k: v for k, v in good_msg().items() if k != "v"}, b"v": VERSION},
    # version
    "version 2": _set(v=2),
    "version 0": _set(v=0),
    "version True": _set(v=True),
    "version str": _set(v="1"),
    "version float": _set(v=1.0),
    "version None": _set(v=None),
    # epoch / base / shard
    "epoch float": _set(epoch=2.0),
    "epoch str": _set(epoch="2"),
    "epoch bool": _set(epoch=True, base=0),
    "epoch None": _set(epoch=None),
    "epoch negative": _set(epoch=-1),
    "epoch too big": _set(epoch=2**63),
    "epoch bytes": _set(epoch=b"\x02"),
    "base float": _set(base=1.0),
    "base negative": _set(base=-1),
    "base == epoch": _set(base=2),
    "base > epoch": _set(base=3),
    "shard negative": _set(shard=-1),
    "shard too big": _set(shard=2**31),
    "shard str": _set(shard="0"),
    # groups container
    "no groups": _set(groups=[]),
    "one group": _set(groups=good_msg()["groups"][:1]),
    "three groups": _set(groups=[*good_msg()["groups"], good_msg()["groups"][1]]),
    "groups is a map": _set(groups={"0": good_msg()["groups"][0]}),
    "groups is bytes": _set(groups=b""),
    "group is a list": _set(groups=[list(good_msg()["groups"][0].values()), {}]),
    "group is None": _set(groups=[good_msg()["groups"][0], None]),
    "group missing key": _group_del("pages"),
    "group unknown key": _group_add("extra", b""),
    "group all bytes keys": _set(
        groups=[{k.encode(): v for k, v in good_msg()["groups"][0].items()}, {}]
    ),
    # columns
    "row not a multiple of 4": with_group0(row=i32(0, 2, 3)[:-1]),
    "pages length 1 byte": with_group0(pages=i32(7, 8, 9) + b"\x00"),
    "column is str": with_group0(row="abcd"),
    "column is list": with_group0(row=[0, 2, 3]),
    "column is int": with_group0(pages=7),
    "op shorter": with_group0(op=(OP_SET, OP_APPEND)),
    "start longer": with_group0(start=(0, 1, 0, 0)),
    "count shorter": with_group0(count=(2, 2)),
    "row longer": with_group0(row=(0, 2, 3, 4)),
    "more ops than rows": with_group0(
        op=(OP_CLEAR,) * 5, row=(0, 1, 2, 3, 4), start=(0,) * 5, count=(0,) * 5, pages=()
    ),
    # row order and range
    "rows repeated": with_group0(row=(0, 2, 2)),
    "rows decreasing": with_group0(row=(2, 0, 3)),
    "row negative": with_group0(row=(-1, 2, 3)),
    "row == num_rows": with_group0(row=(0, 2, 4)),
    "row huge": with_group0(row=(0, 2, 2**31 - 1)),
    # start / count
    "count > width": with_group0(count=(5, 2, 0), pages=i32(*range(6))),
    "count negative": with_group0(count=(2, 2, -1)),
    "start > count": with_group0(start=(0, 3, 0), pages=i32(7, 8)),
    "start negative": with_group0(start=(0, -1, 0), pages=i32(7, 8, 9, 10, 11)),
    "SET start != 0": with_group0(start=(1, 1, 0), pages=i32(7, 9)),
    "CLEAR count != 0": with_group0(count=(2, 2, 1), pages=i32(7, 8, 9, 10)),
    "CLEAR start != 0": with_group0(start=(0, 1, 1), count=(2, 2, 1)),
    "APPEND start == 0": with_group0(start=(0, 0, 0), pages=i32(7, 8, 9, 10)),
    "APPEND start == count": with_group0(start=(0, 2, 0), pages=i32(7, 8)),
    "op code 0": with_group0(op=(0, OP_APPEND, OP_CLEAR)),
    "op code 4": with_group0(op=(OP_SET, OP_APPEND, 4)),
    "op code negative": with_group0(op=(OP_SET, -2, OP_CLEAR)),
    # pages
    "one page too many": with_group0(pages=i32(7, 8, 9, 10)),
    "one page too few": with_group0(pages=i32(7, 8)),
    "no pages": with_group0(pages=b""),
    "negative page id": with_group0(pages=i32(7, -1, 9)),
    "min int32 page id": with_group0(pages=i32(7, -(2**31), 9)),
    "pages in an empty group": _set(
        groups=[good_msg()["groups"][0], {**{k: b"" for k in KEYS}, "pages": i32(1)}]
    ),
    # extension types
    "ext as epoch": _set(epoch=msgpack.ExtType(5, b"\x02")),
    "ext as column": with_group0(pages=msgpack.ExtType(1, i32(7, 8, 9))),
    "ext as group": _set(groups=[good_msg()["groups"][0], msgpack.ExtType(0, b"")]),
    "timestamp as epoch": _set(epoch=msgpack.Timestamp(2, 0)),
    # wrong top-level type
    "top-level list": list(good_msg().values()),
    "top-level int": 1,
    "top-level None": None,
}


@pytest.mark.parametrize("name", sorted(BAD_MESSAGES))
def test_bad_message_is_refused(name: str) -> None:
    data = pack(BAD_MESSAGES[name])
    with pytest.raises(WireFormatError):
        decode(data, LIM)
    assert issubclass(WireFormatError, ValueError)


@pytest.mark.parametrize("key", [b"extra", b"pages"])
def test_group_with_mixed_str_and_bytes_keys_is_refused(key: bytes) -> None:
    msg = _group_add(key, b"")
    with pytest.raises(WireFormatError):
        decode(pack(msg), LIM)


GOOD = pack(good_msg())


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("empty", b""),
        ("never-used byte 0xc1", b"\xc1"),
        ("garbage", b"\xde\xad\xbe\xef" * 8),
        ("text", b"hello world"),
        ("json", b'{"v": 1, "epoch": 2}'),
        ("trailing byte", GOOD + b"\x00"),
        ("two messages", GOOD + GOOD),
        ("oversize", GOOD + b"\x00" * LIM.max_bytes),
        ("oversize bin", pack(with_group0(pages=b"\x00" * (4 * LIM.max_bytes)))),
        ("oversize str", pack(_set(v="x" * 100))),
        ("deep nesting", b"\x91" * (LIM.max_bytes - 1) + b"\xc0"),
        ("huge declared map", b"\xdf\xff\xff\xff\xff"),
        ("huge declared bin", b"\xc6\x7f\xff\xff\xff"),
        ("ext 8", b"\xc7\x01\x05\x00"),
        ("fixext", b"\xd4\x05\x00"),
    ],
)
def test_garbage_is_refused(name: str, data: bytes) -> None:
    with pytest.raises(WireFormatError):
        decode(data, LIM)


@pytest.mark.parametrize("n", range(len(GOOD)))
def test_every_truncation_is_refused(n: int) -> None:
    with pytest.raises(WireFormatError):
        decode(GOOD[:n], LIM)


@pytest.mark.parametrize("data", ["a str", [1, 2], None, 123, np.zeros(4, np.uint8)])
def test_non_bytes_input_is_refused(data: object) -> None:
    with pytest.raises(WireFormatError):
        decode(data, LIM)  # type: ignore[arg-type]


def test_width_is_per_group() -> None:
    """Group 1 has width 2: a SET of 3 pages fits group 0 but not group 1."""
    msg = good_msg()
    msg["groups"][1] = {
        "op": i32(OP_SET),
        "row": i32(1),
        "start": i32(0),
        "count": i32(3),
        "pages": i32(1, 2, 3),
    }
    with pytest.raises(WireFormatError):
        decode(pack(msg), LIM)
    msg["groups"][1]["count"] = i32(2)
    msg["groups"][1]["pages"] = i32(1, 2)
    assert decode(pack(msg), LIM).groups[1].count.tolist() == [2]


# --------------------------------------------------------------------------- fuzz

INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3]
INTERESTING += [*range(0xC4, 0xE0), 0xE0, 0xFF]

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**16), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 2**16), st.sampled_from(INTERESTING)),
    st.tuples(st.just("truncate"), st.integers(0, 2**16)),
    st.tuples(st.just("insert"), st.integers(0, 2**16), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 2**16), st.integers(1, 8)),
    st.tuples(st.just("splice"), st.integers(0, 2**16), st.integers(0, 2**16), st.integers(1, 64)),
)


def mutate(data: bytes, donor: bytes, mutations: list[tuple]) -> bytes:
    buf = bytearray(data)
    for m in mutations:
        kind, n = m[0], len(buf)
        if kind == "flip" and n:
            buf[m[1] % n] ^= m[2]
        elif kind == "set" and n:
            buf[m[1] % n] = m[2]
        elif kind == "truncate":
            del buf[m[1] % (n + 1) :]
        elif kind == "insert":
            i = m[1] % (n + 1)
            buf[i:i] = m[2]
        elif kind == "delete" and n:
            i = m[1] % n
            del buf[i : i + m[2]]
        elif kind == "splice" and donor:
            # overwrite a stretch of the message with a stretch of another valid message
            i, j = m[1] % (n + 1), m[2] % len(donor)
            chunk = donor[j : j + m[3]]
            buf[i : i + len(chunk)] = chunk
    return bytes(buf)


@SETTINGS
@given(
    st.data(),
    st.lists(mutation, min_size=1, max_size=6),
)
def test_fuzz_mutated_messages(data: st.DataObject, mutations: list[tuple]) -> None:
    limits = data.draw(limits_st())
    original = encode(data.draw(batch_st(limits)))
    donor = encode(data.draw(batch_st(limits)))
    check_decode_total(mutate(original, donor, mutations), limits)


int32_values = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 7, 8, 9, 16, -1, -2, 2**31 - 1, -(2**31)]),
    st.integers(-(2**31), 2**31 - 1),
)
column_edit = st.one_of(
    st.tuples(
        st.just("replace"),
        st.integers(0, 2),
        st.sampled_from(KEYS),
        st.integers(0, 99),
        int32_values,
    ),
    st.tuples(st.just("drop"), st.integers(0, 2), st.sampled_from(KEYS), st.integers(0, 99)),
    st.tuples(
        st.just("add"), st.integers(0, 2), st.sampled_from(KEYS), st.integers(0, 99), int32_values
    ),
)


@SETTINGS
@given(st.data(), st.lists(column_edit, min_size=1, max_size=3))
def test_fuzz_column_values(data: st.DataObject, edits: list[tuple]) -> None:
    """Structure-aware fuzz: keep the msgpack frame, damage the int32 column contents."""
    limits = data.draw(limits_st())
    msg = msgpack.unpackb(encode(data.draw(batch_st(limits))), raw=False)
    for kind, g, key, i, *value in edits:
        group = msg["groups"][g % len(msg["groups"])]
        col = np.frombuffer(group[key], dtype="<i4").tolist()
        if kind == "replace" and col:
            col[i % len(col)] = value[0]
        elif kind == "drop" and col:
            del col[i % len(col)]
        elif kind == "add":
            col.insert(i % (len(col) + 1), value[0])
        group[key] = i32(*col)
    check_decode_total(pack(msg), limits)


@SETTINGS
@given(limits_st(), st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(limits: WireLimits, data: bytes) -> None:
    check_decode_total(data, limits)


def _leaves():
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),  # everything msgpack can represent
        st.floats(allow_nan=True),
        st.text(max_size=8),
        st.binary(max_size=24),
        st.sampled_from([i32(0), i32(0, 1), i32(OP_SET), i32(OP_APPEND), i32(2), b"", b"\x00"]),
    )


_keys = st.one_of(
    st.sampled_from(["v", "epoch", "base", "shard", "groups", *KEYS]),
    st.text(max_size=6),
    st.binary(max_size=6),
)
msgpack_values = st.recursive(
    _leaves(),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=6)),
    max_leaves=20,
)


@st.composite
def near_valid_objects(draw) -> object:
    """A valid message with some fields replaced by arbitrary msgpack values."""
    msg = good_msg()
    for key in draw(st.lists(st.sampled_from(sorted(msg)), max_size=3)):
        msg[key] = draw(msgpack_values)
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=3)):
        g = draw(st.integers(0, 1))
        groups = msg["groups"]
        if isinstance(groups, list) and len(groups) > g and isinstance(groups[g], dict):
            groups[g][key] = draw(msgpack_values)
    if draw(st.booleans()):
        msg[draw(st.text(max_size=6))] = draw(msgpack_values)
    return msg


@SETTINGS
@given(st.one_of(msgpack_values, near_valid_objects()))
def test_fuzz_msgpack_objects(obj: object) -> None:
    check_decode_total(pack(obj), LIM)


# --------------------------------------------------------------------------- Shard.apply

LAYOUT = ShardLayout(64, num_shards=4, num_blocks=8)  # 16 rows per shard, 2 device blocks each
WIDTHS = (5, 3)
SHARD_ID = 1
SHARD_LIMITS = WireLimits(LAYOUT.rows_per_shard, WIDTHS)


@functools.cache
def _sharding():
    return row_sharding(build_mesh(None, "data"), "data")


def make_shard(shard_id: int = SHARD_ID) -> Shard:
    return Shard(ShardSpec(shard_id, LAYOUT, WIDTHS, warmup=False), _sharding())


@dataclass
class ShardState:
    epoch: int
    checksum: int
    digest: bytes | None
    tables: list[np.ndarray]
    counts: list[np.ndarray]
    inner: list[np.ndarray]
    device: list[np.ndarray]


def state(shard: Shard) -> ShardState:
    return ShardState(
        shard.epoch,
        shard.checksum,
        shard._applied,
        [t.copy() for t in shard.tables],
        [c.copy() for c in shard.counts],
        [i.copy() for i in shard.inner],
        [shard.snapshot(g) for g in range(len(WIDTHS))],
    )


def assert_same_state(a: ShardState, b: ShardState) -> None:
    assert (a.epoch, a.checksum, a.digest) == (b.epoch, b.checksum, b.digest)
    for name in ("tables", "counts", "inner", "device"):
        for x, y in zip(getattr(a, name), getattr(b, name), strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert x.tobytes() == y.tobytes(), name


def assert_consistent(shard: Shard) -> None:
    """Host rows are tail-padded, the device holds the host rows, the checksum matches."""
    for g in range(len(WIDTHS)):
        table, counts = shard.tables[g], shard.counts[g]
        cols = np.arange(table.shape[1])
        assert np.all(table[cols[None, :] >= counts[:, None]] == PAGE_TABLE_PADDING_VAL)
        np.testing.assert_array_equal(shard.snapshot(g), table)
    assert shard.checksum == checksum_from_scratch(shard)


def checksum_from_scratch(shard: Shard) -> int:
    total = 0
    r = np.arange(shard.lo, shard.hi)
    for g in range(len(WIDTHS)):
        counts = shard.counts[g]
        n = np.arange(counts.size)
        rr, cc = checksum.segment_index(n, np.zeros_like(counts), counts)
        inner = checksum.updated_inner(
            np.zeros(counts.size, np.uint64), np.zeros_like(counts), counts, shard.tables[g][rr, cc]
        )
        total = checksum.add(
            total, checksum.total_delta(g, r, np.zeros(counts.size, np.uint64), inner)
        )
    return total


def reference_apply(tables: list[np.ndarray], counts: list[np.ndarray], batch: ShardBatch):
    """Plain-loop application of a decoded batch to copies of ``tables``/``counts``."""
    tables = [t.copy() for t in tables]
    counts = [c.copy() for c in counts]
    for g, gb in enumerate(batch.groups):
        loop_apply(tables[g], counts[g], gb)
    return tables, counts


def loop_apply(table: np.ndarray, counts: np.ndarray, gb: GroupBatch) -> None:
    at = 0
    for i in range(gb.size):
        op, r, start, count = (int(gb.op[i]), int(gb.row[i]), int(gb.start[i]), int(gb.count[i]))
        new = [int(p) for p in gb.pages[at : at + count - start]]
        at += count - start
        if op == OP_APPEND:
            assert start == counts[r]
            row = [int(x) for x in table[r, :start]] + new
        else:
            row = new
        table[r, :] = PAGE_TABLE_PADDING_VAL
        table[r, : len(row)] = row
        counts[r] = len(row)


def seed_message(shard: Shard, data: st.DataObject, epoch: int | None = None) -> bytes:
    """A valid next-epoch message for ``shard`` given its current counts."""
    base = shard.epoch
    batch = data.draw(
        batch_st(
            shard.limits,
            counts=shard.counts,
            epoch=base + 1 if epoch is None else epoch,
            base=base,
            shard=shard.spec.shard_id,
        )
    )
    return encode(batch)


def test_fresh_shard_is_empty_and_consistent() -> None:
    shard = make_shard()
    assert (shard.lo, shard.hi, shard.epoch, shard.checksum) == (16, 32, 0, 0)
    assert_consistent(shard)


def _msg(epoch: int, base: int, groups: list[dict], shard: int = SHARD_ID) -> bytes:
    full = [*groups, *({k: b"" for k in KEYS} for _ in range(len(WIDTHS) - len(groups)))]
    return pack({"v": VERSION, "epoch": epoch, "base": base, "shard": shard, "groups": full})


def _g(*ops: tuple) -> dict:
    """Group map from (op, row, start, count, pages) tuples."""
    cols = {k: [] for k in KEYS}
    pages: list[int] = []
    for op, row, start, count, pg in ops:
        for k, v in zip(("op", "row", "start", "count"), (op, row, start, count), strict=True):
            cols[k].append(v)
        pages.extend(pg)
    out = {k: i32(*cols[k]) for k in ("op", "row", "start", "count")}
    out["pages"] = i32(*pages)
    return out


def test_apply_then_append_then_clear() -> None:
    shard = make_shard()
    ack = shard.apply(_msg(1, 0, [_g((OP_SET, 0, 0, 2, [4, 5]), (OP_SET, 15, 0, 5, [1] * 5))]))
    assert (ack.shard, ack.epoch, ack.rows, ack.applied) == (SHARD_ID, 1, 2, True)
    assert ack.checksum == shard.checksum != 0
    assert shard.tables[0][0].tolist() == [4, 5, 0, 0, 0]
    assert_consistent(shard)
    shard.apply(_msg(2, 1, [_g((OP_APPEND, 0, 2, 4, [6, 7]), (OP_CLEAR, 15, 0, 0, []))]))
    assert shard.tables[0][0].tolist() == [4, 5, 6, 7, 0]
    assert shard.counts[0][[0, 15]].tolist() == [4, 0]
    assert shard.tables[0][15].tolist() == [0] * 5
    assert_consistent(shard)


def test_append_at_wrong_count_is_refused_without_change() -> None:
    shard = make_shard()
    shard.apply(_msg(1, 0, [_g((OP_SET, 3, 0, 2, [4, 5])), _g((OP_SET, 7, 0, 1, [9]))]))
    before = state(shard)
    bad = [
        # decodes fine, but row 3 holds 2 pages, not 1
        _msg(2, 1, [_g((OP_APPEND, 3, 1, 3, [6, 7]))]),
        # appends to an empty row
        _msg(2, 1, [_g((OP_APPEND, 4, 1, 2, [6]))]),
        # group 0 is fine, group 1's append is wrong: nothing of group 0 may be applied
        _msg(2, 1, [_g((OP_SET, 0, 0, 1, [1])), _g((OP_APPEND, 7, 2, 3, [8]))]),
        # a valid append followed by a wrong one in the same group
        _msg(2, 1, [_g((OP_APPEND, 3, 2, 3, [6]), (OP_APPEND, 5, 1, 2, [1]))]),
    ]
    for message in bad:
        decode(message, shard.limits)  # the wire format itself accepts it
        with pytest.raises(WireFormatError, match="APPEND"):
            shard.apply(message)
        assert_same_state(before, state(shard))
    # and the shard still takes a good batch afterwards
    shard.apply(_msg(2, 1, [_g((OP_APPEND, 3, 2, 3, [6]))]))
    assert shard.tables[0][3].tolist() == [4, 5, 6, 0, 0]
    assert_consistent(shard)


def test_check_group_directly() -> None:
    counts = np.array([0, 2, 5], np.int32)
    ok = GroupBatch(*(np.asarray(x, np.int32) for x in ([OP_APPEND], [1], [2], [3], [9])))
    check_group(counts, ok, 0)
    bad = GroupBatch(*(np.asarray(x, np.int32) for x in ([OP_APPEND], [1], [1], [3], [9, 9])))
    with pytest.raises(WireFormatError, match="local row 1 starts at 1 but the row holds 2"):
        check_group(counts, bad, 0)
    check_group(counts, empty_group(), 0)


def test_resent_epoch_is_acknowledged_not_reapplied() -> None:
    shard = make_shard()
    message = _msg(1, 0, [_g((OP_SET, 0, 0, 2, [4, 5]))])
    first = shard.apply(message)
    before = state(shard)
    again = shard.apply(message)
    assert again.applied is False
    assert (again.epoch, again.checksum, again.shard) == (first.epoch, first.checksum, SHARD_ID)
    assert_same_state(before, state(shard))
    # an append is not idempotent by itself: re-sending it must still not apply it twice
    append = _msg(2, 1, [_g((OP_APPEND, 0, 2, 3, [6]))])
    assert shard.apply(append).applied is True
    before = state(shard)
    assert shard.apply(append).applied is False
    assert_same_state(before, state(shard))
    assert shard.tables[0][0].tolist() == [4, 5, 6, 0, 0]


def test_same_epoch_other_content_is_refused() -> None:
    shard = make_shard()
    shard.apply(_msg(1, 0, [_g((OP_SET, 0, 0, 2, [4, 5]))]))
    before = state(shard)
    for other in (
        _msg(1, 0, [_g((OP_SET, 0, 0, 2, [4, 6]))]),
        _msg(1, 0, [_g((OP_SET, 1, 0, 2, [4, 5]))]),
        _msg(1, 0, []),
    ):
        with pytest.raises(WireFormatError, match="already applied"):
            shard.apply(other)
        assert_same_state(before, state(shard))


def test_wrong_base_is_refused() -> None:
    shard = make_shard()
    before = state(shard)
    for message in (
        _msg(6, 5, [_g((OP_SET, 0, 0, 1, [1]))]),
        _msg(2, 1, [_g((OP_SET, 0, 0, 1, [1]))]),
    ):
        with pytest.raises(WireFormatError, match="builds on epoch"):
            shard.apply(message)
        assert_same_state(before, state(shard))
    shard.apply(_msg(1, 0, [_g((OP_SET, 0, 0, 1, [1]))]))
    before = state(shard)
    for message in (_msg(2, 0, []), _msg(3, 2, []), _msg(9, 5, [])):
        with pytest.raises(WireFormatError, match="builds on epoch"):
            shard.apply(message)
        assert_same_state(before, state(shard))


def test_message_for_another_shard_is_refused() -> None:
    shard = make_shard()
    before = state(shard)
    with pytest.raises(WireFormatError, match="sent to shard"):
        shard.apply(_msg(1, 0, [_g((OP_SET, 0, 0, 1, [1]))], shard=SHARD_ID + 1))
    assert_same_state(before, state(shard))


def test_rollback_restores_previous_epoch_exactly() -> None:
    shard = make_shard()
    shard.apply(
        _msg(
            1,
            0,
            [
                _g((OP_SET, 0, 0, 3, [1, 2, 3]), (OP_SET, 8, 0, 5, [5, 6, 7, 8, 9])),
                _g((OP_SET, 2, 0, 2, [3, 4])),
            ],
        )
    )
    before = state(shard)
    shard.apply(
        _msg(
            2,
            1,
            [
                _g(
                    (OP_APPEND, 0, 3, 5, [10, 11]),
                    (OP_SET, 1, 0, 1, [12]),
                    (OP_SET, 8, 0, 2, [13, 14]),
                    (OP_CLEAR, 9, 0, 0, []),
                ),
                _g((OP_CLEAR, 2, 0, 0, []), (OP_SET, 15, 0, 3, [1, 1, 1])),
            ],
        )
    )
    assert shard.epoch == 2
    assert_consistent(shard)
    # rolling back an epoch the shard does not hold is a no-op
    after = state(shard)
    assert shard.rollback(1).applied is False
    assert shard.rollback(3).applied is False
    assert_same_state(after, state(shard))
    ack = shard.rollback(2)
    assert ack.applied is True and ack.epoch == 1 and ack.checksum == before.checksum
    assert_same_state(before, state(shard))
    assert_consistent(shard)
    # only one step of undo is kept
    with pytest.raises(RuntimeError):
        shard.rollback(1)
    assert_same_state(before, state(shard))
    # the previous epoch's message is still recognised as applied, the next one applies
    assert shard.apply(_msg(2, 1, [_g((OP_SET, 4, 0, 1, [4]))])).applied is True
    assert_consistent(shard)


@settings(SETTINGS, max_examples=100)
@given(st.data(), st.lists(mutation, max_size=4), st.booleans())
def test_fuzz_apply_is_all_or_nothing(
    data: st.DataObject, mutations: list[tuple], roll_back: bool
) -> None:
    shard = make_shard()
    shard.apply(seed_message(shard, data))  # some content to damage
    before = state(shard)
    message = seed_message(shard, data)
    donor = seed_message(shard, data)
    message = mutate(message, donor, mutations)
    try:
        expected_batch = decode(message, shard.limits)
    except WireFormatError:
        expected_batch = None
    try:
        ack = shard.apply(message)
    except WireFormatError:
        event("refused")
        assert_same_state(before, state(shard))
        return
    event("applied")
    assert expected_batch is not None
    assert ack.applied is True
    assert ack.epoch == shard.epoch == expected_batch.epoch
    assert ack.checksum == shard.checksum
    want_tables, want_counts = reference_apply(before.tables, before.counts, expected_batch)
    for g in range(len(WIDTHS)):
        np.testing.assert_array_equal(shard.tables[g], want_tables[g])
        np.testing.assert_array_equal(shard.counts[g], want_counts[g])
    assert_consistent(shard)
    if roll_back:
        shard.rollback(shard.epoch)
        assert_same_state(before, state(shard))


@settings(SETTINGS, max_examples=50)
@given(st.data())
def test_sequence_of_epochs_matches_loop_reference(data: st.DataObject) -> None:
    shard = make_shard(data.draw(st.integers(0, LAYOUT.num_shards - 1)))
    tables = [t.copy() for t in shard.tables]
    counts = [c.copy() for c in shard.counts]
    for _ in range(data.draw(st.integers(1, 6))):
        message = seed_message(shard, data)
        batch = decode(message, shard.limits)
        tables, counts = reference_apply(tables, counts, batch)
        assert shard.apply(message).applied is True
        for g in range(len(WIDTHS)):
            np.testing.assert_array_equal(shard.tables[g], tables[g])
            np.testing.assert_array_equal(shard.counts[g], counts[g])
        assert_consistent(shard)


# --------------------------------------------------------------------------- apply_group


@st.composite
def table_and_batch(draw):
    rows = draw(st.integers(1, 24))
    width = draw(st.integers(1, 8))
    counts = np.asarray(draw(st.lists(st.integers(0, width), min_size=rows, max_size=rows)))
    counts = counts.astype(np.int32)
    table = np.full((rows, width), PAGE_TABLE_PADDING_VAL, np.int32)
    for r in range(rows):
        table[r, : counts[r]] = draw(
            st.lists(page_ids, min_size=int(counts[r]), max_size=int(counts[r]))
        )
    batch = draw(group_st(rows, width, counts))
    return table, counts, batch


@SETTINGS
@given(table_and_batch())
def test_apply_group_matches_python_loop(tcb) -> None:
    table, counts, batch = tcb
    check_group(counts, batch, 0)  # the strategy only makes consistent batches
    want_t, want_c = table.copy(), counts.copy()
    loop_apply(want_t, want_c, batch)
    got_t, got_c = table.copy(), counts.copy()
    apply_group(got_t, got_c, batch)
    np.testing.assert_array_equal(got_t, want_t)
    np.testing.assert_array_equal(got_c, want_c)
    # untouched rows are untouched
    untouched = np.setdiff1d(np.arange(table.shape[0]), batch.row)
    np.testing.assert_array_equal(got_t[untouched], table[untouched])
