"""A model step in the shard processes: KV copies, K/V writes and paged attention, checked.

:func:`serve_step` is a ``run_on_shards(fn, step=True)`` function. In every shard process it
applies the KV copies the epoch owes (rows that moved onto new pages), writes the step's
new K/V at its slot mapping into a per-group KV cache that lives in that process, and runs
paged attention through the committed page table. Queries, keys and values are synthetic
but deterministic functions of (request, position, head, dim), so the driver can recompute
dense causal attention for any token from that request's own K/V
(:func:`dense_reference`) and compare it with what the shards computed.

The KV caches are kept per process under ``AttentionConfig.name``; a restarted shard process
starts with empty caches, which is exactly the KV that recovery reports lost. In a survivable
job the KV copies go over the shards' KV channel (:mod:`.kv_transfer`), since no collective
works there once a process was replaced.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..shard.kv_copy import apply_kv_copies
from ..shard.step import ShardStep
from . import kv_transfer
from .attention import paged_attention, write_kv, zeros_kv_cache

_CACHES: dict[str, list[jax.Array]] = {}  # this process's KV caches, per table name


@dataclass(frozen=True)
class AttentionConfig:
    """The attention layer the serving step runs, identical in every process.

    Args:
      name: key of this table's KV caches in each shard process.
      page_sizes: tokens per page of each KV-cache group.
      num_shards, pages_per_shard: the table's shards and page pools.
      q_heads, kv_heads, head_dim: attention shape (``q_heads`` a multiple of ``kv_heads``).
      seed: varies the synthetic Q/K/V.
    """

    name: str
    page_sizes: tuple[int, ...]
    num_shards: int
    pages_per_shard: int
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    seed: int = 0
    row_axis: str = "data"

    @property
    def sm_scale(self) -> float:
        return 1.0 / float(np.sqrt(self.head_dim))


def _qkv(xp, uid, pos, heads: int, dim: int, salt: float):
    """``[T, heads, dim]`` synthetic vectors of tokens (``uid``, ``pos``) in ``xp``."""
    h = xp.arange(heads, dtype=xp.float32)[None, :, None]
    d = xp.arange(dim, dtype=xp.float32)[None, None, :]
    u = uid.astype(xp.float32)[:, None, None]
    p = pos.astype(xp.float32)[:, None, None]
    return xp.sin(0.37 * u + 0.113 * p * (1 + 0.1 * h) + 0.7 * h + 0.05 * d * (h + 1) + salt)


@functools.lru_cache(maxsize=16)
def _tokens_qkv(cfg: AttentionConfig):
    def fn(uids, token_rows, positions):
        uid = jnp.take(uids, jnp.maximum(token_rows, 0))
        salt = 0.01 * cfg.seed
        q = _qkv(jnp, uid, positions, cfg.q_heads, cfg.head_dim, salt)
        k = _qkv(jnp, uid, positions, cfg.kv_heads, cfg.head_dim, salt + 1.3)
        v = _qkv(jnp, uid, positions, cfg.kv_heads, cfg.head_dim, salt + 2.9)
        return q, k, v

    return jax.jit(fn)


def serve_step(arrays, step: ShardStep, cfg: AttentionConfig, row_uids: np.ndarray) -> dict:
    """One model step in this shard process; returns its tokens' attention outputs.

    ``row_uids`` (``i32[R]``, the request of each row) is the driver's; every process gets
    the same. Returns ``{"start": [...], "rows": [...], "positions": [...], "out": {g: [...]}}``:
    this process's token slices (first slot, rows, positions, ``f32[n, q_heads, head_dim]``
    outputs per group), which :func:`gather_outputs` puts back in token order.
    """
    if step.inputs is None:
        raise RuntimeError("the last epoch carried no schedule")
    mesh = arrays[0].sharding.mesh
    caches = _CACHES.get(cfg.name)
    if caches is None:
        pages = cfg.num_shards * cfg.pages_per_shard
        caches = [
            zeros_kv_cache(mesh, pages, size, cfg.kv_heads, cfg.head_dim, cfg.row_axis)
            for size in cfg.page_sizes
        ]
    peer = kv_transfer.installed()
    if peer is None:  # one job that never lost a process: one SPMD program per round
        for g, rounds in enumerate(step.take_kv_copies()):
            for plan in rounds:
                caches[g] = apply_kv_copies(caches[g], plan, row_axis=cfg.row_axis)
    else:  # a survivable job: no collective, pages over the KV channel
        pools = [cfg.pages_per_shard] * len(caches)
        caches, torn = kv_transfer.move_kv_pages(
            caches, step.take_kv_copies(), pools, step.copies_epoch, peer
        )
        if any(t.size for t in torn):
            _CACHES[cfg.name] = caches
            raise kv_transfer.KvTransferError(peer.shard, torn, "their source shard is gone")
    inputs = step.inputs
    uids = jax.make_array_from_callback(
        row_uids.shape, NamedSharding(mesh, P()), lambda idx: np.asarray(row_uids, np.int32)[idx]
    )
    q, k, v = _tokens_qkv(cfg)(uids, inputs.token_rows, inputs.positions)
    outs = {}
    for g in range(len(cfg.page_sizes)):
        caches[g] = write_kv(
            caches[g], k, v, inputs.slot_mapping[g], inputs.token_rows,
            num_shards=cfg.num_shards, row_axis=cfg.row_axis,
        )  # fmt: skip
        outs[g] = paged_attention(
            q, caches[g], arrays[g], inputs,
            pages_per_shard=cfg.pages_per_shard, num_shards=cfg.num_shards,
            sm_scale=cfg.sm_scale, row_axis=cfg.row_axis,
        )  # fmt: skip
    _CACHES[cfg.name] = caches
    return _local_parts(inputs.token_rows, inputs.positions, outs)


def _local_parts(token_rows: jax.Array, positions: jax.Array, outs: dict) -> dict:
    """This process's token slices (one per distinct block, replicas skipped)."""
    parts: dict = {"start": [], "rows": [], "positions": [], "out": {g: [] for g in outs}}
    seen = set()
    for i, shard in enumerate(token_rows.addressable_shards):
        start = shard.index[0].start or 0
        if start in seen:
            continue
        seen.add(start)
        parts["start"].append(start)
        parts["rows"].append(np.asarray(shard.data))
        parts["positions"].append(np.asarray(positions.addressable_shards[i].data))
        for g, out in outs.items():
            match = next(s for s in out.addressable_shards if (s.index[0].start or 0) == start)
            parts["out"][g].append(np.asarray(match.data))
    return parts


def gather_outputs(results: list[dict]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Every process's parts (from ``run_on_shards``) as ``(rows i32[T], positions i32[T],
    {group: f32[T, q_heads, head_dim]})`` in token order."""
    blocks = {}
    for res in results:
        for j, start in enumerate(res["start"]):
            blocks[start] = (
                res["rows"][j],
                res["positions"][j],
                {g: res["out"][g][j] for g in res["out"]},
            )
    order = sorted(blocks)
    rows = np.concatenate([blocks[s][0] for s in order])
    positions = np.concatenate([blocks[s][1] for s in order])
    groups = blocks[order[0]][2].keys()
    outs = {g: np.concatenate([blocks[s][2][g] for s in order]) for g in groups}
    return rows, positions, outs


def dense_reference(cfg: AttentionConfig, uid: int, pos: int) -> np.ndarray:
    """``f32[q_heads, head_dim]``: dense causal attention of request ``uid``'s token at
    ``pos`` over that request's own K/V at positions ``0..pos``, in numpy."""
    salt = 0.01 * cfg.seed
    one = np.array([uid], np.int32)
    q = _qkv(np, one, np.array([pos]), cfg.q_heads, cfg.head_dim, salt)[0]
    ctx = np.arange(pos + 1)
    uids = np.full(ctx.size, uid)
    k = _qkv(np, uids, ctx, cfg.kv_heads, cfg.head_dim, salt + 1.3)
    v = _qkv(np, uids, ctx, cfg.kv_heads, cfg.head_dim, salt + 2.9)
    group = cfg.q_heads // cfg.kv_heads
    k = np.repeat(k, group, axis=1)  # [ctx, q_heads, dim]
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("hd,khd->hk", q, k) * cfg.sm_scale
    scores -= scores.max(axis=1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=1, keepdims=True)
    return np.einsum("hk,khd->hd", weights, v).astype(np.float32)


def token_errors(
    cfg: AttentionConfig, results: list[dict], row_uids: np.ndarray, skip: Collection[int] = ()
) -> np.ndarray:
    """``f32[T']``: per scheduled token, ``max |shard output - dense reference|`` over every
    group, except the tokens of the requests in ``skip`` (whose KV a recovery reported lost
    in this step)."""
    rows, positions, outs = gather_outputs(results)
    live = np.flatnonzero(rows >= 0)
    if skip:
        live = live[~np.isin(row_uids[rows[live]], np.fromiter(skip, np.int64, len(skip)))]
    errors = np.zeros(live.size, np.float32)
    for i, t in enumerate(live.tolist()):
        want = dense_reference(cfg, int(row_uids[rows[t]]), int(positions[t]))
        errors[i] = max(float(np.abs(out[t] - want).max()) for out in outs.values())
    return errors


def max_error(
    cfg: AttentionConfig, results: list[dict], row_uids: np.ndarray, skip: Collection[int] = ()
) -> tuple[int, float]:
    """``(tokens checked, max |shard output - dense reference|)`` over every scheduled token
    of every group, except those of the requests in ``skip`` (see :func:`token_errors`)."""
    errors = token_errors(cfg, results, row_uids, skip)
    return errors.size, float(errors.max(initial=0.0))


def drop_cache(name: str) -> None:
    """Forget this process's KV caches of table ``name`` (``run_on_shards`` it at the end)."""
    _CACHES.pop(name, None)
