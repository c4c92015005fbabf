"""Property tests of the routing math (``ShardLayout``) and of the mesh helpers (``mesh.py``).

The layout is pure: for every valid ``(max_num_reqs, num_shards, num_blocks)`` the global row
<-> (shard, local row) maps must be inverse bijections, shards must partition rows and device
blocks into contiguous runs, and every row of a shard must lie in one of that shard's blocks.
Invalid sizes must be refused with a message that names a size that works.
"""

from __future__ import annotations

import ast
import re

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharded_pagetable.routing.layout import ShardLayout
from sharded_pagetable.routing.mesh import (
    build_mesh,
    check_ownership,
    ordered_devices,
    row_sharding,
    shard_rows_sharding,
    shard_submesh,
    shards_per_device,
)

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def layouts(draw, max_blocks: int = 64, max_rows_per_block: int = 32) -> ShardLayout:
    """Shards that own whole blocks, and (one draw in four) shards sharing blocks."""
    num_blocks = draw(st.integers(1, max_blocks))
    if draw(st.integers(0, 3)) == 0:
        num_shards = num_blocks * draw(st.integers(1, 4))  # k shards share each block
    else:
        num_shards = draw(st.sampled_from(divisors(num_blocks)))
    unit = ShardLayout.row_unit(num_shards, num_blocks)
    rows = unit * draw(st.integers(1, max(1, max_rows_per_block * num_blocks // unit)))
    return ShardLayout(rows, num_shards=num_shards, num_blocks=num_blocks)


# --------------------------------------------------------------------------- valid layouts


@SETTINGS
@given(layouts())
def test_derived_sizes(layout: ShardLayout) -> None:
    assert layout.rows_per_block * layout.num_blocks == layout.max_num_reqs
    assert layout.rows_per_shard * layout.num_shards == layout.max_num_reqs
    if layout.shards_per_block == 1:  # every shard owns whole blocks
        assert layout.blocks_per_shard * layout.num_shards == layout.num_blocks
        assert layout.rows_per_shard == layout.rows_per_block * layout.blocks_per_shard
    else:  # shards share blocks
        assert layout.blocks_per_shard == 1
        assert layout.shards_per_block * layout.num_blocks == layout.num_shards
        assert layout.rows_per_block == layout.rows_per_shard * layout.shards_per_block


@SETTINGS
@given(st.integers(1, 5000), st.integers(1, 64), st.integers(1, 4), st.booleans())
def test_fit_rounds_any_row_count_up_to_the_least_capacity(
    rows: int, num_blocks: int, k: int, share: bool
) -> None:
    num_shards = num_blocks * k if share else divisors(num_blocks)[k % len(divisors(num_blocks))]
    layout = ShardLayout.fit(rows, num_shards, num_blocks)
    unit = ShardLayout.row_unit(num_shards, num_blocks)
    assert layout.max_num_reqs % unit == 0
    assert rows <= layout.max_num_reqs < rows + unit
    assert ShardLayout.fit(layout.max_num_reqs, num_shards, num_blocks) == layout


@SETTINGS
@given(layouts())
def test_locate_global_row_round_trip(layout: ShardLayout) -> None:
    seen = set()
    for row in range(layout.max_num_reqs):
        shard, local = layout.locate(row)
        assert 0 <= shard < layout.num_shards
        assert 0 <= local < layout.rows_per_shard
        assert layout.shard_of(row) == shard
        assert layout.global_row(shard, local) == row
        seen.add((shard, local))
    # locate is a bijection onto every (shard, local row) pair
    assert len(seen) == layout.num_shards * layout.rows_per_shard
    for shard in range(layout.num_shards):
        for local in range(layout.rows_per_shard):
            assert layout.locate(layout.global_row(shard, local)) == (shard, local)


@SETTINGS
@given(layouts())
def test_shard_rows_partition_all_rows(layout: ShardLayout) -> None:
    covered: list[int] = []
    for shard in range(layout.num_shards):
        rows = layout.shard_rows(shard)
        assert len(rows) == layout.rows_per_shard
        assert rows.step == 1  # contiguous
        assert all(layout.shard_of(r) == shard for r in rows)
        covered.extend(rows)
    assert sorted(covered) == list(range(layout.max_num_reqs))
    assert len(covered) == len(set(covered))  # each row exactly once


@SETTINGS
@given(layouts())
def test_shard_blocks_partition_all_blocks(layout: ShardLayout) -> None:
    covered: list[int] = []
    for shard in range(layout.num_shards):
        blocks = layout.shard_blocks(shard)
        assert len(blocks) == layout.blocks_per_shard
        assert all(shard in layout.shards_of_block(b) for b in blocks)
        covered.extend(blocks)
    # every block is held by shards_per_block shards, exactly those that name it
    assert sorted(covered) == sorted(list(range(layout.num_blocks)) * layout.shards_per_block)
    for block in range(layout.num_blocks):
        holders = [s for s in range(layout.num_shards) if block in layout.shard_blocks(s)]
        assert holders == list(layout.shards_of_block(block))
        assert layout.shard_of_block(block) == holders[0]


@SETTINGS
@given(layouts())
def test_rows_of_a_shard_lie_in_its_blocks(layout: ShardLayout) -> None:
    for shard in range(layout.num_shards):
        blocks = layout.shard_blocks(shard)
        for row in layout.shard_rows(shard):
            block = layout.block_of(row)
            assert block in blocks
            assert shard in layout.shards_of_block(block)
            # a block holds rows_per_block consecutive rows
            assert block * layout.rows_per_block <= row < (block + 1) * layout.rows_per_block


@SETTINGS
@given(st.data())
def test_split_sorted_agrees_with_shard_of(data: st.DataObject) -> None:
    layout = data.draw(layouts())
    rows = sorted(data.draw(st.sets(st.integers(0, layout.max_num_reqs - 1))))
    arr = np.asarray(rows, dtype=np.int64)
    parts = layout.split_sorted(arr)
    assert len(parts) == layout.num_shards
    for shard, part in enumerate(parts):
        assert all(layout.shard_of(int(r)) == shard for r in part)
        assert all(int(r) in layout.shard_rows(shard) for r in part)
    joined = np.concatenate(parts) if parts else np.empty(0, np.int64)
    assert joined.tolist() == rows


def test_split_sorted_empty_and_docstring_example() -> None:
    layout = ShardLayout(1024, num_shards=4, num_blocks=8)
    assert layout.locate(300) == (1, 44)
    parts = layout.split_sorted(np.empty(0, np.int32))
    assert [p.size for p in parts] == [0, 0, 0, 0]


# --------------------------------------------------------------------------- invalid layouts


@SETTINGS
@given(st.data())
def test_num_shards_not_dividing_blocks_suggests_valid_counts(data: st.DataObject) -> None:
    num_blocks = data.draw(st.integers(2, 64))
    # neither a divisor of the blocks (own devices) nor a multiple (shards sharing devices)
    bad = [s for s in range(1, 2 * num_blocks + 2) if num_blocks % s and s % num_blocks]
    num_shards = data.draw(st.sampled_from(bad))
    rows = num_blocks * data.draw(st.integers(1, 8))
    with pytest.raises(ValueError, match="num_shards") as info:
        ShardLayout(rows, num_shards=num_shards, num_blocks=num_blocks)
    match = re.search(r"try num_shards in (\[[0-9, ]*\])", str(info.value))
    assert match, str(info.value)
    suggested = ast.literal_eval(match.group(1))
    assert suggested, "the message must name at least one working shard count"
    assert num_shards not in suggested
    assert suggested == divisors(num_blocks)
    for s in suggested:
        ShardLayout(rows, num_shards=s, num_blocks=num_blocks)  # must not raise


@SETTINGS
@given(st.data())
def test_rows_not_multiple_of_blocks_suggests_valid_size(data: st.DataObject) -> None:
    num_blocks = data.draw(st.integers(2, 64))
    num_shards = data.draw(st.sampled_from(divisors(num_blocks)))
    rows = data.draw(st.integers(1, 4096).filter(lambda r: r % num_blocks))
    with pytest.raises(ValueError, match="max_num_reqs") as info:
        ShardLayout(rows, num_shards=num_shards, num_blocks=num_blocks)
    match = re.search(r"such as (\d+)", str(info.value))
    assert match, str(info.value)
    suggested = int(match.group(1))
    assert suggested % num_blocks == 0
    assert suggested >= num_blocks
    # "nearest": no further than one block-multiple away from the requested size
    assert abs(suggested - rows) < num_blocks
    layout = ShardLayout(suggested, num_shards=num_shards, num_blocks=num_blocks)
    assert layout.max_num_reqs == suggested


@pytest.mark.parametrize("name", ["max_num_reqs", "num_shards", "num_blocks"])
@pytest.mark.parametrize("value", [0, -1, -8, True, False, 2.0, "8", None, np.int64(8)])
def test_non_positive_or_non_int_sizes_raise(name: str, value: object) -> None:
    kwargs = {"max_num_reqs": 64, "num_shards": 2, "num_blocks": 8, name: value}
    with pytest.raises(ValueError, match=name):
        ShardLayout(**kwargs)


def test_layout_is_frozen() -> None:
    layout = ShardLayout(64, num_shards=2, num_blocks=8)
    with pytest.raises(AttributeError):
        layout.num_shards = 4  # type: ignore[misc]


@SETTINGS
@given(layouts(), st.integers(1, 1000))
def test_out_of_range_rows_raise_index_error(layout: ShardLayout, off: int) -> None:
    for row in (-off, -1, layout.max_num_reqs, layout.max_num_reqs + off):
        for fn in (layout.shard_of, layout.locate, layout.block_of):
            with pytest.raises(IndexError, match="out of range"):
                fn(row)
    for shard in (-1, layout.num_shards, layout.num_shards + off):
        with pytest.raises(IndexError):
            layout.global_row(shard, 0)
        with pytest.raises(IndexError):
            layout.shard_rows(shard)
        with pytest.raises(IndexError):
            layout.shard_blocks(shard)
    for local in (-1, -off, layout.rows_per_shard, layout.rows_per_shard + off):
        with pytest.raises(IndexError):
            layout.global_row(0, local)
    for block in (-1, layout.num_blocks, layout.num_blocks + off):
        with pytest.raises(IndexError):
            layout.shard_of_block(block)


# --------------------------------------------------------------------------- mesh.py


def test_conftest_gives_eight_cpu_devices() -> None:
    assert len(jax.devices()) == 8


def test_ordered_devices_sorted_by_process_then_id() -> None:
    devs = ordered_devices(list(reversed(jax.devices())))
    keys = [(d.process_index, d.id) for d in devs]
    assert keys == sorted(keys)
    assert set(devs) == set(jax.devices())


def test_build_mesh_default_is_1d_over_all_devices() -> None:
    mesh = build_mesh(None, "data")
    assert mesh.axis_names == ("data",)
    assert dict(mesh.shape) == {"data": 8}
    assert list(mesh.devices.flat) == ordered_devices()
    other = build_mesh(None, "rows")
    assert dict(other.shape) == {"rows": 8}


def test_build_mesh_2d() -> None:
    mesh = build_mesh({"data": 4, "model": 2}, "data")
    assert mesh.axis_names == ("data", "model")
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    assert mesh.devices.shape == (4, 2)
    # first axis outermost, devices in (process, id) order
    assert list(mesh.devices.flat) == ordered_devices()
    sharding = row_sharding(mesh, "data")
    # rows split 4 ways, replicated over "model": device (i, j) holds row block i
    idx = sharding.devices_indices_map((64, 3))
    for i in range(4):
        for j in range(2):
            rows, cols = idx[mesh.devices[i, j]]
            assert rows.indices(64)[:2] == (16 * i, 16 * (i + 1))
            assert cols.indices(3) == (0, 3, 1)


@pytest.mark.parametrize(
    ("axes", "row_axis", "match"),
    [
        ({"data": 4}, "data", "need 4 devices"),
        ({"data": 4, "model": 4}, "data", "need 16 devices"),
        ({"model": 8}, "data", "not an axis"),
    ],
)
def test_build_mesh_refuses_bad_axes(axes, row_axis, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_mesh(axes, row_axis)


def test_row_sharding_refuses_unknown_axis() -> None:
    with pytest.raises(ValueError, match="not an axis"):
        row_sharding(build_mesh(None, "data"), "model")


@pytest.mark.parametrize("num_shards", [1, 2, 4, 8])
def test_check_ownership_accepts_process_ordered_1d_mesh(num_shards: int) -> None:
    mesh = build_mesh(None, "data")
    layout = ShardLayout(64, num_shards=num_shards, num_blocks=8)
    check_ownership(mesh, "data", layout, {s: 0 for s in range(num_shards)})


@pytest.mark.parametrize("row_axis", ["data", "model"])
def test_check_ownership_accepts_2d_mesh(row_axis: str) -> None:
    mesh = build_mesh({"data": 4, "model": 2}, row_axis)
    blocks = mesh.shape[row_axis]
    for num_shards in divisors(blocks):
        layout = ShardLayout(8 * blocks, num_shards=num_shards, num_blocks=blocks)
        check_ownership(mesh, row_axis, layout, {s: 0 for s in range(num_shards)})


@pytest.mark.parametrize(
    ("axes", "num_shards", "wrong_shard"),
    [(None, 4, 1), (None, 2, 1), (None, 8, 7), ({"data": 4, "model": 2}, 2, 1)],
)
def test_check_ownership_refuses_mismatched_processes(axes, num_shards, wrong_shard) -> None:
    mesh = build_mesh(axes, "data")
    blocks = mesh.shape["data"]
    layout = ShardLayout(8 * blocks, num_shards=num_shards, num_blocks=blocks)
    mapping = {s: 0 for s in range(num_shards)}
    mapping[wrong_shard] = 1  # claims a second process; every device is in process 0
    with pytest.raises(ValueError, match="mesh refused") as info:
        check_ownership(mesh, "data", layout, mapping)
    msg = str(info.value)
    first_block = layout.shard_blocks(wrong_shard).start
    assert f"row block {first_block}" in msg
    assert f"shard {wrong_shard} in process 1" in msg


@pytest.mark.parametrize(("devices", "num_shards"), [(1, 4), (2, 4), (2, 8), (4, 4), (8, 2)])
def test_shard_submesh_and_row_sharding_when_shards_share_devices(devices, num_shards) -> None:
    """A shard's devices: its own run of the row axis, or the one device it shares; where
    shards share a device, each keeps its own rows there (a RowBlock of exactly them)."""
    mesh = build_mesh(None, "data", jax.devices()[:devices])
    layout = ShardLayout.fit(30, num_shards, devices)
    shared = shards_per_device(mesh, "data", num_shards)
    assert shared == max(1, num_shards // devices) == layout.shards_per_block
    for shard in range(num_shards):
        sub = shard_submesh(mesh, "data", num_shards, shard)
        first = layout.shard_blocks(shard).start
        assert list(sub.devices.flat) == list(mesh.devices.flat)[first : first + sub.size]
        own = shard_rows_sharding(row_sharding(mesh, "data"), layout, shard)
        rows = layout.shard_rows(shard)
        blocks = own.addressable_devices_indices_map((layout.max_num_reqs, 3))
        held = {(r.indices(layout.max_num_reqs)[:2]) for r, _ in blocks.values()}
        if shared > 1:
            assert held == {(rows.start, rows.stop)} and set(blocks) == set(sub.devices.flat)
        else:
            assert own == row_sharding(mesh, "data")
    check_ownership(mesh, "data", layout, {s: 0 for s in range(num_shards)})
    with pytest.raises(ValueError, match="must divide"):
        shards_per_device(mesh, "data", 3 * devices + 1 if devices > 1 else 0)
