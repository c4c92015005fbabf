"""Random operation sequences run against a table under test and a reference table.

Both tables get the same calls; a call must fail on both or on neither, and after every
call the host tables and counts must agree. After every commit the committed device tables
must agree too. Used for every backend and shard count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sharded_pagetable import PAGE_TABLE_PADDING_VAL

Op = tuple[str, tuple[Any, ...]]


def random_ops(seed: int, num_rows: int, widths: tuple[int, ...], n: int) -> list[Op]:
    """``n`` calls mixing every row operation, commits with random ``num_reqs``, clears, and
    bad calls (bad rows, page ids, group counts, batch lengths, overflows, ``num_reqs``)."""
    rng = np.random.default_rng(seed)
    groups = len(widths)

    def row() -> int:
        return int(rng.integers(0, num_rows))

    def ids(max_len: int) -> list[int]:
        return [int(x) for x in rng.integers(0, 5000, int(rng.integers(0, max_len + 1)))]

    ops: list[Op] = []
    for _ in range(n):
        kind = rng.choice(
            ["append", "add", "clear_row", "move", "swap", "batch", "commit", "bad", "clear"],
            p=[0.24, 0.12, 0.07, 0.12, 0.12, 0.08, 0.17, 0.07, 0.01],
        )
        if kind == "append":
            ops.append(("append_row", ([ids(3) for _ in range(groups)], row())))
        elif kind == "add":
            ops.append(("add_row", ([ids(min(w, 6)) for w in widths], row())))
        elif kind == "clear_row":
            ops.append(("clear_row", (row(),)))
        elif kind == "move":
            ops.append(("move_row", (row(), row())))
        elif kind == "swap":
            ops.append(("swap_row", (row(), row())))
        elif kind == "batch":
            k = int(rng.integers(0, 5))
            ops.append(
                (
                    "append_rows_batch",
                    (
                        [[ids(2) for _ in range(groups)] for _ in range(k)],
                        [row() for _ in range(k)],
                    ),
                )
            )
        elif kind == "commit":
            ops.append(("commit", (int(rng.integers(0, num_rows + 1)),)))
        elif kind == "clear":
            ops.append(("clear", ()))
        else:
            bad = [
                ("append_row", ([[1]] * groups, -1)),
                ("append_row", ([[1]] * groups, num_rows)),
                ("append_row", ([[1.0]] + [[1]] * (groups - 1), row())),
                ("append_row", ([[-3]] * groups, row())),
                ("append_row", ([[2**31]] * groups, row())),
                ("append_row", ([[1]] * (groups + 1), row())),
                ("add_row", ([list(range(w + 1)) for w in widths], row())),
                ("move_row", (row(), -2)),
                ("swap_row", (num_rows + 3, row())),
                ("clear_row", (True,)),
                ("append_rows_batch", ([[[1]] * groups], [row(), row()])),
                ("commit", (num_rows + 1,)),
                ("commit", (-1,)),
            ]
            ops.append(bad[int(rng.integers(0, len(bad)))])
    ops.append(("commit", (num_rows,)))
    return ops


def fill_to_overflow(widths: tuple[int, ...], row: int) -> list[Op]:
    """Calls that fill ``row`` of group 0 and then overflow it."""
    return [
        ("add_row", ([list(range(w)) for w in widths], row)),
        ("append_row", ([[7]] * len(widths), row)),
    ]


def reference_device(table: Any, group: int) -> np.ndarray:
    return np.asarray(table[group].get_device_tensor())


def run_differential(
    table: Any,
    reference: Any,
    ops: list[Op],
    snapshot: Callable[[Any, int], np.ndarray],
) -> int:
    """Replay ``ops`` on both tables, asserting agreement; returns the number of commits."""
    commits = 0
    for step, (name, args) in enumerate(ops):
        errors = []
        for t in (table, reference):
            try:
                getattr(t, name)(*args)
                errors.append(None)
            except (ValueError, IndexError) as exc:
                errors.append(type(exc))
        where = f"step {step}: {name}{args}"
        assert (errors[0] is None) == (errors[1] is None), f"{where}: {errors}"
        for g in range(len(reference)):
            got, want = table[g], reference[g]
            np.testing.assert_array_equal(got.num_pages_per_row, want.num_pages_per_row, where)
            np.testing.assert_array_equal(got.get_cpu_tensor(), want.get_cpu_tensor(), where)
        if name in ("commit", "clear") and errors[0] is None:
            commits += 1
            for g in range(len(reference)):
                dev = snapshot(table, g)
                np.testing.assert_array_equal(dev, reference_device(reference, g), where)
                counts = reference[g].num_pages_per_row
                past = np.arange(dev.shape[1])[None, :] >= counts[:, None]
                # Rows below num_reqs were just published: nothing past their count.
                n = args[0] if name == "commit" else dev.shape[0]
                assert np.all(dev[:n][past[:n]] == PAGE_TABLE_PADDING_VAL), where
    return commits
