"""Assertions shared by the page-table tests (single-process and sharded).

Every helper reaches the device table through a ``device`` argument, a function
``device(table, group) -> np.ndarray``. The default reads ``t[g].get_device_tensor()``; a
``ShardedPageTable`` test passes ``lambda t, g: t.device_snapshot(g)`` instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

import sharded_pagetable as sp

PAD = 0  # PAGE_TABLE_PADDING_VAL

DeviceFn = Callable[[object, int], np.ndarray]


def group_tables(table) -> list:
    """The per-group tables: ``[table]`` for a ``PageTable``, ``[t[0], t[1], ...]`` otherwise."""
    if isinstance(table, sp.PageTable):
        return [table]
    return [table[g] for g in range(len(table))]


def default_device(table, group: int) -> np.ndarray:
    """A numpy copy of the group's device table (``get_device_tensor()``)."""
    # Copy right away: the device buffer may be donated by the next commit.
    return np.array(group_tables(table)[group].get_device_tensor(), copy=True)


def device_snapshot(table, group: int) -> np.ndarray:
    """For a ``ShardedPageTable`` (any backend)."""
    return np.array(table.device_snapshot(group), copy=True)


class TableDriver:
    """Calls a table with the multi-group argument shapes the model uses.

    ``page_ids`` is always ``[group][pages]``; for a single ``PageTable`` the one group's list is
    unwrapped. ``append_rows_batch`` does not exist on a single ``PageTable``.
    """

    def __init__(self, table) -> None:
        self.table = table
        self.single = isinstance(table, sp.PageTable)

    def call(self, op: str, *args):
        if self.single and op in ("append_row", "add_row"):
            page_ids, row = args
            return getattr(self.table, op)(page_ids[0], row)
        if self.single and op == "append_rows_batch":
            raise AssertionError("a single PageTable has no append_rows_batch")
        return getattr(self.table, op)(*args)


# --------------------------------------------------------------------------- assertions


def _row_diff(actual: np.ndarray, expected: np.ndarray, limit: int = 6) -> str:
    if actual.shape != expected.shape:
        return f"shape {actual.shape} != expected {expected.shape}"
    if actual.ndim == 1:
        bad = np.nonzero(actual != expected)[0]
        return "; ".join(f"[{i}]: got {actual[i]} want {expected[i]}" for i in bad[:limit].tolist())
    bad_rows = np.nonzero((actual != expected).any(axis=1))[0]
    lines = [
        f"row {r}: got {actual[r].tolist()} want {expected[r].tolist()}"
        for r in bad_rows[:limit].tolist()
    ]
    if len(bad_rows) > limit:
        lines.append(f"... {len(bad_rows) - limit} more rows differ")
    return "\n".join(lines)


def assert_tail_padded(table_np: np.ndarray, counts_np: np.ndarray, *, what: str = "table"):
    """0 <= count <= P for every row, and every entry at or past the count is PAD."""
    table_np = np.asarray(table_np)
    counts_np = np.asarray(counts_np)
    assert table_np.ndim == 2, f"{what}: expected a 2-D table, got shape {table_np.shape}"
    num_rows, width = table_np.shape
    assert counts_np.shape == (num_rows,), (
        f"{what}: counts shape {counts_np.shape} does not match {num_rows} rows"
    )
    for r in range(num_rows):
        c = int(counts_np[r])
        assert 0 <= c <= width, f"{what}: row {r} count {c} outside [0, {width}]"
        tail = table_np[r, c:]
        assert (tail == PAD).all(), (
            f"{what}: row {r} has stale ids past its count {c}: {table_np[r].tolist()}"
        )


def _check_array(actual, expected: np.ndarray, what: str) -> None:
    assert isinstance(actual, np.ndarray), f"{what}: expected np.ndarray, got {type(actual)}"
    assert actual.dtype == np.int32, f"{what}: dtype {actual.dtype}, expected int32"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if not np.array_equal(actual, expected):
        raise AssertionError(f"{what} differs from the model:\n{_row_diff(actual, expected)}")


def assert_matches_model(
    table,
    model,
    *,
    device: DeviceFn = default_device,
    check_device: bool = True,
    what: str = "",
) -> None:
    """Host table, counts and (optionally) the device table of every group equal the model's."""
    groups = group_tables(table)
    assert len(groups) == model.num_groups, f"{len(groups)} groups, model has {model.num_groups}"
    for g, pt in enumerate(groups):
        prefix = f"{what} group {g}".strip()
        cpu = pt.get_cpu_tensor()
        counts = pt.num_pages_per_row
        _check_array(np.asarray(counts), model.counts_array(g), f"{prefix} num_pages_per_row")
        _check_array(cpu, model.host_array(g), f"{prefix} host table")
        assert_tail_padded(cpu, counts, what=f"{prefix} host table")
        if check_device:
            dev = device(table, g)
            _check_array(dev, model.device_array(g), f"{prefix} device table")
            assert_tail_padded(dev, model.device_counts_array(g), what=f"{prefix} device table")


def snapshot_state(table, *, device: DeviceFn = default_device) -> list[dict]:
    """Bytes, shape and dtype of host table, counts and device table, per group."""
    out = []
    for g, pt in enumerate(group_tables(table)):
        cpu = np.asarray(pt.get_cpu_tensor())
        counts = np.asarray(pt.num_pages_per_row)
        dev = np.asarray(device(table, g))
        out.append(
            {
                name: (arr.shape, arr.dtype.str, arr.tobytes())
                for name, arr in (("host", cpu), ("counts", counts), ("device", dev))
            }
        )
    return out


def assert_state_unchanged(before: list[dict], after: list[dict], *, what: str = "") -> None:
    """Byte-identical host tables, counts and device tables."""
    assert len(before) == len(after), f"{what}: number of groups changed"
    for g, (b, a) in enumerate(zip(before, after, strict=True)):
        for name in ("host", "counts", "device"):
            if b[name] != a[name]:
                shape, dtype, _ = b[name]
                old = np.frombuffer(b[name][2], dtype=dtype).reshape(shape)
                new = np.frombuffer(a[name][2], dtype=a[name][1]).reshape(a[name][0])
                raise AssertionError(
                    f"{what}: group {g} {name} changed by a rejected call:\n"
                    f"{_row_diff(new, old) if new.shape == old.shape else (old.shape, new.shape)}"
                )
