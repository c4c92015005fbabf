"""Stateful property test: the page table and the reference model, driven side by side.

Every step applies one call to both. A call that the model's validator predicts to be bad must
raise that error (ValueError / IndexError / PageTableFullError) and leave host tables, counts and
the device array byte-identical. After every step the host tables and counts must equal the
model's and be tail-padded; after commits, clears and rejected calls the device array must equal
the model's published table (and be tail-padded against the counts it was published with).

``make_machine`` takes the table factory and the device reader as arguments, so the same machine
can drive a ``ShardedPageTable`` (``device=invariants.device_snapshot``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from invariants import (
    TableDriver,
    assert_matches_model,
    assert_state_unchanged,
    default_device,
    snapshot_state,
)
from reference_model import MAX_PAGE_ID, ReferenceModel

import sharded_pagetable as sp


@dataclass(frozen=True)
class Shape:
    name: str
    max_num_reqs: int
    pages_per_row: tuple[int, ...]
    multi: bool
    max_model_len: int | None = None
    page_sizes: tuple[int, ...] | None = None
    num_pages: int | None = None
    max_num_batched_tokens: int = 512


SHAPES = {
    # 2 groups, 16 and 4 pages per row.
    "mg_16rows_2groups": Shape("mg_16rows_2groups", 16, (16, 4), True, 256, (16, 64)),
    # 3 groups, 13 / 4 / 1 pages per row (a one-page group is an edge of its own).
    "mg_8rows_3groups": Shape("mg_8rows_3groups", 8, (13, 4, 1), True, 100, (8, 32, 128)),
    # A single-group PageTable with a page pool (ids must be < num_pages).
    "pt_8rows_pool50": Shape("pt_8rows_pool50", 8, (6,), False, num_pages=50),
}


def build_table(shape: Shape):
    if shape.multi:
        return sp.MultiGroupPageTable(
            shape.max_num_reqs,
            shape.max_model_len,
            shape.max_num_batched_tokens,
            list(shape.page_sizes),
            num_pages=shape.num_pages,
        )
    return sp.PageTable(
        shape.max_num_reqs,
        shape.pages_per_row[0],
        shape.max_num_batched_tokens,
        num_pages=shape.num_pages,
    )


def build_model(shape: Shape) -> ReferenceModel:
    return ReferenceModel(shape.max_num_reqs, shape.pages_per_row, num_pages=shape.num_pages)


def check_commit_return(ret, *, must: set[int], may: set[int], num_reqs: int, num_groups: int):
    """``commit`` returns the number of rows it uploaded: 0 when nothing is dirty."""
    assert not isinstance(ret, (bool, np.bool_)), f"commit returned a bool {ret!r}"
    assert isinstance(ret, (int, np.integer)), f"commit returned {type(ret)}, expected int"
    ret = int(ret)
    assert 0 <= ret <= num_reqs * num_groups, f"commit({num_reqs}) returned {ret}"
    if must:
        assert ret > 0, f"commit({num_reqs}) returned 0 but rows {sorted(must)} changed"
    if not may:
        assert ret == 0, f"commit({num_reqs}) returned {ret} with nothing dirty below {num_reqs}"


# ----------------------------------------------------------------------- strategies


def _wrap_ids(values: list[int], kind: str, max_id: int):
    if kind == "list":
        return list(values)
    if kind == "tuple":
        return tuple(values)
    if kind == "np_scalars":
        return [np.int64(v) for v in values]
    if kind == "int32":
        return np.array(values, dtype=np.int32)
    if kind == "uint32":
        return np.array(values, dtype=np.uint32)
    return np.array(values, dtype=np.int64)


CONTAINER_KINDS = ["list", "list", "list", "tuple", "np_scalars", "int32", "int64", "uint32"]


def page_id_strategy(max_id: int):
    return st.one_of(
        st.integers(1, 40),
        st.integers(1, 40),
        st.integers(1, 40),
        st.just(0),  # valid, but equal to the padding value
        st.sampled_from([max_id, max_id - 1]),
    )


def ids_strategy(capacity: int, max_id: int):
    return st.builds(
        _wrap_ids,
        st.lists(page_id_strategy(max_id), max_size=capacity // 2 + 2),
        st.sampled_from(CONTAINER_KINDS),
        st.just(max_id),
    )


def bad_rows(num_rows: int) -> list:
    return [
        -1,
        -num_rows,
        -num_rows - 1,
        num_rows,
        num_rows + 1,
        2**40,
        -(2**40),
        True,
        False,
        np.bool_(True),
        1.0,
        2.5,
        np.float64(3.0),
        float("nan"),
        "1",
        None,
    ]


def bad_id_elements(num_pages: int | None) -> list:
    out = [
        1.0,
        2.5,
        float("nan"),
        float("inf"),
        np.float32(4.0),
        True,
        False,
        np.bool_(True),
        "3",
        None,
        -1,
        -(2**31),
        2**31,
        2**32,
        2**63,
        2**64,
        -(2**63),
        np.int64(-1),
        np.uint64(2**31),
    ]
    if num_pages is not None:
        out += [num_pages, num_pages + 1, np.int64(num_pages)]
    return out


def bad_id_containers(num_pages: int | None) -> list:
    out = [
        7,
        "12",
        None,
        3.5,
        np.float64(2.0),
        {1, 2},
        np.array([1.0, 2.0]),
        np.array([True, False]),
        np.array([1, 2**31], dtype=np.int64),
        np.array([-1, 3], dtype=np.int64),
        np.array([2**63], dtype=np.uint64),
        np.array([2**31], dtype=np.uint32),
    ]
    if num_pages is not None:
        out.append(np.array([1, num_pages], dtype=np.int32))
    return out


# ----------------------------------------------------------------------- the machine


def make_machine(
    shape: Shape,
    *,
    table_factory=build_table,
    device=default_device,
    commit_check=check_commit_return,
    check_device_every_step: bool = True,
):
    """A RuleBasedStateMachine class for ``shape``.

    ``table_factory(shape)`` builds the table under test, ``device(table, g)`` reads a group's
    device table as numpy, ``commit_check(ret, must=, may=, num_reqs=, num_groups=)`` checks the
    value ``commit`` returned.
    """
    num_rows = shape.max_num_reqs
    caps = shape.pages_per_row
    num_groups = len(caps)
    max_id = MAX_PAGE_ID if shape.num_pages is None else shape.num_pages - 1

    row_int = st.integers(0, num_rows - 1)
    row_st = st.one_of(row_int, row_int, row_int, row_int.map(np.int64), row_int.map(np.int32))
    # Rows for batches: biased to a couple of rows so duplicates are common.
    batch_row_st = st.one_of(row_st, st.integers(0, 1))
    group_ids_st = st.tuples(*[ids_strategy(c, max_id) for c in caps]).map(list)
    group_st = st.integers(0, num_groups - 1)
    write_ops = ["append_row", "add_row"] + (["append_rows_batch"] if shape.multi else [])

    class PageTableMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.table = table_factory(shape)
            self.driver = TableDriver(self.table)
            self.model = build_model(shape)

        def teardown(self) -> None:
            close = getattr(self.table, "close", None)
            if close is not None:
                close()

        # ------------------------------------------------------------- plumbing

        def _check_device(self) -> None:
            assert_matches_model(self.table, self.model, device=device, what="after step")

        def _do(self, op: str, *args) -> None:
            expected = self.model.expected_error(op, *args)
            if expected is None:
                event(f"{op}: ok")
                self.driver.call(op, *args)
                self.model.apply(op, *args)
                if check_device_every_step:
                    self._check_device()
                return
            names = (
                expected.__name__
                if isinstance(expected, type)
                else "/".join(e.__name__ for e in expected)
            )
            event(f"{op}: rejected ({names})")
            model_before = self.model.state()
            before = snapshot_state(self.table, device=device)
            with pytest.raises(expected) as excinfo:
                self.driver.call(op, *args)
            assert isinstance(excinfo.value, (ValueError, IndexError)), type(excinfo.value)
            after = snapshot_state(self.table, device=device)
            assert_state_unchanged(before, after, what=f"{op}{args!r}")
            assert self.model.state() == model_before
            self._check_device()

        # ------------------------------------------------------------- valid-looking calls
        # (capacity overflows happen naturally; _do asks the model which calls are bad)

        @rule(page_ids=group_ids_st, row=row_st)
        def append_row(self, page_ids, row):
            self._do("append_row", page_ids, row)

        @rule(page_ids=group_ids_st, row=row_st)
        def add_row(self, page_ids, row):
            self._do("add_row", page_ids, row)

        @rule(row=row_st)
        def clear_row(self, row):
            self._do("clear_row", row)

        @rule(src=row_st, tgt=row_st)
        def move_row(self, src, tgt):
            self._do("move_row", src, tgt)

        @rule(row=row_st)
        def move_row_onto_itself(self, row):
            self._do("move_row", row, row)

        @rule(a=row_st, b=row_st)
        def swap_row(self, a, b):
            self._do("swap_row", a, b)

        @rule(row=row_st)
        def swap_row_with_itself(self, row):
            self._do("swap_row", row, row)

        @rule(group=group_st, row=row_st)
        def fill_to_capacity(self, group, row):
            """Append exactly the free slots of one group: valid, the row ends up full."""
            page_ids = [[] for _ in range(num_groups)]
            free = caps[group] - self.model.count(group, row)
            page_ids[group] = [min(max_id, 100 + i) for i in range(free)]
            self._do("append_row", page_ids, row)

        if shape.multi:

            @rule(reqs=st.lists(st.tuples(group_ids_st, batch_row_st), max_size=4))
            def append_rows_batch(self, reqs):
                self._do("append_rows_batch", [p for p, _ in reqs], [r for _, r in reqs])

        @rule(num_reqs=st.one_of(st.integers(0, num_rows), st.just(num_rows)))
        def commit(self, num_reqs):
            if self.model.expected_error("commit", num_reqs) is not None:
                self._do("commit", num_reqs)
                return
            must = self.model.rows_that_must_upload(num_reqs)
            may = self.model.rows_that_may_upload(num_reqs)
            event("commit: something to upload" if must else "commit: nothing changed")
            ret = self.driver.call("commit", num_reqs)
            self.model.commit(num_reqs)
            commit_check(ret, must=must, may=may, num_reqs=num_reqs, num_groups=num_groups)
            self._check_device()

        @rule(dice=st.integers(0, 15))
        def clear(self, dice):
            if dice != 0:  # keep clear() rare
                return
            self._do("clear")

        # ------------------------------------------------------------- bad calls

        @rule(group=group_st, row=row_st, extra=st.integers(1, 3), op=st.sampled_from(write_ops))
        def overflow(self, group, row, extra, op):
            """A call that puts more pages in one group's row than it holds."""
            page_ids = [[] for _ in range(num_groups)]
            # Other groups get a small valid append so a partial write would show.
            for h in range(num_groups):
                if h != group and self.model.count(h, row) < caps[h]:
                    page_ids[h] = [min(max_id, 7)]
            if op == "add_row":
                page_ids[group] = [min(max_id, 9)] * (caps[group] + extra)
                self._do("add_row", page_ids, row)
                return
            free = caps[group] - self.model.count(group, row)
            if op == "append_row":
                page_ids[group] = [min(max_id, 9)] * (free + extra)
                self._do("append_row", page_ids, row)
                return
            # Two requests on the same row: each alone may fit, together they overflow.
            first = [[] for _ in range(num_groups)]
            first[group] = [min(max_id, 5)] * ((free + extra) // 2)
            page_ids[group] = [min(max_id, 9)] * (free + extra - len(first[group]))
            self._do("append_rows_batch", [first, page_ids], [row, row])

        @rule(
            op=st.sampled_from(
                ["append_row", "add_row", "clear_row", "move_src", "move_tgt", "swap_a", "swap_b"]
                + (["append_rows_batch"] if shape.multi else [])
            ),
            bad=st.sampled_from(bad_rows(num_rows)),
            row=row_st,
            page_ids=group_ids_st,
        )
        def bad_row(self, op, bad, row, page_ids):
            if op in ("append_row", "add_row"):
                self._do(op, page_ids, bad)
            elif op == "clear_row":
                self._do("clear_row", bad)
            elif op == "move_src":
                self._do("move_row", bad, row)
            elif op == "move_tgt":
                self._do("move_row", row, bad)
            elif op == "swap_a":
                self._do("swap_row", bad, row)
            elif op == "swap_b":
                self._do("swap_row", row, bad)
            else:
                self._do("append_rows_batch", [page_ids, [[] for _ in caps]], [row, bad])

        @rule(
            op=st.sampled_from(write_ops),
            page_ids=group_ids_st,
            row=row_st,
            group=group_st,
            position=st.integers(0, 64),
            bad=st.one_of(
                st.tuples(st.just("element"), st.sampled_from(bad_id_elements(shape.num_pages))),
                st.tuples(
                    st.just("container"), st.sampled_from(bad_id_containers(shape.num_pages))
                ),
            ),
        )
        def bad_page_ids(self, op, page_ids, row, group, position, bad):
            kind, value = bad
            page_ids = list(page_ids)
            if kind == "element":
                ids = list(page_ids[group])
                ids.insert(position % (len(ids) + 1), value)
                page_ids[group] = ids
            else:
                page_ids[group] = value
            if op == "append_rows_batch":
                self._do(op, [[[] for _ in caps], page_ids], [row, row])
            else:
                self._do(op, page_ids, row)

        if shape.multi:

            @rule(
                op=st.sampled_from(write_ops),
                page_ids=group_ids_st,
                row=row_st,
                delta=st.sampled_from([-num_groups, -1, 1, 2]),
            )
            def wrong_number_of_groups(self, op, page_ids, row, delta):
                n = num_groups + delta
                page_ids = (list(page_ids) + [[3]] * 2)[:n]
                if op == "append_rows_batch":
                    self._do(op, [[[] for _ in caps], page_ids], [row, row])
                else:
                    self._do(op, page_ids, row)

            @rule(reqs=st.lists(st.tuples(group_ids_st, row_st), max_size=3), cut=st.booleans())
            def batch_length_mismatch(self, reqs, cut):
                page_ids = [p for p, _ in reqs]
                rows = [r for _, r in reqs]
                if cut and page_ids:
                    page_ids = page_ids[:-1]
                else:
                    rows = [*rows, 0]
                self._do("append_rows_batch", page_ids, rows)

        @rule(
            n=st.sampled_from([-1, -(2**40), num_rows + 1, 2**40, 1.5, float(num_rows), "2", None])
        )
        def bad_commit(self, n):
            self._do("commit", n)

        # ------------------------------------------------------------- invariants

        @invariant()
        def host_matches_model(self):
            assert_matches_model(self.table, self.model, device=device, check_device=False)

    PageTableMachine.__name__ = f"PageTableMachine_{shape.name}"
    PageTableMachine.__qualname__ = PageTableMachine.__name__
    return PageTableMachine


# ----------------------------------------------------------------------- test cases

_EXAMPLES = max(200, int(os.environ.get("SPT_STATEFUL_EXAMPLES", "200")))

STATEFUL_SETTINGS = settings(
    max_examples=_EXAMPLES,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

TestMultiGroup16Rows2Groups = make_machine(SHAPES["mg_16rows_2groups"]).TestCase
TestMultiGroup16Rows2Groups.settings = STATEFUL_SETTINGS

TestMultiGroup8Rows3Groups = make_machine(SHAPES["mg_8rows_3groups"]).TestCase
TestMultiGroup8Rows3Groups.settings = STATEFUL_SETTINGS

TestSinglePageTable8RowsPool50 = make_machine(SHAPES["pt_8rows_pool50"]).TestCase
TestSinglePageTable8RowsPool50.settings = STATEFUL_SETTINGS
