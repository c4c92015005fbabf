"""A paged-attention step over a KV cache whose page axis is sharded like the rows.

The cache of one KV-cache group is ``f32[num_pages, page_size, 2 * kv_heads, head_dim]``
(K at even, V at odd combined heads: the layout of JAX's TPU ragged paged attention),
sharded ``P(row_axis, None, None, None)``. Shard ``s`` owns the pool of global pages
``[s * pages_per_shard, (s + 1) * pages_per_shard)``, spread over its ``D`` devices, and its
rows point only into that pool (``ShardedPageTable(..., pages_per_shard=...)`` enforces it).
Both functions run one SPMD program over ``shard_mesh(mesh, row_axis, S)``; whatever a
device needs from its shard's other devices is all-gathered over ``"_local"`` only, so no KV
byte crosses a shard (a host). With several in-process shards per device (``S = k x D``)
they run over the caller's mesh: a device attends for each of its ``k`` shards through that
shard's pool, and writes its shards' K/V into its own pages (a slot outside the device's
pools, rather than outside its token's own pool, is what is dropped there).

``paged_attention`` is a vectorised, jittable equivalent of
``jax.experimental.pallas.ops.tpu.ragged_paged_attention.kernel.ref_ragged_paged_attention``
(which loops over sequences in Python and so cannot run under ``jit``) applied to each
shard's local inputs. It gathers every token's pages, so it costs
``O(tokens * pages_per_row * page_size * heads * head_dim)``: a checker, not a fast kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..routing.mesh import LOCAL_AXIS, ROWS, SHARD_AXIS, shard_mesh, shards_per_device
from ..shard.step_inputs import StepInputs

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # ref_ragged_paged_attention's default


def kv_sharding(mesh: Mesh, row_axis: str = "data") -> NamedSharding:
    """Pages split over ``row_axis``; page slots, heads and head dim whole."""
    return NamedSharding(mesh, P(row_axis, None, None, None))


def zeros_kv_cache(
    mesh: Mesh,
    num_pages: int,
    page_size: int,
    kv_heads: int,
    head_dim: int,
    row_axis: str = "data",
) -> jax.Array:
    """A zero KV cache ``f32[num_pages, page_size, 2 * kv_heads, head_dim]`` on ``mesh``."""
    if num_pages % mesh.shape[row_axis]:
        raise ValueError(
            f"num_pages={num_pages} does not divide over the {mesh.shape[row_axis]} devices "
            f"of row axis {row_axis!r}"
        )
    shape = (num_pages, page_size, 2 * kv_heads, head_dim)
    return jax.jit(
        lambda: jnp.zeros(shape, jnp.float32), out_shardings=kv_sharding(mesh, row_axis)
    )()


def _mesh_of(kv: jax.Array, row_axis: str) -> Mesh:
    sharding = kv.sharding
    if not isinstance(sharding, NamedSharding) or sharding.spec[:1] != (row_axis,):
        raise ValueError(
            f"kv must be sharded NamedSharding(mesh, P({row_axis!r}, None, None, None)), got "
            f"{sharding}"
        )
    return sharding.mesh


def _check_pools(kv: jax.Array, mesh: Mesh, row_axis: str, num_shards: int) -> int:
    """Pages per shard; raises unless each shard's pool splits evenly over its devices."""
    if kv.ndim != 4 or kv.shape[2] % 2:
        raise ValueError(f"kv has shape {kv.shape}, want [pages, page_size, 2 * kv_heads, dim]")
    num_pages = kv.shape[0]
    if num_pages % mesh.shape[row_axis]:
        raise ValueError(f"{num_pages} pages do not divide over {mesh.shape[row_axis]} devices")
    shards_per_device(mesh, row_axis, num_shards)  # checks num_shards against the row axis
    return num_pages // num_shards


def _local_gather(devices_per_shard: int):
    """All-gather over a shard's own devices; nothing at all with one device per shard, so
    the program holds no collective (a survivable job's replaced process can run no
    collective on CPU; see ``kv_transfer``)."""
    if devices_per_shard == 1:
        return lambda x: x
    return functools.partial(jax.lax.all_gather, axis_name=LOCAL_AXIS, tiled=True)


def _write_block(kv, k_new, v_new, slots, token_rows, *, pages_per_shard: int, local_n: int):
    """Body: write the shard's new K/V that falls into this device's part of the pool."""
    pages, page_size, combined, dim = kv.shape  # this device's pages
    shard = jax.lax.axis_index(SHARD_AXIS)
    local = jax.lax.axis_index(LOCAL_AXIS)
    gather = _local_gather(local_n)
    k_s, v_s, slots_s, rows_s = (gather(x) for x in (k_new, v_new, slots, token_rows))
    first = (shard * pages_per_shard + local * pages) * page_size  # this device's first slot
    local_slot = slots_s - first  # i32[Tps]
    ok = (rows_s >= 0) & (local_slot >= 0) & (local_slot < pages * page_size)
    idx = jnp.where(ok, local_slot, pages * page_size)  # out of range: dropped
    new = jnp.stack([k_s, v_s], axis=2).reshape(-1, combined, dim)  # K even, V odd heads
    flat = kv.reshape(pages * page_size, combined, dim).at[idx].set(new, mode="drop")
    return flat.reshape(kv.shape)


@functools.lru_cache(maxsize=64)
def _compiled_write(mesh: Mesh, row_axis: str, num_shards: int, pages_per_shard: int):
    dmesh = shard_mesh(mesh, row_axis, num_shards)
    spec3 = P((SHARD_AXIS, LOCAL_AXIS), None, None)
    pages = P((SHARD_AXIS, LOCAL_AXIS), None, None, None)
    body = functools.partial(
        _write_block, pages_per_shard=pages_per_shard, local_n=dmesh.shape[LOCAL_AXIS]
    )
    mapped = jax.shard_map(
        body,
        mesh=dmesh,
        in_specs=(pages, spec3, spec3, ROWS, ROWS),
        out_specs=pages,
    )
    return jax.jit(mapped, out_shardings=kv_sharding(mesh, row_axis), donate_argnums=0)


def write_kv(
    kv: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
    token_rows: jax.Array,
    *,
    num_shards: int,
    row_axis: str = "data",
) -> jax.Array:
    """``kv`` with a step's new K/V written at their slots (``kv`` is donated).

    Args:
      kv: ``f32[pages, page_size, 2 * kv_heads, dim]`` sharded ``P(row_axis, ...)``.
      k_new, v_new: ``f32[T, kv_heads, dim]`` sharded over ``row_axis`` like the tokens.
      slot_mapping: ``i32[T]`` global slots ``page * page_size + offset`` of this group.
      token_rows: ``i32[T]``; padding tokens (-1) write nothing.
      num_shards: ``S``; shard ``s``'s tokens are written only into its own pool, and a slot
        outside its token's pool is dropped (the page table refuses such pages).
    """
    mesh = _mesh_of(kv, row_axis)
    pages_per_shard = _check_pools(kv, mesh, row_axis, num_shards)
    shared = shards_per_device(mesh, row_axis, num_shards)
    if shared > 1:  # the shards of a device write as one: its pages are their pools
        num_shards, pages_per_shard = num_shards // shared, pages_per_shard * shared
    want = (slot_mapping.shape[0], kv.shape[2] // 2, kv.shape[3])
    for what, arr in (("k_new", k_new), ("v_new", v_new)):
        if tuple(arr.shape) != want:
            raise ValueError(f"{what} has shape {tuple(arr.shape)}, want {want}")
    if token_rows.shape != slot_mapping.shape:
        raise ValueError(f"token_rows {token_rows.shape} vs slot_mapping {slot_mapping.shape}")
    fn = _compiled_write(mesh, row_axis, num_shards, pages_per_shard)
    return fn(kv, k_new, v_new, slot_mapping, token_rows)


def _local_pages(table, shard, pages_per_shard: int):
    """``table``'s global page ids as indices into shard ``shard``'s pool (tails: 0)."""
    pages = table - shard * pages_per_shard  # i32[Rs, P] local page indices
    return jnp.where((pages >= 0) & (pages < pages_per_shard), pages, 0)


def _attention_block(
    queries, kv, table, kv_lens, cu_q_lens, *, pages_per_shard: int, sm_scale: float, local_n: int
):
    """Body: attention of this device's tokens, read through its shard's local pages."""
    shard = jax.lax.axis_index(SHARD_AXIS)
    gather = _local_gather(local_n)
    pool = gather(kv)  # f32[pages_per_shard, page_size, 2 * kv_heads, dim]
    pages = _local_pages(gather(table), shard, pages_per_shard)
    local = jax.lax.axis_index(LOCAL_AXIS)
    return _attend(queries, pool, pages, gather(kv_lens), cu_q_lens[0], local, sm_scale)


def _shared_attention_block(
    queries, kv, table, kv_lens, cu_q_lens, *, row_axis: str, per_device: int, **static
):
    """Body when ``per_device`` shards share each device: each shard's attention through
    its own pool (on its device, no collective), side by side in shard order."""
    pages_per_shard, sm_scale = static["pages_per_shard"], static["sm_scale"]
    first = jax.lax.axis_index(row_axis) * per_device

    def split(x):
        return x.reshape(per_device, -1, *x.shape[1:])

    def one(shard, q, pool, table_s, kv_lens_s, cu):
        pages = _local_pages(table_s, shard, pages_per_shard)
        return _attend(q, pool, pages, kv_lens_s, cu, 0, sm_scale)

    shards = first + jnp.arange(per_device, dtype=jnp.int32)
    args = (split(queries), split(kv), split(table), split(kv_lens), cu_q_lens)
    out = jax.vmap(one)(shards, *args)
    return out.reshape(-1, *out.shape[2:])


def _attend(queries, pool, pages, kv_lens, cu, local, sm_scale: float):
    """Attention of one device's slice (``local``) of a shard's token block, through the
    shard's whole ``pool`` (``pages``: its rows' local page indices, ``i32[Rs, P]``;
    ``kv_lens`` ``i32[Rs]``; ``cu`` ``i32[Rs + 1]``)."""
    tokens, q_heads, dim = queries.shape  # this device's slice of the shard's token block
    _, page_size, combined, _ = pool.shape
    kv_heads = combined // 2
    rows_per_shard = kv_lens.shape[0]

    tok = local * tokens + jnp.arange(tokens, dtype=jnp.int32)  # i32[Tl] slot in shard block
    valid = tok < cu[-1]
    seq = jnp.minimum(jnp.searchsorted(cu[1:], tok, side="right"), rows_per_shard - 1)
    q_len = cu[seq + 1] - cu[seq]
    q_pos = kv_lens[seq] - q_len + tok - cu[seq]  # i32[Tl] position within its sequence

    tok_pages = pool[pages[seq]]  # f32[Tl, P, page_size, 2 * kv_heads, dim]
    span = tok_pages.shape[1] * page_size
    k = tok_pages[..., 0::2, :].reshape(tokens, span, kv_heads, dim)
    v = tok_pages[..., 1::2, :].reshape(tokens, span, kv_heads, dim)
    q = queries.reshape(tokens, kv_heads, q_heads // kv_heads, dim)  # head h -> kv head h // G
    attn = jnp.einsum("thgd,tkhd->thgk", q, k, preferred_element_type=jnp.float32) * sm_scale
    masked = jnp.arange(span)[None, :] > q_pos[:, None]  # bool[Tl, span] causal
    attn += jnp.where(masked, MASK_VALUE, 0.0)[:, None, None, :]
    out = jnp.einsum("thgk,tkhd->thgd", jax.nn.softmax(attn, axis=-1), v)
    out = out.reshape(tokens, q_heads, dim).astype(queries.dtype)
    return jnp.where(valid[:, None, None], out, 0)


@functools.lru_cache(maxsize=64)
def _compiled_attention(
    mesh: Mesh, row_axis: str, num_shards: int, pages_per_shard: int, sm_scale: float
):
    out = NamedSharding(mesh, P(row_axis, None, None))
    shared = shards_per_device(mesh, row_axis, num_shards)
    if shared > 1:
        body = functools.partial(
            _shared_attention_block,
            row_axis=row_axis,
            per_device=shared,
            pages_per_shard=pages_per_shard,
            sm_scale=sm_scale,
        )
        mapped = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(
                P(row_axis, None, None),
                P(row_axis, None, None, None),
                P(row_axis, None),
                P(row_axis),
                P(row_axis, None),
            ),
            out_specs=P(row_axis, None, None),
        )
        return jax.jit(mapped, out_shardings=out)
    dmesh = shard_mesh(mesh, row_axis, num_shards)
    tokens = P((SHARD_AXIS, LOCAL_AXIS), None, None)
    mapped = jax.shard_map(
        functools.partial(
            _attention_block,
            pages_per_shard=pages_per_shard,
            sm_scale=sm_scale,
            local_n=dmesh.shape[LOCAL_AXIS],
        ),
        mesh=dmesh,
        in_specs=(
            tokens,
            P((SHARD_AXIS, LOCAL_AXIS), None, None, None),
            P((SHARD_AXIS, LOCAL_AXIS), None),
            ROWS,
            P(SHARD_AXIS, None),
        ),
        out_specs=tokens,
    )
    return jax.jit(mapped, out_shardings=out)


def paged_attention(
    queries: jax.Array,
    kv: jax.Array,
    table: jax.Array,
    step_inputs: StepInputs,
    *,
    pages_per_shard: int,
    num_shards: int,
    sm_scale: float,
    row_axis: str = "data",
) -> jax.Array:
    """``f32[T, q_heads, dim]`` attention of every token through its row's pages.

    Causal within a row: the token at position ``p`` sees KV positions ``<= p`` of its own
    row; padding tokens give 0. Per shard this equals ``ref_ragged_paged_attention`` on the
    shard's local inputs (``num_seqs = rows_per_shard``, page indices ``table - s * P``).

    Args:
      queries: ``f32[T, q_heads, dim]`` sharded over ``row_axis`` like the tokens.
      kv: this group's cache (see the module docstring); table: its ``i32[R, P]`` page
        table with global page ids, sharded ``P(row_axis, None)``.
      step_inputs: from ``build_step_inputs`` (``kv_lens`` and ``cu_q_lens`` are read).
      pages_per_shard: pool size ``P``; num_shards: ``S``; sm_scale: score scale.
    """
    mesh = _mesh_of(kv, row_axis)
    if _check_pools(kv, mesh, row_axis, num_shards) != pages_per_shard:
        raise ValueError(
            f"kv holds {kv.shape[0]} pages, not num_shards={num_shards} pools of "
            f"pages_per_shard={pages_per_shard}"
        )
    cu_shape = tuple(step_inputs.cu_q_lens.shape)
    if cu_shape != (num_shards, table.shape[0] // num_shards + 1):
        raise ValueError(f"cu_q_lens has shape {cu_shape}, not num_shards={num_shards} rows")
    if (
        queries.ndim != 3
        or queries.shape[2] != kv.shape[3]
        or queries.shape[1] % (kv.shape[2] // 2)
    ):
        raise ValueError(f"queries {queries.shape} do not fit kv {kv.shape}")
    fn = _compiled_attention(mesh, row_axis, num_shards, pages_per_shard, float(sm_scale))
    return fn(queries, kv, table, step_inputs.kv_lens, step_inputs.cu_q_lens)
