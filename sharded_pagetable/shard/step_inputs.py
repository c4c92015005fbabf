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

In-process shards may outnumber the devices of the row axis (``S = k x D``, e.g. four
shards on one device): each device then holds ``k`` whole shards, and the build computes
each shard's part on its device (no collective), side by side in shard order. The result
is the same, value for value and in the same places of the global arrays, as with a device
per shard; only ``cu_q_lens`` is laid out over the caller's mesh (``P(row_axis, None)``:
each device holds its shards' offsets) instead of over ``shard_mesh``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..constants import SLOT_MAPPING_PADDING_VAL
from ..routing.mesh import LOCAL_AXIS, ROWS, SHARD_AXIS, shard_mesh, shards_per_device


class StepInputs(NamedTuple):
    """What a paged-attention step reads, for ``R`` rows and ``T`` token slots.

    On the device path every field is a global ``jax.Array``: the token and row fields are
    sharded ``NamedSharding(mesh, P(row_axis))`` on the caller's mesh; ``cu_q_lens`` lives
    on ``shard_mesh(mesh, row_axis, S)`` sharded ``P("_shard", None)`` (each shard's devices
    hold their shard's offsets; with several shards per device, on the caller's mesh
    sharded ``P(row_axis, None)``). ``step_inputs_reference`` returns the same fields in
    numpy.
    """

    token_rows: jax.Array  # i32[T] global row of each token slot, -1 at padding
    positions: jax.Array  # i32[T] position of each token in its request, 0 at padding
    slot_mapping: tuple[jax.Array, ...]  # per group i32[T], SLOT_MAPPING_PADDING_VAL at padding
    kv_lens: jax.Array  # i32[R] done + sched
    cu_q_lens: jax.Array  # i32[S, R/S + 1] offsets of a shard's rows in its own token block


def _shard_block(
    tables: tuple[jax.Array, ...],  # per group i32[Rb, P_g]: this device's rows
    sched: jax.Array,  # i32[Rb]
    done: jax.Array,  # i32[Rb]
    **static,
):
    """Body of the shard_map: one device's slice of its shard's step inputs."""
    shard = jax.lax.axis_index(SHARD_AXIS)
    local = jax.lax.axis_index(LOCAL_AXIS)
    return _shard_part(tables, sched, done, shard, local, jax.lax.axis_size(LOCAL_AXIS), **static)


def _shared_block(
    tables: tuple[jax.Array, ...],  # per group i32[k * Rs, P_g]: this device's k shards' rows
    sched: jax.Array,  # i32[k * Rs]
    done: jax.Array,  # i32[k * Rs]
    *,
    row_axis: str,
    per_device: int,
    **static,
):
    """Body of the shard_map when ``per_device`` shards share each device of the row axis:
    each shard's inputs (a shard on one device needs no collective), side by side in shard
    order, as the shards' own token blocks and rows lie on the device."""
    first = jax.lax.axis_index(row_axis) * per_device

    def split(x: jax.Array) -> jax.Array:
        return x.reshape(per_device, -1, *x.shape[1:])

    def flat(x: jax.Array) -> jax.Array:
        return x.reshape(-1, *x.shape[2:])

    def one(shard, tables_s, sched_s, done_s):
        return _shard_part(tables_s, sched_s, done_s, shard, 0, 1, **static)

    shards = first + jnp.arange(per_device, dtype=jnp.int32)
    rows, pos, slots, kv_lens, cu = jax.vmap(one)(
        shards, tuple(split(t) for t in tables), split(sched), split(done)
    )
    return flat(rows), flat(pos), tuple(map(flat, slots)), flat(kv_lens), flat(cu)


def _shard_part(
    tables: tuple[jax.Array, ...],  # per group i32[Rb, P_g]: this device's rows
    sched: jax.Array,  # i32[Rb]
    done: jax.Array,  # i32[Rb]
    shard: jax.Array,  # this shard's index
    local: jax.Array | int,  # this device's index among the shard's devices
    num_local: int,  # the shard's devices
    *,
    page_sizes: tuple[int, ...],
    tokens_per_shard: int,
    row_offset: int,
):
    """This device's slice of shard ``shard``'s step inputs."""
    rows_per_device = sched.shape[0]
    tokens_per_device = tokens_per_shard // num_local
    # With one device per shard the body holds no collective at all: a survivable job's
    # replaced process can run none on CPU (see serving/kv_transfer).
    if num_local == 1:
        sched_s, done_s = sched, done
    else:
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
        if num_local > 1:
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
    groups = len(page_sizes)
    static = {
        "page_sizes": page_sizes,
        "tokens_per_shard": tokens_per_shard,
        "row_offset": row_offset,
    }
    rows = NamedSharding(mesh, P(row_axis))
    table_sharding = NamedSharding(mesh, P(row_axis, None))
    shared = shards_per_device(mesh, row_axis, num_shards)
    if shared > 1:  # several shards on each device: each shard's part, on its device
        body = functools.partial(_shared_block, row_axis=row_axis, per_device=shared, **static)
        flat, offsets = P(row_axis), P(row_axis, None)
        mapped = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=((offsets,) * groups, flat, flat),
            out_specs=(flat, flat, (flat,) * groups, flat, offsets),
        )
        out = (rows, rows, (rows,) * groups, rows, table_sharding)
        in_shardings = ((table_sharding,) * groups, rows, rows)
        return jax.jit(mapped, in_shardings=in_shardings, out_shardings=out)
    dmesh = shard_mesh(mesh, row_axis, num_shards)
    body = functools.partial(_shard_block, **static)
    rows_2d = P((SHARD_AXIS, LOCAL_AXIS), None)
    offsets_axes = SHARD_AXIS if dmesh.shape[LOCAL_AXIS] > 1 else (SHARD_AXIS, LOCAL_AXIS)
    mapped = jax.shard_map(
        body,
        mesh=dmesh,
        in_specs=((rows_2d,) * groups, ROWS, ROWS),
        # One device per shard: the offsets vary over no other device, and saying so keeps
        # the body free of the gather that would make them invariant.
        out_specs=(ROWS, ROWS, (ROWS,) * groups, ROWS, P(offsets_axes, None)),
    )
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
    shared = shards_per_device(mesh, row_axis, num_shards)
    num_local = 1 if shared > 1 else shard_mesh(mesh, row_axis, num_shards).shape[LOCAL_AXIS]
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
