"""Per-step inputs of a model step, built on the devices from the committed page table.

The row axis of the caller's mesh is split into ``S`` shards of ``D`` consecutive devices
(all in one process). Shard ``s`` owns rows ``[s*R/S, (s+1)*R/S)`` and token slots
``[s*T/S, (s+1)*T/S)`` of the global token axis (``T = S * tokens_per_shard``). With
``D > 1`` a shard's token block spans its ``D`` devices and a token's row may live on
another device of the same shard, so the build runs under ``shard_map`` over a derived mesh
whose row axis is split into ``("_shard", "_local")`` (same devices, same order): every
device all-gathers the per-row counts of its shard over ``"_local"`` only (tiny), computes
the shard's token rows and positions, looks up slots for the tokens whose row it holds and
combines them with a reduce-scatter over ``"_local"``. No table row crosses a shard, so no
table byte crosses a host.

Both meshes tile the devices the same way, so ``jit`` takes inputs on the caller's mesh and
returns outputs on it without moving data (checked in the compiled HLO: the only
collectives are the ``"_local"`` all-gather and reduce-scatter).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..constants import SLOT_MAPPING_PADDING_VAL, cdiv
from ..table.validation import check_list, int_items

SHARD_AXIS = "_shard"
LOCAL_AXIS = "_local"
ROWS = P((SHARD_AXIS, LOCAL_AXIS))  # an axis split over every device of the row axis


class StepInputs(NamedTuple):
    """What a paged-attention step reads, for ``R`` rows and ``T`` token slots.

    On the device path every field is a global ``jax.Array``: the token and row fields are
    sharded ``NamedSharding(mesh, P(row_axis))`` on the caller's mesh; ``cu_q_lens`` lives
    on ``shard_mesh(mesh, row_axis, S)`` sharded ``P("_shard", None)`` (each shard's devices
    hold their shard's offsets). ``step_inputs_reference`` returns the same fields in numpy.
    """

    token_rows: jax.Array  # i32[T] global row of each token slot, -1 at padding
    positions: jax.Array  # i32[T] position of each token in its request, 0 at padding
    slot_mapping: tuple[jax.Array, ...]  # per group i32[T], SLOT_MAPPING_PADDING_VAL at padding
    kv_lens: jax.Array  # i32[R] done + sched
    cu_q_lens: jax.Array  # i32[S, R/S + 1] offsets of a shard's rows in its own token block


class Schedule(NamedTuple):
    """A validated schedule over all ``R`` rows (zeros at and beyond ``num_reqs``)."""

    sched: np.ndarray  # i32[R] tokens scheduled this step
    done: np.ndarray  # i32[R] tokens already computed


@functools.lru_cache(maxsize=64)
def shard_mesh(mesh: Mesh, row_axis: str, num_shards: int) -> Mesh:
    """``mesh`` with ``row_axis`` split into ``("_shard" S, "_local" D)``: same devices in the
    same order, other axes kept. Shard ``s``'s devices are the ``D`` consecutive devices
    ``[s*D, (s+1)*D)`` along the row axis."""
    if row_axis not in mesh.axis_names:
        raise ValueError(f"row_axis {row_axis!r} is not an axis of mesh {dict(mesh.shape)}")
    for name in (SHARD_AXIS, LOCAL_AXIS):
        if name in mesh.axis_names:
            raise ValueError(f"mesh {dict(mesh.shape)} already has an axis named {name!r}")
    size = mesh.shape[row_axis]
    if num_shards < 1 or size % num_shards:
        raise ValueError(
            f"num_shards={num_shards} must be positive and divide the {size} devices of "
            f"row axis {row_axis!r}"
        )
    axis = mesh.axis_names.index(row_axis)
    shape = list(mesh.devices.shape)
    shape[axis : axis + 1] = [num_shards, size // num_shards]
    names = list(mesh.axis_names)
    names[axis : axis + 1] = [SHARD_AXIS, LOCAL_AXIS]
    return Mesh(mesh.devices.reshape(shape), tuple(names))


def _int_vector(values: object, what: str) -> np.ndarray:
    """``values`` (list or 1-D integer array) as a new ``i64[n]``; anything else raises."""
    values = check_list(values, what)
    if not isinstance(values, np.ndarray):
        values = np.array(int_items(list(values), what) or [], dtype=np.int64)
    if values.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {values.shape}")
    if values.size and values.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got dtype {values.dtype}")
    if values.size and values.dtype == np.uint64 and int(values.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{what} value {int(values.max())} is out of range (int64)")
    return values.astype(np.int64)


def check_schedule(
    counts: Sequence[np.ndarray],
    sched: object,
    done: object,
    num_reqs: int,
    page_sizes: Sequence[int],
    num_shards: int,
    tokens_per_shard: int,
) -> Schedule:
    """Validate a step's schedule on the host and widen it to all ``R`` rows.

    Args:
      counts: per group ``i32[R]`` pages each row holds.
      sched, done: ``int[num_reqs]`` scheduled and already computed tokens per row.
      num_reqs: rows in use; rows ``>= num_reqs`` get zeros.
      page_sizes: tokens per page, per group.
      num_shards, tokens_per_shard: ``R`` rows in ``num_shards`` equal blocks, each with a
        budget of ``tokens_per_shard`` tokens.

    Raises ``ValueError`` naming the row (negative value, pages that do not cover
    ``done + sched`` tokens in some group) or shard (budget exceeded), or the bad length.
    """
    if len(counts) != len(page_sizes) or not counts:
        raise ValueError(f"{len(counts)} groups of counts for page_sizes {list(page_sizes)}")
    num_rows = len(counts[0])
    if num_shards < 1 or num_rows % num_shards:
        raise ValueError(f"num_shards={num_shards} must be positive and divide {num_rows} rows")
    if not 0 <= num_reqs <= num_rows:
        raise ValueError(f"num_reqs={num_reqs} is out of range 0..{num_rows}")
    arrays = {"num_scheduled_tokens": sched, "num_computed_tokens": done}
    full = {}
    for what, values in arrays.items():
        arr = _int_vector(values, what)
        if arr.size != num_reqs:
            raise ValueError(f"{what} has {arr.size} entries, but num_reqs={num_reqs}")
        if arr.size and arr.min() < 0:
            row = int(np.argmin(arr))
            raise ValueError(f"{what} of row {row} is {int(arr[row])}, must be >= 0")
        full[what] = np.zeros(num_rows, dtype=np.int64)
        full[what][:num_reqs] = arr
    sched_all, done_all = full["num_scheduled_tokens"], full["num_computed_tokens"]
    need = sched_all + done_all  # i64[R] tokens each row's pages must cover
    if need.size and need.max() > np.iinfo(np.int32).max:
        row = int(np.argmax(need))
        raise ValueError(f"row {row} needs {int(need[row])} tokens, more than int32 holds")
    for group, (count, size) in enumerate(zip(counts, page_sizes, strict=True)):
        count = np.asarray(count, dtype=np.int64)
        if count.shape != (num_rows,):
            raise ValueError(f"counts of group {group} have shape {count.shape}, want {num_rows}")
        short = need > count * size
        if short.any():
            row = int(np.flatnonzero(short)[0])
            raise ValueError(
                f"row {row} needs {int(need[row])} tokens (computed {int(done_all[row])} + "
                f"scheduled {int(sched_all[row])}) but holds {int(count[row])} pages of "
                f"{size} tokens in group {group} (needs {cdiv(int(need[row]), size)} pages)"
            )
    per_shard = sched_all.reshape(num_shards, -1).sum(axis=1)  # i64[S]
    over = per_shard > tokens_per_shard
    if over.any():
        shard = int(np.flatnonzero(over)[0])
        rows_per_shard = num_rows // num_shards
        raise ValueError(
            f"shard {shard} (rows {shard * rows_per_shard}..{(shard + 1) * rows_per_shard - 1}) "
            f"schedules {int(per_shard[shard])} tokens, over its budget of {tokens_per_shard}"
        )
    return Schedule(sched_all.astype(np.int32), done_all.astype(np.int32))


def _shard_block(
    tables: tuple[jax.Array, ...],  # per group i32[Rb, P_g]: this device's rows
    sched: jax.Array,  # i32[Rb]
    done: jax.Array,  # i32[Rb]
    *,
    page_sizes: tuple[int, ...],
    tokens_per_shard: int,
    row_offset: int,
):
    """Body of the shard_map: one device's slice of its shard's step inputs."""
    rows_per_device = sched.shape[0]
    shard = jax.lax.axis_index(SHARD_AXIS)
    local = jax.lax.axis_index(LOCAL_AXIS)
    num_local = jax.lax.axis_size(LOCAL_AXIS)
    tokens_per_device = tokens_per_shard // num_local
    gather = functools.partial(jax.lax.all_gather, axis_name=LOCAL_AXIS, tiled=True)
    sched_s = gather(sched, to="invarying")  # i32[Rs] the shard's rows
    done_s = gather(done, to="invarying")  # i32[Rs]
    rows_per_shard = sched_s.shape[0]
    cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(sched_s, dtype=jnp.int32)])
    tok = jnp.arange(tokens_per_shard, dtype=jnp.int32)  # i32[Tps] slot in the shard block
    valid = tok < cu[-1]
    row = jnp.minimum(jnp.searchsorted(cu[1:], tok, side="right"), rows_per_shard - 1)
    row = row.astype(jnp.int32)  # i32[Tps] the shard-local row of each token
    pos = jnp.where(valid, done_s[row] + tok - cu[row], 0)
    token_rows = jnp.where(valid, row_offset + shard * rows_per_shard + row, -1)

    mine = valid & (row // rows_per_device == local)  # tokens whose row is on this device
    my_row = jnp.clip(row - local * rows_per_device, 0, rows_per_device - 1)
    own = functools.partial(  # this device's slice of the shard's token block
        jax.lax.dynamic_slice_in_dim,
        start_index=local * tokens_per_device,
        slice_size=tokens_per_device,
    )
    slots = []
    for table, size in zip(tables, page_sizes, strict=True):
        page_col = jnp.minimum(pos // size, table.shape[1] - 1)
        slot = jnp.where(mine, table[my_row, page_col] * size + pos % size, 0)
        slot = jax.lax.psum_scatter(slot, LOCAL_AXIS, scatter_dimension=0, tiled=True)
        slots.append(jnp.where(own(valid), slot, SLOT_MAPPING_PADDING_VAL))
    return (own(token_rows), own(pos), tuple(slots), done + sched, cu[None, :])


@functools.lru_cache(maxsize=64)
def _compiled(
    mesh: Mesh,
    row_axis: str,
    page_sizes: tuple[int, ...],
    num_shards: int,
    tokens_per_shard: int,
    row_offset: int,
):
    """One jitted build per static config; jit itself caches per input shape."""
    dmesh = shard_mesh(mesh, row_axis, num_shards)
    groups = len(page_sizes)
    body = functools.partial(
        _shard_block,
        page_sizes=page_sizes,
        tokens_per_shard=tokens_per_shard,
        row_offset=row_offset,
    )
    rows_2d = P((SHARD_AXIS, LOCAL_AXIS), None)
    mapped = jax.shard_map(
        body,
        mesh=dmesh,
        in_specs=((rows_2d,) * groups, ROWS, ROWS),
        out_specs=(ROWS, ROWS, (ROWS,) * groups, ROWS, P(SHARD_AXIS, None)),
    )
    rows = NamedSharding(mesh, P(row_axis))
    table_sharding = NamedSharding(mesh, P(row_axis, None))
    out = (rows, rows, (rows,) * groups, rows, NamedSharding(dmesh, P(SHARD_AXIS, None)))
    return jax.jit(mapped, in_shardings=((table_sharding,) * groups, rows, rows), out_shardings=out)


def build_step_inputs(
    tables: Sequence[jax.Array],
    sched: jax.Array,
    done: jax.Array,
    *,
    mesh: Mesh,
    row_axis: str = "data",
    page_sizes: Sequence[int],
    num_shards: int,
    tokens_per_shard: int,
    row_offset: int = 0,
) -> StepInputs:
    """The step inputs of every shard, computed on the shards' own devices.

    Args:
      tables: per group ``i32[R, P_g]`` sharded ``P(row_axis, None)``, 0 past each count.
      sched, done: ``i32[R]`` sharded ``P(row_axis)``; zeros for idle rows and rows beyond
        ``num_reqs`` (``check_schedule`` widens a schedule and checks it fits).
      mesh, row_axis: the mesh the tables live on. On a shard process's own sub-mesh pass
        ``num_shards=1`` and ``row_offset`` = global row of its row 0.
      page_sizes: tokens per page, per group; num_shards: ``S``; tokens_per_shard: each
        shard's budget (``max_num_batched_tokens // total shards``).

    Returns ``StepInputs`` with ``T = num_shards * tokens_per_shard`` token slots (shardings
    in its docstring). Compiles once per static config and input shape.

    Example::

        s = check_schedule(counts, sched, done, n, (16,), num_shards=4, tokens_per_shard=2048)
        r = build_step_inputs([table], s.sched, s.done, mesh=mesh, page_sizes=(16,),
                              num_shards=4, tokens_per_shard=2048)
    """
    page_sizes = tuple(int(s) for s in page_sizes)
    if len(tables) != len(page_sizes):
        raise ValueError(f"{len(tables)} tables for page_sizes {list(page_sizes)}")
    dmesh = shard_mesh(mesh, row_axis, num_shards)
    num_local = dmesh.shape[LOCAL_AXIS]
    num_rows = tables[0].shape[0]
    if num_rows % mesh.shape[row_axis]:
        raise ValueError(f"{num_rows} rows do not divide over {mesh.shape[row_axis]} devices")
    if tokens_per_shard < num_local or tokens_per_shard % num_local:
        raise ValueError(
            f"tokens_per_shard={tokens_per_shard} must be a positive multiple of the "
            f"{num_local} devices of each shard"
        )
    for g, table in enumerate(tables):
        if table.ndim != 2 or table.shape[0] != num_rows:
            raise ValueError(f"table of group {g} has shape {table.shape}, want ({num_rows}, P)")
    for what, arr in (("sched", sched), ("done", done)):
        if tuple(arr.shape) != (num_rows,):
            raise ValueError(f"{what} has shape {tuple(arr.shape)}, want ({num_rows},)")
    fn = _compiled(mesh, row_axis, page_sizes, num_shards, tokens_per_shard, int(row_offset))
    return StepInputs(*fn(tuple(tables), sched, done))


def step_inputs_reference(
    host_tables: Sequence[np.ndarray],
    sched: np.ndarray,
    done: np.ndarray,
    page_sizes: Sequence[int],
    num_shards: int,
    tokens_per_shard: int,
    row_offset: int = 0,
) -> StepInputs:
    """Numpy model of ``build_step_inputs`` (a per-token loop), for tests.

    Takes full-length ``i32[R]`` ``sched``/``done`` and per group ``i32[R, P_g]`` tables.
    """
    num_rows = len(sched)
    rows_per_shard = num_rows // num_shards
    total = num_shards * tokens_per_shard
    token_rows = np.full(total, -1, dtype=np.int32)
    positions = np.zeros(total, dtype=np.int32)
    slots = [np.full(total, SLOT_MAPPING_PADDING_VAL, dtype=np.int32) for _ in page_sizes]
    cu_q_lens = np.zeros((num_shards, rows_per_shard + 1), dtype=np.int32)
    for shard in range(num_shards):
        slot = shard * tokens_per_shard
        for i in range(rows_per_shard):
            row = shard * rows_per_shard + i
            for j in range(int(sched[row])):
                pos = int(done[row]) + j
                token_rows[slot] = row_offset + row
                positions[slot] = pos
                for g, size in enumerate(page_sizes):
                    slots[g][slot] = int(host_tables[g][row, pos // size]) * size + pos % size
                slot += 1
            cu_q_lens[shard, i + 1] = cu_q_lens[shard, i] + int(sched[row])
    kv_lens = (np.asarray(done) + np.asarray(sched)).astype(np.int32)
    return StepInputs(token_rows, positions, tuple(slots), kv_lens, cu_q_lens)
