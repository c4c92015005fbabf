"""Hostile and careless inputs (issue 9, items 5 and 7), on every kind of table.

A refused call raises ``ValueError`` / ``IndexError`` whose message names the value, leaves
host tables, counts and the device tables byte-identical, and the next valid commit still
succeeds. Integral, in-range ids in an unusual container (strided views, big-endian,
``uint64``, subclasses, ``range``) are converted exactly. Nothing the API accepts can make a
shard refuse its batch: every accepted sequence of calls yields messages the shard's strict
decoder takes (checked on the wire bytes here, and end to end on the Ray backend).
"""

from __future__ import annotations

import array
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from invariants import (
    assert_state_unchanged,
    assert_tail_padded,
    default_device,
    device_snapshot,
    snapshot_state,
)

import sharded_pagetable as sp
from sharded_pagetable.rows.messages import ShardBatch
from sharded_pagetable.shard.wire import WireLimits, decode, encode

R, MAX_LEN, TOKENS, PAGE_SIZES = 16, 256, 64, (16, 64)
WIDTHS = (16, 4)  # pages per row of each group
HUGE = 2**40 + 7  # stored as 7 by a truncating cast
U64_MAX = 2**64 - 1


class Lying(np.ndarray):
    """An array whose own methods lie about its values: validation must not ask them."""

    def min(self, *args, **kwargs):
        return 0

    def max(self, *args, **kwargs):
        return 0

    def astype(self, *args, **kwargs):
        return np.zeros(self.shape, np.int32)

    def __iter__(self):
        return iter([0] * len(self))

    def tolist(self):
        return [0] * len(self)


class Plain(np.ndarray):
    """An honest ndarray subclass."""


def _masked(values, mask, dtype=np.int64):
    return np.ma.array(values, mask=mask, dtype=dtype)


# ---------------------------------------------------------------------------- tables


def _make(kind: str):
    if kind == "multigroup":
        return sp.MultiGroupPageTable(R, MAX_LEN, TOKENS, list(PAGE_SIZES), warmup=False), (
            default_device
        )
    return sp.ShardedPageTable(R, MAX_LEN, TOKENS, PAGE_SIZES, num_shards=2), device_snapshot


@pytest.fixture(scope="module", params=["multigroup", "sharded-local"])
def table_kind(request):
    table, device = _make(request.param)
    yield table, device
    if hasattr(table, "close"):
        table.close()


def prime(table) -> None:
    """Published rows plus pending changes of every kind, so host and device differ."""
    table.add_row([[1, 2, 3], [4]], 0)
    table.add_row([[5], [6, 7]], 9)
    table.add_row([[], []], 3)
    table.add_row([[], []], 5)
    table.commit(R)
    table.append_row([[8], [9]], 0)  # pending append
    table.add_row([[10, 11], []], 3)  # pending rewrite
    table.clear_row(9)  # pending clear


@pytest.fixture
def case(table_kind):
    table, device = table_kind
    prime(table)
    return table, device


def assert_refused(table, device, call: Callable[[], object], exc: type, tokens, what=""):
    """``call()`` raises exactly ``exc`` naming one of ``tokens``; nothing changes."""
    before = snapshot_state(table, device=device)
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is exc, f"{what}: {type(info.value).__name__}: {info.value}"
    assert_state_unchanged(before, snapshot_state(table, device=device), what=what)
    message = str(info.value)
    assert any(tok in message for tok in tokens), f"{what}: {message!r} names none of {tokens}"
    assert len(message) < 1000, f"{what}: a {len(message)}-character message"


def assert_next_commit_works(table, device) -> None:
    """A valid call and a full commit go through; the device then equals the host."""
    table.add_row([[20, 21], [22]], R - 1)
    table.commit(R)
    for g in range(len(PAGE_SIZES)):
        host = table[g].get_cpu_tensor()
        assert_tail_padded(host, table[g].num_pages_per_row)
        np.testing.assert_array_equal(device(table, g), host)
    assert table[0].get_cpu_tensor()[R - 1, :2].tolist() == [20, 21]


# ---------------------------------------------------------------------------- page ids

BAD_PAGE_IDS = [
    # masked arrays: min()/max() skip masked entries, a cast keeps what the buffer holds
    pytest.param(lambda: _masked([3, -7], [0, 1]), ("masked",), id="masked-minus7"),
    pytest.param(lambda: _masked([3, HUGE], [0, 1]), ("masked",), id="masked-2**40+7"),
    pytest.param(lambda: _masked([3, 4], [0, 0]), ("masked",), id="masked-nothing-masked"),
    pytest.param(lambda: _masked([3, 4], [0, 0], np.int32), ("masked",), id="masked-int32"),
    pytest.param(lambda: [3, np.ma.masked], ("masked",), id="list-with-masked-constant"),
    pytest.param(lambda: [3, np.ma.masked_array(4)], ("masked",), id="list-with-masked-0d"),
    # other dtypes
    pytest.param(lambda: np.array([3, 4], dtype=object), ("object",), id="object"),
    pytest.param(lambda: np.array([3, HUGE], dtype=object), ("object",), id="object-2**40+7"),
    pytest.param(lambda: np.array([3, -7], dtype=object), ("object",), id="object-minus7"),
    pytest.param(lambda: np.array([True, False]), ("bool",), id="bool-array"),
    pytest.param(lambda: np.array([3.0, 4.0]), ("float",), id="float64-array"),
    pytest.param(lambda: np.array([3, 4], np.float16), ("float",), id="float16-array"),
    pytest.param(lambda: np.array([3 + 0j]), ("complex",), id="complex-array"),
    pytest.param(lambda: np.array(["2020-01-01"], "datetime64[D]"), ("datetime",), id="datetime"),
    pytest.param(lambda: np.array([3], "timedelta64[s]"), ("timedelta",), id="timedelta"),
    pytest.param(lambda: np.array(["3"]), ("<U1",), id="str-array"),
    # shapes
    pytest.param(lambda: np.array(3), ("shape ()",), id="0d-array"),
    pytest.param(lambda: np.array(HUGE), ("shape ()",), id="0d-array-2**40+7"),
    pytest.param(lambda: np.array([[3, 4]]), ("shape (1, 2)",), id="2d-array"),
    pytest.param(
        lambda: np.matrix([[3, 4]]),
        ("shape (1, 2)",),
        id="matrix",
        marks=pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
    ),
    pytest.param(lambda: [[3]], ("[3]",), id="nested-list"),
    pytest.param(lambda: [3, np.array(4)], ("array(4)",), id="list-with-0d-array"),
    # out of range, in every container
    pytest.param(lambda: [3, HUGE], (str(HUGE),), id="int-2**40+7"),
    pytest.param(lambda: [3, -7], ("-7",), id="int-minus7"),
    pytest.param(lambda: [3, np.uint64(U64_MAX)], (str(U64_MAX),), id="np-uint64-max"),
    pytest.param(lambda: [np.int64(HUGE)], (str(HUGE),), id="np-int64-2**40+7"),
    pytest.param(lambda: (np.uint64(2**31),), (str(2**31),), id="tuple-np-uint64-2**31"),
    pytest.param(lambda: np.array([3, 2**31], np.uint64), (str(2**31),), id="uint64-2**31"),
    pytest.param(lambda: np.array([HUGE], np.uint64), (str(HUGE),), id="uint64-2**40+7"),
    pytest.param(lambda: np.array([U64_MAX], np.uint64), (str(U64_MAX),), id="uint64-max"),
    pytest.param(lambda: np.array([3, HUGE]), (str(HUGE),), id="int64-2**40+7"),
    pytest.param(lambda: np.array([3, 0, -7, 0])[::2], ("-7",), id="strided-minus7"),
    pytest.param(lambda: np.array([3, HUGE], ">i8"), (str(HUGE),), id="big-endian-2**40+7"),
    pytest.param(lambda: np.array([3, -7]).view(Lying), ("-7",), id="lying-subclass-minus7"),
    pytest.param(lambda: np.array([3, HUGE]).view(Lying), (str(HUGE),), id="lying-2**40+7"),
    # not a list at all
    pytest.param(lambda: (p for p in [3, 4]), ("generator",), id="generator"),
    pytest.param(lambda: iter([3, 4]), ("iterator",), id="iterator"),
    pytest.param(lambda: map(int, [3, 4]), ("map",), id="map"),
    pytest.param(lambda: {0: 3, 1: 4}, ("dict",), id="dict"),
    pytest.param(lambda: {3, 4}, ("set",), id="set"),
    pytest.param(lambda: "34", ("str",), id="str"),
    pytest.param(lambda: b"\x03\x04", ("bytes",), id="bytes"),
    pytest.param(lambda: bytearray(b"\x03\x04"), ("bytearray",), id="bytearray"),
    pytest.param(lambda: memoryview(b"\x03\x04"), ("memoryview",), id="memoryview"),
    pytest.param(lambda: 3, ("int",), id="bare-int"),
    pytest.param(lambda: None, ("None",), id="None"),
    # items that are not integers
    pytest.param(lambda: [3, 4.0], ("4.0",), id="float-item"),
    pytest.param(lambda: [3, True], ("True",), id="bool-item"),
    pytest.param(lambda: [3, np.bool_(True)], ("True",), id="np-bool-item"),
    pytest.param(lambda: [3, Fraction(4)], ("Fraction",), id="fraction-item"),
    pytest.param(lambda: [3, Decimal(4)], ("Decimal",), id="decimal-item"),
]


def _page_id_calls(table, bad: Callable[[], object]) -> list[tuple[str, Callable[[], object]]]:
    """Every way one group's bad page ids reach the table (a fresh value for each call)."""
    calls = []
    for g in range(len(PAGE_SIZES)):

        def ids(g=g):
            out = [[], []]
            out[g] = bad()
            return out

        calls += [
            (f"append_row g{g}", lambda ids=ids: table.append_row(ids(), 5)),
            (f"add_row g{g}", lambda ids=ids: table.add_row(ids(), 0)),
            (
                f"append_rows_batch g{g}",
                lambda ids=ids: table.append_rows_batch([[[30], [31]], ids()], [4, 5]),
            ),
        ]
    return calls


@pytest.mark.parametrize(("bad", "tokens"), BAD_PAGE_IDS)
def test_bad_page_ids_are_refused(case, bad, tokens):
    table, device = case
    for what, call in _page_id_calls(table, bad):
        assert_refused(table, device, call, ValueError, tokens, what)
    assert_next_commit_works(table, device)


ACCEPTED_PAGE_IDS = [
    pytest.param(lambda: np.array([3, 99, 4, 99, 5])[::2], [3, 4, 5], id="strided"),
    pytest.param(lambda: np.arange(10)[::-3], [9, 6, 3, 0], id="reversed-strided"),
    pytest.param(lambda: np.array([[3, 4], [5, 6]])[:, 1], [4, 6], id="column-view"),
    pytest.param(lambda: np.array([3, 4], ">i8"), [3, 4], id="big-endian"),
    pytest.param(lambda: np.array([2**31 - 1, 0], np.uint64), [2**31 - 1, 0], id="uint64-max-id"),
    pytest.param(lambda: np.array([7], np.uint64), [7], id="uint64"),
    pytest.param(lambda: np.array([3, 4], np.int8), [3, 4], id="int8"),
    pytest.param(lambda: np.asfortranarray(np.array([3, 4], np.int32)), [3, 4], id="fortran"),
    pytest.param(lambda: np.array([3, 4]).view(Plain), [3, 4], id="subclass"),
    pytest.param(lambda: np.array([3, 4]).view(Lying), [3, 4], id="lying-subclass"),
    pytest.param(lambda: (np.uint64(3), np.int8(4)), [3, 4], id="tuple-of-numpy-ints"),
    pytest.param(lambda: [np.uint64(2**31 - 1)], [2**31 - 1], id="np-uint64-max-id"),
    pytest.param(lambda: range(3, 6), [3, 4, 5], id="range"),
    pytest.param(lambda: array.array("q", [3, 4]), [3, 4], id="array-module"),
    pytest.param(lambda: np.array([], np.float64), [], id="empty-float-array"),
]


def _read_only(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


@pytest.mark.parametrize(("ids", "expected"), ACCEPTED_PAGE_IDS)
def test_unusual_but_exact_page_ids_are_converted_exactly(case, ids, expected):
    table, device = case
    n = len(expected)
    for call in (
        lambda: table.add_row([ids(), [1]], 6),
        lambda: (table.clear_row(6), table.append_row([ids(), [1]], 6)),
        lambda: (table.clear_row(6), table.append_rows_batch([[ids(), [1]]], [6])),
    ):
        call()
        assert table[0].get_cpu_tensor()[6].tolist() == expected + [0] * (WIDTHS[0] - n)
        assert table[0].num_pages_per_row[6] == n
        table.commit(R)
        assert device(table, 0)[6].tolist() == expected + [0] * (WIDTHS[0] - n)
    assert_next_commit_works(table, device)


def test_page_ids_are_copied_before_they_are_checked(case):
    """A caller's later write to its own array changes nothing the table holds."""
    table, device = case
    ids = np.array([3, 4], np.int32)
    table.add_row([ids, ids[:1]], 7)
    ids[:] = -7
    assert table[0].get_cpu_tensor()[7, :2].tolist() == [3, 4]
    assert table[1].get_cpu_tensor()[7, :1].tolist() == [3]
    assert_next_commit_works(table, device)


# ---------------------------------------------------------------------------- outer lists

BAD_GROUP_LISTS = [
    pytest.param(lambda: ([3] for _ in range(2)), ("generator",), id="generator"),
    pytest.param(lambda: iter([[3], [4]]), ("iterator",), id="iterator"),
    pytest.param(lambda: {0: [3], 1: [4]}, ("dict",), id="dict"),
    pytest.param(lambda: {(3,), (4,)}, ("set",), id="set"),
    pytest.param(lambda: "34", ("str",), id="str"),
    pytest.param(lambda: b"\x03\x04", ("bytes",), id="bytes"),
    pytest.param(lambda: bytearray(b"\x03\x04"), ("bytearray",), id="bytearray"),
    pytest.param(lambda: memoryview(b"\x03\x04"), ("memoryview",), id="memoryview"),
    pytest.param(lambda: np.ma.array([[3], [4]]), ("masked",), id="masked-nothing-masked"),
    pytest.param(lambda: _masked([[3], [-7]], [[0], [1]]), ("masked",), id="masked-minus7"),
    pytest.param(lambda: _masked([[3], [HUGE]], [[0], [1]]), ("masked",), id="masked-2**40+7"),
    pytest.param(lambda: np.array(5), ("0-d",), id="0d-array"),
    pytest.param(lambda: np.ma.masked, ("masked",), id="masked-constant"),
    pytest.param(lambda: [[3]], ("1 groups",), id="one-group"),
    pytest.param(lambda: [[3], [4], [5]], ("3 groups",), id="three-groups"),
    pytest.param(lambda: None, ("None",), id="None"),
]


@pytest.mark.parametrize(("bad", "tokens"), BAD_GROUP_LISTS)
def test_bad_group_lists_are_refused(case, bad, tokens):
    table, device = case
    for what, call in (
        ("append_row", lambda: table.append_row(bad(), 5)),
        ("add_row", lambda: table.add_row(bad(), 0)),
        ("append_rows_batch", lambda: table.append_rows_batch([[[30], [31]], bad()], [4, 5])),
    ):
        assert_refused(table, device, call, ValueError, tokens, what)
    assert_next_commit_works(table, device)


def test_a_2d_array_of_groups_is_converted_exactly(case):
    table, device = case
    table.add_row(np.array([[3, 4], [5, 6]], np.uint64), 7)
    assert table[0].get_cpu_tensor()[7, :3].tolist() == [3, 4, 0]
    assert table[1].get_cpu_tensor()[7, :3].tolist() == [5, 6, 0]
    assert_next_commit_works(table, device)


BAD_BATCH_LISTS = [
    pytest.param(lambda: ([[3], [4]] for _ in range(1)), ("generator",), id="generator"),
    pytest.param(lambda: iter([[[3], [4]]]), ("iterator",), id="iterator"),
    pytest.param(lambda: {0: [[3], [4]]}, ("dict",), id="dict"),
    pytest.param(lambda: {((3,), (4,))}, ("set",), id="set"),
    pytest.param(lambda: "5", ("str",), id="str"),
    pytest.param(lambda: np.ma.array([[[3], [4]]]), ("masked",), id="masked"),
    pytest.param(lambda: np.array(5), ("0-d",), id="0d-array"),
    pytest.param(lambda: None, ("None",), id="None"),
]

BAD_ROW_LISTS = [
    pytest.param(lambda: (r for r in [5]), ValueError, ("generator",), id="generator"),
    pytest.param(lambda: iter([5]), ValueError, ("iterator",), id="iterator"),
    pytest.param(lambda: {5: 0}, ValueError, ("dict",), id="dict"),
    pytest.param(lambda: {5}, ValueError, ("set",), id="set"),
    pytest.param(lambda: "5", ValueError, ("str",), id="str"),
    pytest.param(lambda: np.ma.array([5]), ValueError, ("masked",), id="masked"),
    pytest.param(lambda: np.ma.array([5], mask=[1]), ValueError, ("masked",), id="masked-5"),
    pytest.param(lambda: np.array(5), ValueError, ("0-d",), id="0d-array"),
    pytest.param(lambda: np.array([True]), ValueError, ("True",), id="bool-array"),
    pytest.param(lambda: np.array([5.0]), ValueError, ("5.0",), id="float-array"),
    pytest.param(lambda: [np.uint64(U64_MAX)], IndexError, (str(U64_MAX),), id="uint64-max"),
    pytest.param(lambda: np.array([R], np.uint64), IndexError, (str(R),), id="uint64-R"),
    pytest.param(lambda: None, ValueError, ("None",), id="None"),
]


@pytest.mark.parametrize(("bad", "tokens"), BAD_BATCH_LISTS)
def test_bad_batch_page_id_lists_are_refused(case, bad, tokens):
    table, device = case
    call = lambda: table.append_rows_batch(bad(), [5])  # noqa: E731
    assert_refused(table, device, call, ValueError, tokens, "page_ids_per_req")
    assert_next_commit_works(table, device)


@pytest.mark.parametrize(("bad", "exc", "tokens"), BAD_ROW_LISTS)
def test_bad_batch_row_lists_are_refused(case, bad, exc, tokens):
    table, device = case
    call = lambda: table.append_rows_batch([[[30], [31]]], bad())  # noqa: E731
    assert_refused(table, device, call, exc, tokens, "req_indices")
    assert_next_commit_works(table, device)


def test_array_row_lists_are_accepted(case):
    table, device = case
    table.add_row([[], []], 7)
    table.append_rows_batch([[[30], [31]], [[32], []]], np.array([7, 7], np.uint8))
    table.append_rows_batch(np.array([[[33], [34]]]), range(7, 8))
    assert table[0].get_cpu_tensor()[7, :4].tolist() == [30, 32, 33, 0]
    assert table[1].get_cpu_tensor()[7, :3].tolist() == [31, 34, 0]
    assert_next_commit_works(table, device)


# ---------------------------------------------------------------------------- rows, num_reqs

BAD_ROWS = [
    pytest.param(True, ValueError, ("True",), id="True"),
    pytest.param(np.bool_(False), ValueError, ("False",), id="np-bool"),
    pytest.param(np.array(3), ValueError, ("array(3)",), id="0d-array"),
    pytest.param(np.ma.masked_array(3), ValueError, ("masked",), id="masked-0d"),
    pytest.param(np.ma.masked_array(3, mask=True), ValueError, ("masked",), id="masked-0d-hidden"),
    pytest.param(np.ma.masked, ValueError, ("masked",), id="masked-constant"),
    pytest.param(3.0, ValueError, ("3.0",), id="float"),
    pytest.param(np.float32(3), ValueError, ("3.0",), id="np-float32"),
    pytest.param(Fraction(3), ValueError, ("Fraction",), id="fraction"),
    pytest.param(Decimal(3), ValueError, ("Decimal",), id="decimal"),
    pytest.param("3", ValueError, ("'3'",), id="str"),
    pytest.param([3], ValueError, ("[3]",), id="list"),
    pytest.param(None, ValueError, ("None",), id="None"),
    pytest.param(np.uint64(U64_MAX), IndexError, (str(U64_MAX),), id="np-uint64-max"),
    pytest.param(np.uint64(R), IndexError, (str(R),), id="np-uint64-R"),
    pytest.param(np.uint8(255), IndexError, ("255",), id="np-uint8-255"),
    pytest.param(np.int64(-1), IndexError, ("-1",), id="np-int64-minus1"),
    pytest.param(2**64, IndexError, (str(2**64),), id="2**64"),
]


@pytest.mark.parametrize(("bad", "exc", "tokens"), BAD_ROWS)
def test_bad_rows_are_refused(case, bad, exc, tokens):
    table, device = case
    for what, call in (
        ("append_row", lambda: table.append_row([[30], [31]], bad)),
        ("append_row empty", lambda: table.append_row([[], []], bad)),
        ("add_row", lambda: table.add_row([[30], [31]], bad)),
        ("clear_row", lambda: table.clear_row(bad)),
        ("move_row src", lambda: table.move_row(bad, 1)),
        ("move_row tgt", lambda: table.move_row(0, bad)),
        ("swap_row src", lambda: table.swap_row(bad, 1)),
        ("swap_row tgt", lambda: table.swap_row(0, bad)),
        ("append_rows_batch", lambda: table.append_rows_batch([[[30], []], [[31], []]], [4, bad])),
    ):
        assert_refused(table, device, call, exc, tokens, what)
    assert_next_commit_works(table, device)


BAD_NUM_REQS = [
    pytest.param(True, ("True",), id="True"),
    pytest.param(np.bool_(True), ("True",), id="np-bool"),
    pytest.param(3.0, ("3.0",), id="float"),
    pytest.param(np.float64(16), ("16.0",), id="np-float64"),
    pytest.param(np.array(3), ("array(3)",), id="0d-array"),
    pytest.param(np.ma.masked_array(3), ("masked",), id="masked-0d"),
    pytest.param(np.ma.masked, ("masked",), id="masked-constant"),
    pytest.param(np.uint64(U64_MAX), (str(U64_MAX),), id="np-uint64-max"),
    pytest.param(R + 1, (str(R + 1),), id="R+1"),
    pytest.param(-1, ("-1",), id="minus1"),
    pytest.param("3", ("'3'",), id="str"),
    pytest.param(None, ("None",), id="None"),
]


@pytest.mark.parametrize(("bad", "tokens"), BAD_NUM_REQS)
def test_bad_num_reqs_publishes_nothing(case, bad, tokens):
    table, device = case
    assert_refused(table, device, lambda: table.commit(bad), ValueError, tokens, "commit")
    assert_next_commit_works(table, device)


def test_numpy_num_reqs_is_accepted(case):
    table, device = case
    table.commit(np.uint8(R))
    for g in range(len(PAGE_SIZES)):
        np.testing.assert_array_equal(device(table, g), table[g].get_cpu_tensor())


# ---------------------------------------------------------------------------- slot mapping

BAD_TOKEN_LISTS = [
    pytest.param(lambda: _masked([0, -7], [0, 1]), ("masked",), id="masked-minus7"),
    pytest.param(lambda: _masked([0, HUGE], [0, 1]), ("masked",), id="masked-2**40+7"),
    pytest.param(lambda: [0, True], ("True",), id="bool-in-list"),
    pytest.param(lambda: [0, np.ma.masked], ("masked",), id="masked-constant-in-list"),
    pytest.param(lambda: [0, 2**64], (str(2**64),), id="int-2**64"),
    pytest.param(lambda: [0, np.uint64(U64_MAX)], (str(U64_MAX),), id="np-uint64-max"),
    pytest.param(lambda: np.array([0, U64_MAX], np.uint64), (str(U64_MAX),), id="uint64-max"),
    pytest.param(lambda: np.array([0, 1], dtype=object), ("object",), id="object"),
    pytest.param(lambda: np.array(0), ("0-d",), id="0d-array"),
    pytest.param(lambda: (i for i in [0, 1]), ("generator",), id="generator"),
    pytest.param(lambda: {0, 1}, ("set",), id="set"),
    pytest.param(lambda: "01", ("str",), id="str"),
]


@pytest.mark.parametrize(("bad", "tokens"), BAD_TOKEN_LISTS)
def test_bad_slot_mapping_inputs_are_refused(case, bad, tokens):
    table, _ = case
    for what, call in (
        ("req_indices", lambda: table.compute_slot_mapping(0, bad(), [0, 1])),
        ("positions", lambda: table.compute_slot_mapping(0, [0, 0], bad())),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert any(tok in str(info.value) for tok in tokens), (what, str(info.value))


def test_slot_mapping_converts_unusual_inputs_exactly(case):
    table, _ = case  # row 0 holds pages [1, 2, 3, 8] in group 0 (16 tokens each)
    expected = table.compute_slot_mapping(0, [0, 0, 0], [0, 17, 40])
    assert expected[:3].tolist() == [16, 2 * 16 + 1, 3 * 16 + 8]
    for rows, pos in (
        (np.array([0, 0, 0], np.uint64), np.array([0, 99, 17, 99, 40], np.uint64)[::2]),
        ((np.int8(0), np.uint16(0), 0), np.array([40, 17, 0], ">i8")[::-1]),
        ([0, 0, 0], array.array("q", [0, 17, 40])),
    ):
        np.testing.assert_array_equal(table.compute_slot_mapping(0, rows, pos), expected)


# ---------------------------------------------------------------------------- after close


def test_row_ops_after_close_raise_and_leave_the_mirror():
    table = sp.ShardedPageTable(R, MAX_LEN, TOKENS, PAGE_SIZES, num_shards=2)
    prime(table)
    table.close()
    before = [(table[g].get_cpu_tensor().copy(), table[g].num_pages_per_row.copy()) for g in (0, 1)]
    for what, call in (
        ("append_row", lambda: table.append_row([[30], [31]], 5)),
        ("add_row", lambda: table.add_row([[30], [31]], 5)),
        ("clear_row", lambda: table.clear_row(0)),
        ("move_row", lambda: table.move_row(0, 5)),
        ("swap_row", lambda: table.swap_row(0, 5)),
        ("append_rows_batch", lambda: table.append_rows_batch([[[30], [31]]], [5])),
        ("commit", lambda: table.commit(R)),
        ("commit nothing", lambda: table.commit(0)),
    ):
        with pytest.raises(RuntimeError, match="closed"):
            call()
        for g, (host, counts) in enumerate(before):
            np.testing.assert_array_equal(table[g].get_cpu_tensor(), host, err_msg=what)
            np.testing.assert_array_equal(table[g].num_pages_per_row, counts, err_msg=what)
    table.close()  # still safe


# ---------------------------------------------------------------------------- property


def _forms(draw, ids: list[int]):
    """``ids`` in one of the containers the API accepts."""
    form = draw(
        st.sampled_from(["list", "tuple", "np-ints", "i64", "u64", "i32", "strided", ">i8"])
    )
    if form == "list":
        return list(ids)
    if form == "tuple":
        return tuple(ids)
    if form == "np-ints":
        return [np.uint64(p) if p % 2 else np.int32(p) for p in ids]
    if form == "strided":
        wide = np.zeros(2 * len(ids), np.int64)
        wide[::2] = ids
        return wide[::2]
    return np.array(
        ids, dtype={"i64": np.int64, "u64": np.uint64, "i32": np.int32}.get(form, ">i8")
    )


@st.composite
def accepted_ops(draw):
    """A sequence of valid calls, each in an unusual but accepted form, and the model's
    expected rows afterwards (``model[g][row]`` is a list of page ids)."""
    model = [[[] for _ in range(R)] for _ in WIDTHS]
    ops = []
    page = st.integers(0, 2**31 - 1)
    row_st = st.integers(0, R - 1)
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["append", "add", "clear", "move", "swap", "batch"]))
        row = draw(row_st)
        row_form = draw(st.sampled_from([int, np.int64, np.uint16]))
        if kind in ("append", "add", "batch"):
            per_group = []
            for g, w in enumerate(WIDTHS):
                room = w if kind == "add" else w - len(model[g][row])
                ids = draw(st.lists(page, max_size=min(room, 3)))
                per_group.append(ids)
            args = [_forms(draw, ids) for ids in per_group]
            for g, ids in enumerate(per_group):
                model[g][row] = ids if kind == "add" else model[g][row] + ids
            if kind == "batch":
                ops.append(("append_rows_batch", [args], np.array([row])))
            else:
                ops.append((f"{kind}_row", args, row_form(row)))
        elif kind == "clear":
            for g in range(len(WIDTHS)):
                model[g][row] = []
            ops.append(("clear_row", row_form(row)))
        else:
            other = draw(row_st)
            for g in range(len(WIDTHS)):
                held = model[g]
                if kind == "move":
                    held[other] = list(held[row])
                else:
                    held[row], held[other] = held[other], held[row]
            ops.append((f"{kind}_row", row_form(row), row_form(other)))
    return ops, model, draw(st.integers(0, R))


def assert_wire_accepts_pending(table: sp.ShardedPageTable, n: int) -> None:
    """The message each shard would get for ``commit(n)`` passes the shard's strict decoder."""
    limits = WireLimits(table.layout.rows_per_shard, table.widths)
    pieces = [host.batch(n).split(table.layout.bounds) for host in table._hosts]
    for s in range(table.num_shards):
        batch = ShardBatch(table.epoch + 1, table.epoch, s, tuple(p[s] for p in pieces))
        decode(encode(batch), limits)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(program=accepted_ops())
def test_accepted_inputs_publish_exactly_and_never_make_a_shard_refuse(table_kind, program):
    table, device = table_kind
    ops, model, n = program
    table.clear()
    for op, *args in ops:
        getattr(table, op)(*args)
    for g, w in enumerate(WIDTHS):
        expected = np.zeros((R, w), np.int32)
        for row, ids in enumerate(model[g]):
            expected[row, : len(ids)] = ids
        np.testing.assert_array_equal(table[g].get_cpu_tensor(), expected)
        assert table[g].num_pages_per_row.tolist() == [len(ids) for ids in model[g]]
    if isinstance(table, sp.ShardedPageTable):
        assert_wire_accepts_pending(table, n)
    table.commit(n)
    for g in range(len(WIDTHS)):
        np.testing.assert_array_equal(device(table, g)[:n], table[g].get_cpu_tensor()[:n])


# ---------------------------------------------------------------------------- Ray backend

WORST = [
    pytest.param(lambda: _masked([3, -7], [0, 1]), id="masked-minus7"),
    pytest.param(lambda: _masked([3, HUGE], [0, 1]), id="masked-2**40+7"),
    pytest.param(lambda: np.array([3, HUGE], dtype=object), id="object-2**40+7"),
]


@pytest.fixture(scope="module")
def ray_table(local_ray):
    pytest.importorskip("ray")
    table = sp.ShardedPageTable(
        R,
        MAX_LEN,
        TOKENS,
        PAGE_SIZES,
        num_shards=2,
        backend="ray",
        ray={"devices_per_shard": 2, "timeout_s": 30},
    )
    try:
        yield table
    finally:
        table.close()


@pytest.mark.ray
@pytest.mark.multiprocess
@pytest.mark.parametrize("bad", WORST)
def test_worst_inputs_on_the_ray_backend(ray_table, bad):
    table = ray_table
    prime(table)
    for what, call in _page_id_calls(table, bad):
        tokens = ("masked", "object")
        assert_refused(table, device_snapshot, call, ValueError, tokens, what)
    assert_next_commit_works(table, device_snapshot)
    # Not stuck: every shard took the next epoch too.
    table.add_row([[40], [41]], 1)
    receipt = table.commit(R)
    assert receipt.epoch == table.epoch
