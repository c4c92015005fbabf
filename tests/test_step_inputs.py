"""Step inputs built on the shard devices vs an independent per-token numpy reference."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from step_reference import step_inputs_reference

from sharded_pagetable.constants import cdiv
from sharded_pagetable.routing.mesh import shard_mesh
from sharded_pagetable.shard import step_inputs as step_inputs_module
from sharded_pagetable.shard.step_inputs import build_step_inputs
from sharded_pagetable.table.schedule import check_schedule

NUM_ROWS = 32
PAGE_SIZES = (4, 8)
MAX_LEN = 64  # tokens a row may hold
TOKENS = 64  # max_num_batched_tokens over all shards


def make_mesh(axes: dict[str, int], devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(devices).reshape(tuple(axes.values())), tuple(axes))


def make_case(rng: np.random.Generator, num_shards: int, num_reqs: int, num_rows: int = NUM_ROWS):
    """Random tables and a schedule within each shard's budget: prefill chunks, decodes, idle
    rows (some with computed tokens), zeros beyond ``num_reqs``."""
    budget = TOKENS // num_shards
    rows_per_shard = num_rows // num_shards
    sched = np.zeros(num_rows, dtype=np.int32)
    done = np.zeros(num_rows, dtype=np.int32)
    for row in range(num_reqs):
        kind = rng.choice(["idle", "decode", "prefill"])
        done[row] = rng.integers(0, MAX_LEN - 8)
        if kind == "decode":
            sched[row] = 1
        elif kind == "prefill":
            sched[row] = rng.integers(1, min(MAX_LEN - done[row], budget) + 1)
    for shard in range(num_shards):  # trim to the budget, last rows first
        block = slice(shard * rows_per_shard, (shard + 1) * rows_per_shard)
        while sched[block].sum() > budget:
            sched[block][np.flatnonzero(sched[block])[-1]] -= 1
    tables, counts = [], []
    for size in PAGE_SIZES:
        width = MAX_LEN // size
        need = np.array([cdiv(int(n), size) for n in done + sched])
        count = np.minimum(need + rng.integers(0, 2, num_rows), width)
        count[num_reqs:] = 0
        table = rng.integers(1, 1000, (num_rows, width)).astype(np.int32)
        table[np.arange(width)[None, :] >= count[:, None]] = 0
        tables.append(table)
        counts.append(count.astype(np.int32))
    return tables, counts, sched[:num_reqs], done[:num_reqs]


def run_device(mesh: Mesh, tables, sched, done, num_shards: int, row_offset: int = 0):
    rows = NamedSharding(mesh, P("data"))
    device_tables = [jax.device_put(t, NamedSharding(mesh, P("data", None))) for t in tables]
    return build_step_inputs(
        device_tables,
        jax.device_put(sched, rows),
        jax.device_put(done, rows),
        mesh=mesh,
        page_sizes=PAGE_SIZES,
        num_shards=num_shards,
        tokens_per_shard=TOKENS // num_shards,
        row_offset=row_offset,
    )


def assert_same(got, want) -> None:
    for name, a, b in zip(got._fields, got, want, strict=True):
        for i, (x, y) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)):
            np.testing.assert_array_equal(np.asarray(x), y, err_msg=f"{name}[{i}]")


MESHES = [({"data": 8}, s) for s in (1, 2, 4, 8)] + [
    ({"data": 4, "model": 2}, s) for s in (1, 2, 4)
]


@pytest.mark.parametrize(("axes", "num_shards"), MESHES)
def test_matches_reference(axes: dict[str, int], num_shards: int) -> None:
    mesh = make_mesh(axes)
    rng = np.random.default_rng(num_shards * 10 + len(axes))
    for num_reqs in (NUM_ROWS, 21, 0):
        tables, counts, sched, done = make_case(rng, num_shards, num_reqs)
        s = check_schedule(
            counts, sched, done, num_reqs, PAGE_SIZES, num_shards, TOKENS // num_shards
        )
        got = run_device(mesh, tables, s.sched, s.done, num_shards)
        want = step_inputs_reference(
            tables, s.sched, s.done, PAGE_SIZES, num_shards, TOKENS // num_shards
        )
        assert_same(got, want)
    rows = NamedSharding(mesh, P("data"))
    assert got.token_rows.sharding == rows and got.kv_lens.sharding == rows
    assert all(slots.sharding == rows for slots in got.slot_mapping)
    dmesh = shard_mesh(mesh, "data", num_shards)
    assert got.cu_q_lens.sharding == NamedSharding(dmesh, P("_shard", None))
    assert got.token_rows.shape == (TOKENS,) and got.cu_q_lens.shape == (
        num_shards,
        NUM_ROWS // num_shards + 1,
    )


def test_sub_mesh_with_row_offset_gives_global_rows() -> None:
    """A shard process builds its block alone on its own devices (S=1, row_offset)."""
    num_shards, shard = 4, 2
    rng = np.random.default_rng(7)
    tables, counts, sched, done = make_case(rng, num_shards, NUM_ROWS)
    s = check_schedule(counts, sched, done, NUM_ROWS, PAGE_SIZES, num_shards, TOKENS // num_shards)
    want = step_inputs_reference(
        tables, s.sched, s.done, PAGE_SIZES, num_shards, TOKENS // num_shards
    )
    rows = slice(shard * 8, (shard + 1) * 8)
    tokens = slice(shard * 16, (shard + 1) * 16)
    sub = make_mesh({"data": 2}, jax.devices()[2 * shard : 2 * shard + 2])
    got = build_step_inputs(
        [jax.device_put(t[rows], NamedSharding(sub, P("data", None))) for t in tables],
        jax.device_put(s.sched[rows], NamedSharding(sub, P("data"))),
        jax.device_put(s.done[rows], NamedSharding(sub, P("data"))),
        mesh=sub,
        page_sizes=PAGE_SIZES,
        num_shards=1,
        tokens_per_shard=16,
        row_offset=rows.start,
    )
    np.testing.assert_array_equal(np.asarray(got.token_rows), want.token_rows[tokens])
    np.testing.assert_array_equal(np.asarray(got.positions), want.positions[tokens])
    for g in range(len(PAGE_SIZES)):
        np.testing.assert_array_equal(np.asarray(got.slot_mapping[g]), want.slot_mapping[g][tokens])
    np.testing.assert_array_equal(np.asarray(got.kv_lens), want.kv_lens[rows])
    np.testing.assert_array_equal(np.asarray(got.cu_q_lens)[0], want.cu_q_lens[shard])


def test_compiles_once_per_config() -> None:
    mesh = make_mesh({"data": 8})
    rng = np.random.default_rng(3)
    first = None
    for _ in range(3):
        tables, counts, sched, done = make_case(rng, 2, NUM_ROWS)
        s = check_schedule(counts, sched, done, NUM_ROWS, PAGE_SIZES, 2, TOKENS // 2)
        run_device(mesh, tables, s.sched, s.done, 2)
        fn = step_inputs_module._compiled(mesh, "data", PAGE_SIZES, 2, TOKENS // 2, 0)
        first = first or fn
        assert fn is first and fn._cache_size() == 1


def assert_collectives_within_shards(hlo: str, devices_per_shard: int, replicas: int) -> None:
    """Every collective of a compiled program stays inside one shard's devices (its host).

    Partition ids are positions in the mesh's device order, row axis outermost."""
    groups = re.findall(r"replica_groups=\{(\{[\d,]+\}(?:,\{[\d,]+\})*)\}", hlo)
    assert groups, "no collectives found"
    for group in re.findall(r"\{([\d,]+)\}", ",".join(groups)):
        shards = {int(i) // replicas // devices_per_shard for i in group.split(",")}
        assert len(shards) == 1, f"collective over devices {group} spans shards {shards}"


@pytest.mark.parametrize(("axes", "num_shards"), [({"data": 8}, 2), ({"data": 4, "model": 2}, 2)])
def test_collectives_stay_inside_a_shard(axes: dict[str, int], num_shards: int) -> None:
    mesh = make_mesh(axes)
    rows = NamedSharding(mesh, P("data"))
    tables = tuple(
        jax.device_put(
            np.zeros((NUM_ROWS, MAX_LEN // size), np.int32), NamedSharding(mesh, P("data", None))
        )
        for size in PAGE_SIZES
    )
    zeros = jax.device_put(np.zeros(NUM_ROWS, np.int32), rows)
    fn = step_inputs_module._compiled(mesh, "data", PAGE_SIZES, num_shards, TOKENS // num_shards, 0)
    hlo = fn.lower(tables, zeros, zeros).compile().as_text()
    assert_collectives_within_shards(
        hlo, mesh.shape["data"] // num_shards, len(mesh.devices.flat) // mesh.shape["data"]
    )


SHARED = [
    ({"data": 1}, 2),
    ({"data": 1}, 4),
    ({"data": 2}, 4),
    ({"data": 2}, 8),
    ({"data": 2, "model": 2}, 4),
]


@pytest.mark.parametrize(("axes", "num_shards"), SHARED)
def test_shards_sharing_devices_match_reference(axes: dict[str, int], num_shards: int) -> None:
    """More shards than devices on the row axis (in-process shards on a small machine): the
    same values as the reference, in the same places of the global arrays, and no
    collective at all (each shard's part is computed on its own device)."""
    size = int(np.prod(list(axes.values())))
    mesh = make_mesh(axes, jax.devices()[:size])
    rng = np.random.default_rng(num_shards * 7 + size)
    for num_reqs in (NUM_ROWS, 13, 0):
        tables, counts, sched, done = make_case(rng, num_shards, num_reqs)
        s = check_schedule(
            counts, sched, done, num_reqs, PAGE_SIZES, num_shards, TOKENS // num_shards
        )
        got = run_device(mesh, tables, s.sched, s.done, num_shards)
        want = step_inputs_reference(
            tables, s.sched, s.done, PAGE_SIZES, num_shards, TOKENS // num_shards
        )
        assert_same(got, want)
    rows = NamedSharding(mesh, P("data"))
    assert got.token_rows.sharding == rows and got.kv_lens.sharding == rows
    assert got.cu_q_lens.sharding == NamedSharding(mesh, P("data", None))
    zeros = jax.device_put(np.zeros(NUM_ROWS, np.int32), rows)
    fn = step_inputs_module._compiled(mesh, "data", PAGE_SIZES, num_shards, TOKENS // num_shards, 0)
    device_tables = tuple(jax.device_put(t, NamedSharding(mesh, P("data", None))) for t in tables)
    hlo = fn.lower(device_tables, zeros, zeros).compile().as_text()
    assert "replica_groups" not in hlo, "a shard sharing a device needs no collective"


def schedule_args(**change):
    counts = [np.array([2, 1, 0, 0]), np.array([1, 1, 0, 0])]  # pages of 4 and 8 tokens
    args = dict(
        counts=counts,
        sched=[3, 1],
        done=[4, 2],
        num_reqs=2,
        page_sizes=(4, 8),
        num_shards=2,
        tokens_per_shard=4,
    )
    args.update(change)
    return args


def test_check_schedule_widens_to_all_rows() -> None:
    s = check_schedule(**schedule_args())
    np.testing.assert_array_equal(s.sched, [3, 1, 0, 0])
    np.testing.assert_array_equal(s.done, [4, 2, 0, 0])
    assert s.sched.dtype == np.int32 and s.done.dtype == np.int32


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sched": [3, -1]}, "num_scheduled_tokens of row 1 is -1"),
        ({"done": [-2, 2]}, "num_computed_tokens of row 0 is -2"),
        ({"sched": [3]}, "num_scheduled_tokens has 1 entries, but num_reqs=2"),
        ({"done": [4, 2, 0]}, "num_computed_tokens has 3 entries, but num_reqs=2"),
        ({"sched": [3, 3]}, "row 1 needs 5 tokens .* in group 0"),
        ({"done": [6, 2]}, "row 0 needs 9 tokens .* in group 0"),
        ({"counts": [np.array([2, 1, 0, 0]), np.array([0, 1, 0, 0])]}, "row 0 .* in group 1"),
        ({"sched": [0, 0], "num_reqs": 3, "done": [0, 0, 0]}, "num_scheduled_tokens has 2"),
        ({"num_reqs": 5}, "num_reqs=5 is out of range"),
        ({"sched": [2.5, 1]}, "num_scheduled_tokens"),
        (
            {"tokens_per_shard": 3},
            r"shard 0 \(rows 0..1\) schedules 4 tokens, over its budget of 3",
        ),
    ],
)
def test_check_schedule_refuses(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_schedule(**schedule_args(**change))


def test_check_schedule_names_the_second_shard() -> None:
    counts = [np.array([0, 0, 4, 4])]
    with pytest.raises(ValueError, match=r"shard 1 \(rows 2..3\) schedules 6 tokens"):
        check_schedule(counts, [0, 0, 3, 3], [0, 0, 0, 0], 4, (4,), 2, 5)


I64_MAX, U64_MAX = 2**63 - 1, 2**64 - 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # The int64 sum of these wraps negative; it once came out as done = -1 (int32).
        ({"done": [I64_MAX, 2]}, f"num_computed_tokens of row 0 is {I64_MAX}"),
        ({"sched": [2**62, 1], "done": [2**62, 2]}, f"num_scheduled_tokens of row 0 is {2**62}"),
        ({"done": np.array([4, I64_MAX], np.int64)}, f"num_computed_tokens of row 1 is {I64_MAX}"),
        ({"done": np.array([4, I64_MAX], np.uint64)}, f"num_computed_tokens of row 1 is {I64_MAX}"),
        ({"done": [2**31, 2]}, f"num_computed_tokens of row 0 is {2**31}"),
        ({"sched": [3, 2**31]}, f"num_scheduled_tokens of row 1 is {2**31}"),
        ({"done": [2**64 + 3, 2]}, str(2**64 + 3)),
        ({"done": np.array([4, U64_MAX], np.uint64)}, str(U64_MAX)),
        ({"sched": [np.uint64(U64_MAX), 1]}, str(U64_MAX)),
        # each fits int32, the sum does not
        ({"sched": [2**31 - 1, 1], "done": [1, 2]}, "row 0 needs 2147483648 tokens"),
    ],
)
def test_check_schedule_refuses_what_int32_cannot_hold(change: dict, message: str) -> None:
    args = schedule_args(**change)
    inputs = [np.array(v, copy=True) for v in (args["sched"], args["done"])]
    with pytest.raises(ValueError, match=message):
        check_schedule(**args)
    for given, kept in zip((args["sched"], args["done"]), inputs, strict=True):
        np.testing.assert_array_equal(np.asarray(given), kept)  # the caller's values untouched


def test_check_schedule_accepts_int32_max() -> None:
    counts = [np.array([2**31 // 4, 0, 0, 0])]
    s = check_schedule(counts, [0], [2**31 - 1], 1, (4,), 2, 4)
    assert s.done.tolist() == [2**31 - 1, 0, 0, 0] and s.done.dtype == np.int32
