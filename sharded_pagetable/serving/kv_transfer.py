"""KV copies between shard processes without a collective: host pages over a channel.

In a survivable job (``ray.survivable``) a shard process can be replaced while the others
keep running, and after that no cross-process collective works on CPU (gloo refuses to
set up again; see FIELD_NOTES, "A multi-controller JAX job can outlive one of its
processes"), so :func:`~sharded_pagetable.shard.kv_copy.apply_kv_copies`' ``ppermute``
would block every survivor. There the model step moves the KV pages a commit's
``kv_copies`` owe with :func:`move_kv_pages` instead, in each process on its own:

1. for each round of copies, every process reads the pages other pools need from its own
   device buffers to host and posts them, one frame per target shard, with its
   :class:`KvPeer` (the shard actor's authenticated channel server);
2. it fetches from every source shard the frame its own pool needs (the source answers
   once it has posted: no process waits on another before posting, so there is no cycle);
3. it writes those pages into its own buffers (``.at[].set`` on each device, donated) and
   puts the global array back together from the same buffers.

A source that died, or answers with anything but the pages the plan names, leaves its
copies *torn*: nothing of that frame is written, the destination pages are recorded with
the peer, and the step raises :class:`KvTransferError`. Recovery reports the rows holding
torn pages as lost KV (``lost_kv_rows``); no page is ever written from part of a frame.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import jax
import msgpack
import numpy as np

from ..rows.device import scatter_rows
from ..shard.kv_copy import bucket, check_copies

log = logging.getLogger(__name__)


class KvTransferError(RuntimeError):
    """Some KV pages a model step owed could not be fetched (their source shard died or
    answered wrongly); ``torn[g]`` names the destination pages of group ``g`` left unwritten."""

    def __init__(self, shard: int, torn: Sequence[np.ndarray], why: str) -> None:
        self.shard = shard
        self.torn = tuple(torn)
        count = sum(t.size for t in self.torn)
        super().__init__(f"shard {shard}: {count} KV pages not copied ({why})")


class KvPeer(Protocol):
    """This process's end of the KV channel (the shard actor owns it)."""

    shard: int  # the shard this process holds

    def post(self, key: tuple[int, int], frames: dict[int, bytes]) -> None:
        """Offer ``frames[target]`` to each target shard under ``key`` (epoch, round)."""

    def fetch(self, source: int, key: tuple[int, int], max_bytes: int) -> bytes:
        """The frame shard ``source`` posted for this shard under ``key``; raises
        ``ConnectionError`` / ``TimeoutError`` if it cannot be had."""

    def tear(self, pages: Sequence[np.ndarray]) -> None:
        """Record destination pages (per group) left unwritten, for recovery to report."""


_PEER: KvPeer | None = None


def install(peer: KvPeer | None) -> None:
    """Make ``peer`` this process's KV channel (the shard actor, at start)."""
    global _PEER
    _PEER = peer


def installed() -> KvPeer | None:
    """This process's KV channel; None where collectives work (no survivable job)."""
    return _PEER


@dataclass(frozen=True)
class _Round:
    """One round of every group's copies, seen from one pool (global page ids).

    ``send[t][g]``: ``(src, dst)`` of group ``g`` copies from this pool into pool ``t``;
    ``recv[s][g]``: ``dst`` of group ``g`` copies from pool ``s`` into this pool (``s`` may
    be this pool itself: a copy inside the pool goes through host too)."""

    send: dict[int, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    recv: dict[int, list[np.ndarray]] = field(default_factory=dict)


def split_round(
    plans: Sequence[np.ndarray], num_pages: Sequence[int], pool_pages: Sequence[int], shard: int
) -> _Round:
    """The copies of one round (``plans[g]``: ``i32[2, K]``, checked against a cache of
    ``num_pages[g]`` pages split in pools of ``pool_pages[g]``) that shard ``shard`` sends
    and receives. Pure."""
    out = _Round()
    empty = np.empty(0, np.int64)
    n = len(plans)
    for g, plan in enumerate(plans):
        src, dst = check_copies(plan, num_pages[g])
        src_pool, dst_pool = src // pool_pages[g], dst // pool_pages[g]
        mine = src_pool == shard
        for t in np.unique(dst_pool[mine]).tolist():
            pick = mine & (dst_pool == t)
            out.send.setdefault(t, [(empty, empty)] * n)[g] = (src[pick], dst[pick])
        into = dst_pool == shard
        for s in np.unique(src_pool[into]).tolist():
            out.recv.setdefault(s, [empty] * n)[g] = dst[into & (src_pool == s)]
    return out


def _trail_key(index: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Which part of a page's trailing axes a device block holds (the same on every pool)."""
    key: list[int] = []
    for s, dim in zip(index[1:], shape[1:], strict=True):
        start, stop, _ = s.indices(dim)
        key += [start, stop]
    return tuple(key)


def _blocks(kv: jax.Array):
    """``(first page, last page + 1, trailing key, buffer)`` of each local device block."""
    for sh in kv.addressable_shards:
        lo, hi, _ = sh.index[0].indices(kv.shape[0])
        yield lo, hi, _trail_key(sh.index, kv.shape), sh.data


@jax.jit
def _gather(block: jax.Array, idx: jax.Array) -> jax.Array:
    return jax.numpy.take(block, idx, axis=0, mode="clip")


def read_pages(kv: jax.Array, pages: np.ndarray) -> dict[tuple[int, ...], np.ndarray]:
    """Host copies of global ``pages`` (all held by this process) per trailing key."""
    out: dict[tuple[int, ...], np.ndarray] = {}
    for lo, hi, key, block in _blocks(kv):
        pick = (pages >= lo) & (pages < hi)
        if not pick.any():
            continue
        idx = np.full(bucket(int(pick.sum())), 0, np.int32)
        idx[: pick.sum()] = pages[pick] - lo
        got = np.asarray(_gather(block, jax.device_put(idx, block.sharding)))
        if key not in out and pick.all():  # one block holds them all: no second copy
            out[key] = got[: pages.size]
            continue
        if key not in out:
            out[key] = np.empty((pages.size, *block.shape[1:]), block.dtype)
        out[key][pick] = got[: pick.sum()]
    return out


def write_pages(
    kv: jax.Array, dst: Sequence[np.ndarray], parts: Sequence[dict[tuple[int, ...], np.ndarray]]
) -> jax.Array:
    """``kv`` (donated) with global pages ``dst[i]`` set to ``parts[i]`` (host pages per
    trailing key), on this process's devices only; no device of another process is touched
    and nothing is collective."""
    blocks = []
    for lo, hi, key, block in _blocks(kv):
        idx_parts, page_parts = [], []
        for d, part in zip(dst, parts, strict=True):
            pick = (d >= lo) & (d < hi)
            if pick.any():
                idx_parts.append(d[pick] - lo)
                page_parts.append(part[key][pick])
        if not idx_parts:
            blocks.append(block)
            continue
        idx = np.concatenate(idx_parts)
        size = bucket(idx.size)
        padded = np.full(size, block.shape[0], np.int32)
        padded[: idx.size] = idx
        pages = np.zeros((size, *block.shape[1:]), block.dtype)
        pages[: idx.size] = np.concatenate(page_parts)
        put = functools.partial(jax.device_put, device=block.sharding)
        blocks.append(scatter_rows(block, put(padded), put(pages)))
    return jax.make_array_from_single_device_arrays(kv.shape, kv.sharding, blocks)


def _encode(kvs: Sequence[jax.Array], copies: Sequence[tuple[np.ndarray, np.ndarray]]) -> bytes:
    groups = []
    for kv, (src, dst) in zip(kvs, copies, strict=True):
        parts = read_pages(kv, src) if src.size else {}
        groups.append(
            {
                "dst": dst.astype("<i8").tobytes(),
                "parts": [[list(k), memoryview(np.ascontiguousarray(v))] for k, v in parts.items()],
            }
        )
    return msgpack.packb(groups, use_bin_type=True)


def _decode(
    frame: bytes, kvs: Sequence[jax.Array], want: Sequence[np.ndarray]
) -> list[dict[tuple[int, ...], np.ndarray]]:
    """The pages of a frame, checked against what this pool expects from its source."""
    groups = msgpack.unpackb(frame, raw=False, use_list=True, strict_map_key=True)
    if not isinstance(groups, list) or len(groups) != len(kvs):
        raise ValueError("the frame does not hold one entry per KV-cache group")
    out = []
    for kv, dst, entry in zip(kvs, want, groups, strict=True):
        got = np.frombuffer(entry["dst"], "<i8")
        if not np.array_equal(got, dst):
            raise ValueError("the frame's destination pages differ from the plan's")
        keys = {_trail_key(sh.index, kv.shape): sh.data.shape[1:] for sh in kv.addressable_shards}
        parts = {}
        for k, data in entry["parts"]:
            key = tuple(k)
            if key not in keys:
                raise ValueError(f"the frame holds a block {key} this pool does not have")
            page = keys[key]
            pages = np.frombuffer(data, kv.dtype)
            if pages.size != dst.size * int(np.prod(page)):
                raise ValueError("the frame's pages have the wrong size")
            parts[key] = pages.reshape(dst.size, *page)
        if dst.size and set(parts) != set(keys):
            raise ValueError("the frame lacks blocks this pool holds")
        out.append(parts)
    return out


def _frame_bytes(kvs: Sequence[jax.Array], dst: Sequence[np.ndarray]) -> int:
    """An upper bound on a frame carrying ``dst`` pages per group (refuses anything larger)."""
    total = 1024
    for kv, d in zip(kvs, dst, strict=True):
        page = int(np.prod(kv.shape[1:])) * kv.dtype.itemsize
        total += 64 + 8 * d.size + d.size * page * max(1, len(kv.addressable_shards))
    return total


def move_kv_pages(
    kvs: list[jax.Array],
    rounds: Sequence[Sequence[np.ndarray]],
    pool_pages: Sequence[int],
    epoch: int,
    peer: KvPeer,
) -> tuple[list[jax.Array], list[np.ndarray]]:
    """Carry out the KV copies ``rounds[g]`` (per group, rounds of ``i32[2, K]`` global
    plans, the same in every process) on ``kvs`` (per group, donated) in this process.

    Returns the new caches and, per group, the destination pages left torn (empty when
    every copy was made). Raises ``ValueError`` for a plan that is not one (before any
    page moves).
    """
    num_rounds = max((len(r) for r in rounds), default=0)
    num_pages = [kv.shape[0] for kv in kvs]
    none = np.empty((2, 0), np.int32)
    plans = [
        [rounds[g][r] if r < len(rounds[g]) else none for g in range(len(kvs))]
        for r in range(num_rounds)
    ]
    splits = [split_round(p, num_pages, pool_pages, peer.shard) for p in plans]
    torn: list[list[np.ndarray]] = [[] for _ in kvs]
    for r, split in enumerate(splits):
        key = (epoch, r)
        peer.post(key, {t: _encode(kvs, copies) for t, copies in split.send.items()})
        dsts, parts = [], []
        for source, want in sorted(split.recv.items()):
            try:
                frame = peer.fetch(source, key, _frame_bytes(kvs, want))
                got = _decode(frame, kvs, want)
            except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
                for g, d in enumerate(want):
                    torn[g].append(d)
                log.warning("KV pages from shard %d not copied: %s", source, exc)
                continue
            dsts.append(want)
            parts.append(got)
        for g in range(len(kvs)):
            d = [w[g] for w in dsts if w[g].size]
            if d:
                p = [pp[g] for w, pp in zip(dsts, parts, strict=True) if w[g].size]
                kvs[g] = write_pages(kvs[g], d, p)
    out = [np.unique(np.concatenate(t)) if t else np.empty(0, np.int64) for t in torn]
    if any(t.size for t in out):
        peer.tear(out)
    return kvs, out
