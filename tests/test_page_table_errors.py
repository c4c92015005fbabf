"""Bad input: one test per kind of bad call in the spec, plus regressions for the seed's defects.

Every rejected call must raise the documented type, name the offending value in its message, and
leave host tables, counts and the device array byte-identical. The reference model's validator is
checked against each hand-written expectation as well, so the model used by the state machine
follows the same rules.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from invariants import (
    TableDriver,
    assert_matches_model,
    assert_state_unchanged,
    assert_tail_padded,
    default_device,
    snapshot_state,
)
from reference_model import MAX_PAGE_ID, ReferenceModel

import sharded_pagetable as sp
from sharded_pagetable.errors import PageTableFullError

R = 16
MAX_MODEL_LEN = 256
PAGE_SIZES = (16, 64)
CAPS = (16, 4)  # pages per row of each group
PT_ROWS, PT_CAP, PT_POOL = 8, 6, 1000  # single PageTable with a pool of 1000 pages


class Case:
    """A table under test, its reference model and a driver taking ``[group][pages]``."""

    def __init__(self, table, model: ReferenceModel) -> None:
        self.table = table
        self.model = model
        self.driver = TableDriver(table)
        self.single = isinstance(table, sp.PageTable)
        self.rows = model.max_num_reqs
        self.caps = model.pages_per_row

    def ok(self, op: str, *args):
        """A valid call: applied to table and model, then everything is compared."""
        assert self.model.expected_error(op, *args) is None, (op, args)
        out = self.driver.call(op, *args)
        self.model.apply(op, *args)
        assert_matches_model(self.table, self.model)
        return out

    def empty(self) -> list:
        return [[] for _ in self.caps]

    def ids(self, *per_group) -> list:
        """``[group][pages]`` with the given lists for the first groups, the rest empty.

        Lists for groups the table does not have are dropped (so one call fits both kinds).
        """
        out = self.empty()
        for g, ids in enumerate(per_group[: len(out)]):
            out[g] = ids
        return out


def _multi_case() -> Case:
    table = sp.MultiGroupPageTable(R, MAX_MODEL_LEN, 512, list(PAGE_SIZES))
    return Case(table, ReferenceModel.for_multigroup(R, MAX_MODEL_LEN, PAGE_SIZES))


def _single_case() -> Case:
    table = sp.PageTable(PT_ROWS, PT_CAP, 64, num_pages=PT_POOL)
    return Case(table, ReferenceModel.for_single(PT_ROWS, PT_CAP, num_pages=PT_POOL))


def _prime(case: Case) -> Case:
    """Published rows plus pending (uncommitted) changes, so host != device in places."""
    last = case.rows - 1
    case.ok("append_row", case.ids([11, 12, 13], [21]), 0)
    case.ok("append_row", case.ids([14], [22, 23]), 1)
    case.ok("append_row", case.ids([15, 16]), last)
    case.ok("commit", case.rows)
    case.ok("append_row", case.ids([17], [24]), 0)  # pending
    case.ok("add_row", case.ids([18, 19]), 2)  # pending
    case.ok("move_row", 1, 3)  # pending
    return case


@pytest.fixture(params=["multi", "single"])
def case(request) -> Case:
    return _prime(_multi_case() if request.param == "multi" else _single_case())


@pytest.fixture
def multi() -> Case:
    return _prime(_multi_case())


@pytest.fixture
def single() -> Case:
    return _prime(_single_case())


def _mentions(message: str, value) -> bool:
    """``message`` names ``value`` (its str or repr, not as part of a longer number)."""
    for token in {str(value), repr(value)}:
        if re.search(r"(?<![\d.])" + re.escape(token) + r"(?![\d])", message):
            return True
    return False


def assert_rejected(case: Case, op: str, *args, exc: type[Exception], names=()):
    """``op(*args)`` raises ``exc`` naming every value in ``names`` and changes nothing."""
    predicted = case.model.expected_error(op, *args)
    assert predicted is exc, f"reference model predicts {predicted} for {op}{args!r}, not {exc}"
    before = snapshot_state(case.table)
    model_before = case.model.state()
    with pytest.raises(exc) as excinfo:
        case.driver.call(op, *args)
    assert_state_unchanged(before, snapshot_state(case.table), what=f"{op}{args!r}")
    assert case.model.state() == model_before
    assert_matches_model(case.table, case.model)
    message = str(excinfo.value)
    for value in names:
        assert _mentions(message, value), f"message {message!r} does not name {value!r}"
    return excinfo.value


# --------------------------------------------------------------------------- row indices


def _row_calls(case: Case, bad) -> list[tuple]:
    """Every way a bad row index reaches the table."""
    calls = [
        ("append_row", case.ids([5], [6]), bad),
        ("add_row", case.ids([5]), bad),
        ("clear_row", bad),
        ("move_row", bad, 0),
        ("move_row", 0, bad),
        ("swap_row", bad, 0),
        ("swap_row", 0, bad),
        ("append_row", case.empty(), bad),  # an empty append still checks the row
    ]
    if not case.single:
        calls.append(("append_rows_batch", [case.ids([5]), case.ids([6])], [0, bad]))
    return calls


@pytest.mark.parametrize("bad", [True, False, np.bool_(True)], ids=repr)
def test_bool_row_is_value_error(case, bad):
    for op, *args in _row_calls(case, bad):
        assert_rejected(case, op, *args, exc=ValueError, names=[bad])


@pytest.mark.parametrize("bad", [1.0, 2.5, np.float64(3.0), "1", None], ids=repr)
def test_non_integer_row_is_value_error(case, bad):
    for op, *args in _row_calls(case, bad):
        assert_rejected(case, op, *args, exc=ValueError, names=[bad])


@pytest.mark.parametrize("offset", [1, 2, 0], ids=["-1", "-2", "-R"])
def test_negative_row_is_index_error(case, offset):
    bad = -offset if offset else -case.rows
    for op, *args in _row_calls(case, bad):
        assert_rejected(case, op, *args, exc=IndexError, names=[bad])
    for op, *args in _row_calls(case, np.int64(bad)):
        assert_rejected(case, op, *args, exc=IndexError, names=[bad])


@pytest.mark.parametrize("past", [0, 1, 2**40], ids=["R", "R+1", "2**40"])
def test_row_past_the_end_is_index_error(case, past):
    bad = case.rows + past
    for op, *args in _row_calls(case, bad):
        assert_rejected(case, op, *args, exc=IndexError, names=[bad])


def test_numpy_integer_rows_are_accepted(case):
    for kind in (np.int64, np.int32, np.uint8, np.intp):
        row = kind(4)
        case.ok("append_row", case.ids([31], [32]), row)
        case.ok("move_row", row, kind(5))
        case.ok("swap_row", kind(5), kind(6))
        case.ok("clear_row", row)
        case.ok("commit", case.rows)


# --------------------------------------------------------------------------- page ids


def _id_calls(case: Case, group_ids, group: int = 0) -> list[tuple]:
    """Every way a bad list of page ids (for ``group``) reaches the table."""
    page_ids = case.empty()
    page_ids[group] = group_ids
    calls = [("append_row", page_ids, 5), ("add_row", page_ids, 0)]
    if not case.single:
        calls.append(("append_rows_batch", [case.ids([7]), page_ids], [5, 6]))
    return calls


def _groups(case: Case) -> list[int]:
    return list(range(len(case.caps)))


@pytest.mark.parametrize("bad", [1.0, 2.5, float("nan"), np.float64(2.0)], ids=repr)
def test_float_page_id_is_value_error(case, bad):
    for g in _groups(case):
        for op, *args in _id_calls(case, [3, bad], g):
            assert_rejected(case, op, *args, exc=ValueError, names=[bad])


@pytest.mark.parametrize("bad", [True, False, np.bool_(True)], ids=repr)
def test_bool_page_id_is_value_error(case, bad):
    for g in _groups(case):
        for op, *args in _id_calls(case, [bad, 3], g):
            assert_rejected(case, op, *args, exc=ValueError, names=[bad])


@pytest.mark.parametrize("bad", ["3", "x", None], ids=repr)
def test_non_numeric_page_id_is_value_error(case, bad):
    for g in _groups(case):
        for op, *args in _id_calls(case, [3, bad], g):
            assert_rejected(case, op, *args, exc=ValueError, names=[bad])


@pytest.mark.parametrize("bad", [-1, -(2**31), -(2**63), np.int64(-7)], ids=repr)
def test_negative_page_id_is_value_error(case, bad):
    for g in _groups(case):
        for op, *args in _id_calls(case, [3, bad], g):
            assert_rejected(case, op, *args, exc=ValueError, names=[int(bad)])


@pytest.mark.parametrize("bad", [2**31, 2**32, 2**63, 2**64, np.uint64(2**31)], ids=repr)
def test_page_id_above_max_is_value_error(multi, bad):
    for g in _groups(multi):
        for op, *args in _id_calls(multi, [3, bad], g):
            assert_rejected(multi, op, *args, exc=ValueError, names=[int(bad)])


def test_page_id_at_max_is_accepted(multi):
    multi.ok("append_row", multi.ids([MAX_PAGE_ID], [MAX_PAGE_ID - 1]), 7)
    multi.ok("add_row", multi.ids(np.array([MAX_PAGE_ID], dtype=np.int64)), 8)
    multi.ok("commit", R)


@pytest.mark.parametrize("bad", [PT_POOL, PT_POOL + 1, np.int64(PT_POOL)], ids=repr)
def test_page_id_not_below_num_pages_is_value_error(single, bad):
    for op, *args in _id_calls(single, [3, bad]):
        assert_rejected(single, op, *args, exc=ValueError, names=[int(bad)])
    single.ok("append_row", single.ids([PT_POOL - 1]), 5)


@pytest.mark.parametrize("bad", [7, "12", None, 3.5, {1, 2}], ids=repr)
def test_page_ids_not_a_list_is_value_error(case, bad):
    for g in _groups(case):
        for op, *args in _id_calls(case, bad, g):
            err = assert_rejected(case, op, *args, exc=ValueError)
            # Naming the value or its type is enough here.
            assert _mentions(str(err), bad) or type(bad).__name__ in str(err), str(err)


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        (np.array([1.0, 2.5]), ("2.5", "float")),
        (np.array([True, False]), ("True", "bool")),
        (np.array([1, 2**31], dtype=np.int64), (str(2**31),)),
        (np.array([-1, 3], dtype=np.int64), ("-1",)),
        (np.array([2**63], dtype=np.uint64), (str(2**63),)),
        (np.array([2**31], dtype=np.uint32), (str(2**31),)),
    ],
    ids=["float64", "bool", "int64-2**31", "int64-neg", "uint64-2**63", "uint32-2**31"],
)
def test_bad_numpy_page_ids_are_value_error(case, bad, named):
    for g in _groups(case):
        for op, *args in _id_calls(case, bad, g):
            err = assert_rejected(case, op, *args, exc=ValueError)
            assert any(token in str(err) for token in named), (str(err), named)


def test_numpy_integer_page_ids_are_accepted(case):
    for dtype in (np.int32, np.int64, np.uint16, np.uint32, np.int8):
        case.ok("add_row", case.ids(np.array([1, 2, 3], dtype=dtype)), 6)
    case.ok("append_row", case.ids([np.int64(4), np.int32(5)]), 6)
    case.ok("add_row", case.ids((8, 9)), 7)
    case.ok("append_row", case.ids(np.array([], dtype=np.int64)), 7)
    case.ok("commit", case.rows)


# --------------------------------------------------------------------------- capacity


def test_append_past_capacity_is_page_table_full(case):
    cap = case.caps[-1]
    g = len(case.caps) - 1
    case.ok("add_row", case.ids(*([[1]] * g), [2] * (cap - 1)), 6)
    err = assert_rejected(
        case, "append_row", case.ids(*([[]] * g), [3, 4]), 6, exc=PageTableFullError
    )
    assert isinstance(err, ValueError)
    assert any(_mentions(str(err), v) for v in (6, cap, cap + 1)), str(err)
    assert_rejected(
        case, "add_row", case.ids(*([[]] * g), [5] * (cap + 1)), 6, exc=PageTableFullError
    )
    # Exactly full is fine.
    case.ok("append_row", case.ids(*([[]] * g), [3]), 6)
    assert_rejected(case, "append_row", case.ids(*([[]] * g), [4]), 6, exc=PageTableFullError)


def test_overflow_in_one_group_changes_no_group(multi):
    multi.ok("add_row", multi.ids([1], [2, 2, 2]), 9)
    # Group 0 would fit, group 1 overflows: nothing may be written anywhere.
    assert_rejected(multi, "append_row", multi.ids([7, 7], [8, 8]), 9, exc=PageTableFullError)
    assert_rejected(multi, "add_row", multi.ids([7], [8] * 5), 9, exc=PageTableFullError)


def test_batch_capacity_is_cumulative_over_duplicate_rows(multi):
    multi.ok("add_row", multi.ids([1], [2, 2]), 9)
    # Each request fits on its own; together they put 5 pages in group 1 of row 9.
    reqs = [multi.ids([3], [4]), multi.ids([5], [6, 6])]
    assert_rejected(multi, "append_rows_batch", reqs, [9, 9], exc=PageTableFullError)
    # An earlier request in the batch is not applied either.
    reqs = [multi.ids([3], [4]), multi.ids([5]), multi.ids([], [6, 6, 6])]
    assert_rejected(multi, "append_rows_batch", reqs, [10, 9, 9], exc=PageTableFullError)
    # Duplicates that fit accumulate in order.
    multi.ok("append_rows_batch", [multi.ids([3], [4]), multi.ids([5], [6])], [9, 9])
    assert multi.table[1].get_cpu_tensor()[9].tolist() == [2, 2, 4, 6]
    assert multi.table[0].get_cpu_tensor()[9, :3].tolist() == [1, 3, 5]


# --------------------------------------------------------------------------- groups / batches


@pytest.mark.parametrize("num_groups", [0, 1, 3])
def test_wrong_number_of_groups_is_value_error(multi, num_groups):
    page_ids = [[1], [2], [3]][:num_groups]
    assert_rejected(multi, "append_row", page_ids, 5, exc=ValueError, names=[num_groups])
    assert_rejected(multi, "add_row", page_ids, 5, exc=ValueError, names=[num_groups])
    assert_rejected(multi, "append_rows_batch", [multi.ids([1]), page_ids], [4, 5], exc=ValueError)


@pytest.mark.parametrize(
    ("num_lists", "num_rows"), [(2, 1), (1, 3), (0, 1), (1, 0)], ids=["2v1", "1v3", "0v1", "1v0"]
)
def test_batch_length_mismatch_is_value_error(multi, num_lists, num_rows):
    page_ids = [multi.ids([40 + i], [50 + i]) for i in range(num_lists)]
    rows = list(range(4, 4 + num_rows))
    err = assert_rejected(multi, "append_rows_batch", page_ids, rows, exc=ValueError)
    assert _mentions(str(err), num_lists) or _mentions(str(err), num_rows), str(err)


def test_empty_batch_is_a_no_op(multi):
    multi.ok("append_rows_batch", [], [])
    assert multi.ok("commit", R) > 0  # the primed pending rows
    multi.ok("append_rows_batch", [], [])
    assert multi.ok("commit", R) == 0


# --------------------------------------------------------------------------- commit


@pytest.mark.parametrize("bad", [-1, "R+1", 2**40, 1.5, "R.0", "2", None], ids=repr)
def test_commit_num_reqs_out_of_range_or_not_int_is_value_error(case, bad):
    bad = {"R+1": case.rows + 1, "R.0": float(case.rows)}.get(bad, bad)
    assert_rejected(case, "commit", bad, exc=ValueError, names=[bad])


def test_commit_bounds_are_inclusive(case):
    assert case.ok("commit", 0) == 0
    assert case.ok("commit", case.rows) > 0


# --------------------------------------------------------------------------- seed defects


def test_a_overflowing_append_leaves_count_unchanged(case):
    """The seed bumps the count before writing, so an overflow corrupted it."""
    g = len(case.caps) - 1
    cap = case.caps[g]
    case.ok("add_row", case.ids(*([[]] * g), list(range(1, cap))), 4)
    pt = case.table if case.single else case.table[g]
    assert int(pt.num_pages_per_row[4]) == cap - 1
    assert_rejected(case, "append_row", case.ids(*([[]] * g), [90, 91]), 4, exc=PageTableFullError)
    assert int(pt.num_pages_per_row[4]) == cap - 1
    assert pt.get_cpu_tensor()[4].tolist() == [*range(1, cap), 0]


def test_b_row_minus_one_raises_instead_of_writing_the_last_row(case):
    last = case.rows - 1
    pts = [case.table] if case.single else [case.table[g] for g in range(len(case.caps))]
    last_rows = [pt.get_cpu_tensor()[last].copy() for pt in pts]
    assert_rejected(case, "append_row", case.ids([99], [99]), -1, exc=IndexError)
    assert_rejected(case, "add_row", case.ids([99]), -1, exc=IndexError)
    assert_rejected(case, "clear_row", -1, exc=IndexError)
    assert_rejected(case, "move_row", 0, -1, exc=IndexError)
    assert_rejected(case, "swap_row", -1, 0, exc=IndexError)
    for pt, row in zip(pts, last_rows, strict=True):
        assert pt.get_cpu_tensor()[last].tolist() == row.tolist()
    assert [int(v) for v in pts[0].get_cpu_tensor()[last, :2]] == [15, 16]


def _host_and_device(case: Case, g: int):
    pt = case.table if case.single else case.table[g]
    return pt.get_cpu_tensor(), pt.num_pages_per_row, default_device(case.table, g)


def _assert_no_stale_ids(case: Case, rows):
    for g in range(len(case.caps)):
        host, counts, device = _host_and_device(case, g)
        assert_tail_padded(host, counts, what=f"host group {g}")
        assert_tail_padded(device, counts, what=f"device group {g}")  # right after commit(R)
        for r in rows:
            assert host[r, counts[r] :].tolist() == [0] * (host.shape[1] - counts[r])


def test_c_add_row_of_a_shorter_row_leaves_no_stale_ids(case):
    """vLLM #39589 / EasyDeL #254: replaced rows kept old ids past the new count."""
    long_ids = case.ids([61, 62, 63, 64], [71, 72, 73])
    case.ok("add_row", long_ids, 5)
    case.ok("commit", case.rows)  # the long row is on the device
    case.ok("add_row", case.ids([65], [74]), 5)
    case.ok("commit", case.rows)
    _assert_no_stale_ids(case, [5])
    case.ok("add_row", case.empty(), 5)
    case.ok("commit", case.rows)
    _assert_no_stale_ids(case, [5])


def test_c_move_row_of_a_shorter_row_onto_a_longer_one_leaves_no_stale_ids(case):
    case.ok("add_row", case.ids([61, 62, 63, 64], [71, 72, 73]), 5)
    case.ok("add_row", case.ids([81], [91]), 6)
    case.ok("add_row", case.ids([82, 83, 84, 85, 86], [92, 93, 94]), 7)
    case.ok("commit", case.rows)
    case.ok("move_row", 6, 5)  # short onto long
    case.ok("swap_row", 6, 7)  # long and short exchange
    case.ok("move_row", 4, 7)  # an empty row onto a full one
    case.ok("commit", case.rows)
    _assert_no_stale_ids(case, [5, 6, 7])
    host, counts, _ = _host_and_device(case, 0)
    assert host[5].tolist()[:2] == [81, 0] and counts[5] == 1
    assert host[6].tolist()[:6] == [82, 83, 84, 85, 86, 0] and counts[6] == 5
    assert counts[7] == 0 and not host[7].any()


def test_d_page_id_2_pow_31_raises_and_leaves_the_count(multi):
    multi.ok("add_row", multi.ids([1, 2]), 4)
    for bad in (2**31, np.int64(2**31), np.array([2**31], dtype=np.int64)):
        page_ids = multi.ids([3, bad] if not isinstance(bad, np.ndarray) else bad)
        assert_rejected(multi, "append_row", page_ids, 4, exc=ValueError)
        assert int(multi.table[0].num_pages_per_row[4]) == 2
    multi.ok("append_row", multi.ids([2**31 - 1]), 4)
    assert int(multi.table[0].num_pages_per_row[4]) == 3


def test_e_float_page_ids_raise(case):
    for bad in ([1.0], [2, 1.5], (3.0,), np.array([1.0]), [np.float32(2.0)]):
        for op, *args in _id_calls(case, bad):
            assert_rejected(case, op, *args, exc=ValueError)


def test_f_commit_with_nothing_dirty_returns_zero_and_keeps_the_device(case):
    fresh = _single_case() if case.single else _multi_case()
    assert fresh.table.commit(fresh.rows) == 0  # a new table has nothing pending
    assert_matches_model(fresh.table, fresh.model)

    assert case.ok("commit", case.rows) > 0  # the primed pending rows go out
    before = snapshot_state(case.table)
    assert case.ok("commit", case.rows) == 0
    assert case.ok("commit", 3) == 0
    assert case.ok("commit", 0) == 0
    assert_state_unchanged(before, snapshot_state(case.table), what="empty commit")

    # Dirty rows only at or past num_reqs: still nothing to send below num_reqs.
    case.ok("append_row", case.ids([44]), 6)
    before = snapshot_state(case.table)
    assert case.ok("commit", 6) == 0
    assert_state_unchanged(before, snapshot_state(case.table), what="commit below dirty rows")
    uploaded = case.ok("commit", 7)  # row 6 changed (in group 0 only)
    assert uploaded == 1 if case.single else 1 <= uploaded <= len(case.caps)


def test_g_partial_commit_keeps_rows_at_or_past_n_and_publishes_them_later(case):
    case.ok("commit", case.rows)
    old = [default_device(case.table, g).copy() for g in range(len(case.caps))]
    for r in (1, 2, 5, case.rows - 1):
        case.ok("append_row", case.ids([100 + r], [200 + r]), r)
    case.ok("clear_row", 0)
    # commit(3): rows 0..2 published, rows 3.. keep their old device content.
    uploaded = case.ok("commit", 3)
    if case.single:
        assert uploaded == 3
    else:
        assert 3 <= uploaded <= 3 * len(case.caps)
    for g in range(len(case.caps)):
        dev = default_device(case.table, g)
        host = (case.table if case.single else case.table[g]).get_cpu_tensor()
        assert np.array_equal(dev[:3], host[:3])
        assert np.array_equal(dev[3:], old[g][3:])
        assert not np.array_equal(dev[5], host[5])  # still pending
    # A later commit that covers them publishes them.
    assert case.ok("commit", case.rows) > 0
    for g in range(len(case.caps)):
        host = (case.table if case.single else case.table[g]).get_cpu_tensor()
        assert np.array_equal(default_device(case.table, g), host)


def test_clear_zeroes_host_and_device_and_later_writes_wait_for_commit(case):
    """clear() zeroes both sides; host writes after it must not reach the device uncommitted.

    (A device buffer that aliases the host table would show them at once. Whether jax aliases
    a numpy buffer depends on its alignment, so try a few fresh tables.)
    """
    case.ok("commit", case.rows)
    case.ok("clear")
    for attempt in range(8):
        c = _prime(_single_case() if case.single else _multi_case()) if attempt else case
        c.ok("clear")
        for row in range(c.rows):
            c.ok("append_row", c.ids([row + 1], [row + 2]), row)  # ok() compares the device
        c.ok("move_row", 0, 1)
        c.ok("swap_row", 2, 3)
        assert c.ok("commit", c.rows) > 0
