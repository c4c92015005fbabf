"""Device side of a row-sharded table: per-device buffers updated in place.

A table of shape ``[R, P]`` laid out with ``NamedSharding(mesh, P(row_axis, None))`` lives as
one buffer per device, each holding a contiguous block of rows (devices along other mesh axes
hold replicas of the same block). :class:`DeviceRows` owns the buffers of the blocks inside a
row range on this process's devices. A commit sends only the changed cells (row, page slot,
page id) of each touched block through a donated, jitted loop of in-place updates, padded to
a few bucket sizes compiled at start-up; a block that mostly changed is uploaded whole. A
decode step that adds one page to a row moves 12 bytes for it, and never a copy of the table.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from . import kernels

_MIN_BUCKET = 8
_BUCKET_GROWTH = 2
# Upload a whole block instead of scattering once 1/_WHOLE_BLOCK_FRACTION of it changed.
_WHOLE_BLOCK_FRACTION = 4
# Changed cells go out as (row, page slot, page id) triples, padded to one of these sizes;
# a block with more changed cells than the largest goes out in chunks (or whole).
CELL_BUCKETS = (64, 256, 1024, 4096)


def _put_cells_loop(buf: jax.Array, rcv: jax.Array, k: jax.Array) -> jax.Array:
    # rcv: i32[3, K] = rows, columns, values; only the first k entries are written. A loop of
    # 1x1 dynamic_update_slice stays in place on the donated buffer, where XLA's CPU scatter
    # of more than ~64 indices copies the whole buffer (measured: 92 us vs 12 us for 256).
    def body(i: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice(b, rcv[2, i].reshape(1, 1), (rcv[0, i], rcv[1, i]))

    return jax.lax.fori_loop(0, k, body, buf)


@functools.partial(jax.jit, donate_argnums=0)
def _put_cells(buf: jax.Array, rcv: jax.Array, k: jax.Array) -> jax.Array:
    return _put_cells_loop(buf, rcv, k)


@functools.partial(jax.jit, donate_argnums=0)
def _put_cells_groups(bufs: tuple, rcv: jax.Array, ks: jax.Array) -> tuple:
    # One dispatch for every KV-cache group held on one device: rcv i32[G, 3, K], ks i32[G].
    return tuple(_put_cells_loop(buf, rcv[g], ks[g]) for g, buf in enumerate(bufs))


@functools.partial(jax.jit, donate_argnums=0)
def _put_packed(bufs: tuple, packed: jax.Array) -> tuple:
    # What _put_cells_groups does, from one array: packed i32[G + 3 G K] holds the G counts,
    # then each group's rows, columns and values (K each), as the shard's compiled apply
    # writes them (shard/frame.py). The dispatch itself costs the same as with two host
    # arguments (scripts/bench_frame.py --device-options): ~60-130 us of CPU each at commit
    # cadence on 2 cores, against 12-20 us back to back.
    n = len(bufs)
    k = (packed.shape[0] - n) // (3 * n)
    return tuple(
        _put_cells_loop(buf, packed[n + 3 * g * k : n + 3 * (g + 1) * k].reshape(3, k), packed[g])
        for g, buf in enumerate(bufs)
    )


def cell_bucket(n: int) -> int:
    return next(b for b in CELL_BUCKETS if b >= n)


@functools.partial(jax.jit, donate_argnums=0)
def scatter_rows(buf: jax.Array, idx: jax.Array, rows: jax.Array) -> jax.Array:
    """``buf`` (donated) with ``buf[idx[k]] = rows[k]``; out-of-range ``idx`` entries are
    padding and write nothing. Any shape: a table block ``i32[B, P]`` with rows ``i32[K,
    P]``, or a KV block ``[pages, ...]`` with pages ``[K, ...]``."""
    return buf.at[idx].set(rows, mode="drop")


def bucket_sizes(block_rows: int) -> tuple[int, ...]:
    """Index-batch sizes compiled for a block of ``block_rows`` rows: 8, 16, 32, ... and the
    block itself, so any dirty count pads to at most twice its size."""
    sizes = []
    size = _MIN_BUCKET
    while size < block_rows:
        sizes.append(size)
        size *= _BUCKET_GROWTH
    sizes.append(block_rows)
    return tuple(sizes)


def row_blocks(
    shape: tuple[int, int], sharding: jax.sharding.Sharding
) -> dict[jax.Device, tuple[int, int]]:
    """Row range ``(start, stop)`` held by each addressable device; columns must be whole."""
    blocks = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        rows, cols = index
        if cols.indices(shape[1]) != (0, shape[1], 1):
            raise ValueError(
                f"the page table must not be split along pages; sharding {sharding} splits "
                f"columns as {cols} on {device}"
            )
        start, stop, _ = rows.indices(shape[0])
        blocks[device] = (start, stop)
    return blocks


class DeviceRows:
    """Device buffers for rows ``[lo, hi)`` of a ``[R, P]`` int32 table on this process.

    Args:
      shape: global ``(R, P)``.
      sharding: the table's sharding; every addressable device whose row block intersects
        ``[lo, hi)`` must hold a block entirely inside it.
      host: ``i32[hi - lo, P]`` initial content of the rows.
      lo, hi: the row range this object owns (default: every row).
      warmup: compile every bucket size on every device now instead of on first use.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        sharding: jax.sharding.Sharding,
        host: np.ndarray,
        lo: int = 0,
        hi: int | None = None,
        *,
        warmup: bool = True,
    ) -> None:
        hi = shape[0] if hi is None else hi
        self.shape = shape
        self.sharding = sharding
        self.lo, self.hi = lo, hi
        blocks = {}
        for device, (start, stop) in row_blocks(shape, sharding).items():
            if stop <= lo or start >= hi:
                continue
            if start < lo or stop > hi:
                raise ValueError(
                    f"device {device} holds rows [{start}, {stop}) which straddle the owned "
                    f"range [{lo}, {hi})"
                )
            blocks[device] = (start, stop)
        if not blocks:
            raise ValueError(f"no addressable device holds rows [{lo}, {hi})")
        self._blocks = blocks  # device -> (start, stop), global rows
        # block start -> devices holding that block (replicas along non-row mesh axes)
        self._replicas: dict[int, list[jax.Device]] = {}
        for device, (start, _) in blocks.items():
            self._replicas.setdefault(start, []).append(device)
        self._starts = np.array(sorted(self._replicas), dtype=np.int64)
        self.block_rows = next(iter(blocks.values()))[1] - next(iter(blocks.values()))[0]
        self._buckets = bucket_sizes(self.block_rows)
        # (rows per block, blocks, cell buckets) when the blocks tile [lo, hi) in order from
        # lo, the layout a shard's compiled apply packs for; else None (no packed updates).
        tiled = self._starts.tolist() == list(range(lo, hi, self.block_rows))
        self._block_devices = [self._replicas[start] for start in self._starts.tolist()]
        self.packing = (
            (self.block_rows, len(self._starts), np.array(CELL_BUCKETS, np.int64))
            if tiled
            else None
        )
        self._buffers: dict[jax.Device, jax.Array] = {}
        self.reset(host)
        if warmup:
            self._warmup()

    @property
    def devices(self) -> list[jax.Device]:
        return list(self._blocks)

    def buffers(self) -> list[jax.Array]:
        """The current per-device buffers (invalidated by the next :meth:`update`)."""
        return list(self._buffers.values())

    def reset(self, host: np.ndarray) -> None:
        """Upload ``host`` (``i32[hi - lo, P]``) to every owned device, replacing all rows."""
        for device, (start, stop) in self._blocks.items():
            # A private copy: on CPU, device_put may alias an aligned numpy buffer, and the
            # host table keeps changing after this call.
            block = np.array(host[start - self.lo : stop - self.lo], dtype=np.int32, copy=True)
            self._buffers[device] = jax.device_put(block, device)

    def update(self, rows: np.ndarray, source: np.ndarray, whole_below: int = 0) -> int:
        """Publish global ``rows`` (sorted, unique, inside ``[lo, hi)``) from ``source``.

        ``source`` is ``i32[hi - lo, P]`` indexed by ``row - lo``. A block lying entirely
        below ``whole_below`` may be uploaded whole from ``source`` when much of it changed
        (a block copy beats a large scatter); pass 0 when rows of ``source`` other than
        ``rows`` must not be published. Whole rows are sent: commits use
        :meth:`update_cells`; this path serves rollback. Returns the number of dispatches.
        """
        if rows.size == 0:
            return 0
        dispatches = 0
        for start, i, j in self._spans(rows):
            k = j - i
            if self._mostly_changed(start, k, self.block_rows, whole_below):
                self._put_block(start, source)
            else:
                bucket = next(b for b in self._buckets if b >= k)
                idx = np.full(bucket, self.block_rows, dtype=np.int32)
                idx[:k] = rows[i:j] - start
                take = np.empty(bucket, dtype=np.int64)
                take[:k] = rows[i:j] - self.lo
                take[k:] = take[k - 1]  # padding repeats a real row; its index is dropped
                vals = source.take(take, axis=0)
                for device in self._replicas[start]:
                    self._buffers[device] = scatter_rows(self._buffers[device], idx, vals)
            dispatches += len(self._replicas[start])
        return dispatches

    def _cuts(self, rows: np.ndarray) -> list[int]:
        """Where sorted global ``rows`` cross into each owned block: ``rows[c[b]:c[b + 1]]``
        lie in the block starting at ``self._starts[b]``."""
        return [0, *np.searchsorted(rows, self._starts[1:]).tolist(), rows.size]

    def _spans(self, rows: np.ndarray) -> list[tuple[int, int, int]]:
        """``(block start, i, j)`` for each owned block that ``rows[i:j]`` (sorted global
        rows) fall in, skipping blocks none falls in."""
        cut = self._cuts(rows)
        return [
            (start, i, j)
            for start, i, j in zip(self._starts.tolist(), cut[:-1], cut[1:], strict=True)
            if i != j
        ]

    def _mostly_changed(self, start: int, changed: int, size: int, whole_below: int) -> bool:
        """Whether to upload the block starting at global row ``start`` whole: it lies below
        ``whole_below`` and ``changed`` of its ``size`` entries (rows or cells) are at least
        1/_WHOLE_BLOCK_FRACTION of them."""
        return changed * _WHOLE_BLOCK_FRACTION >= size and start + self.block_rows <= whole_below

    def _put_block(self, start: int, source: np.ndarray) -> None:
        """Upload the block starting at global row ``start`` whole from ``source`` (indexed
        by ``row - lo``) to every device holding it."""
        block = np.array(source[start - self.lo : start - self.lo + self.block_rows], np.int32)
        for device in self._replicas[start]:
            self._buffers[device] = jax.device_put(block, device)

    def _put_block_cells(
        self, start: int, rows: np.ndarray, cols: np.ndarray, source: np.ndarray
    ) -> None:
        """Write the cells ``(rows, cols)`` of the block starting at global row ``start``
        from ``source`` (indexed by ``row - lo``), in chunks of the largest bucket."""
        for a in range(0, rows.size, CELL_BUCKETS[-1]):
            n = min(CELL_BUCKETS[-1], rows.size - a)
            rcv = np.zeros((3, cell_bucket(n)), dtype=np.int32)
            kernels.pack_cells(rcv, (rows, cols), source, self.lo, start, (a, a + n))
            k = np.int32(n)
            for device in self._replicas[start]:
                self._buffers[device] = _put_cells(self._buffers[device], rcv, k)

    def update_cells(
        self, rows: np.ndarray, cols: np.ndarray, source: np.ndarray, whole_below: int = 0
    ) -> None:
        """Publish the cells ``(rows[i], cols[i])`` (global rows, non-decreasing) from
        ``source``; a block below ``whole_below`` that mostly changed is uploaded whole."""
        if rows.size == 0:
            return
        cells = self.block_rows * self.shape[1]
        for start, i, j in self._spans(rows):
            if self._mostly_changed(start, j - i, cells, whole_below):
                self._put_block(start, source)
            else:
                self._put_block_cells(start, rows[i:j], cols[i:j], source)

    def _warmup(self) -> None:
        # Compile the cell update for every bucket on every device (writing nothing). The
        # row scatter (rollback, very large updates) compiles on first use.
        for device in self._blocks:
            for bucket in CELL_BUCKETS:
                rcv = np.zeros((3, bucket), dtype=np.int32)
                self._buffers[device] = _put_cells(self._buffers[device], rcv, np.int32(0))

    def to_numpy(self) -> np.ndarray:
        """``i32[hi - lo, P]`` copy of the owned rows as the devices hold them."""
        out = np.empty((self.hi - self.lo, self.shape[1]), dtype=np.int32)
        for start in self._starts.tolist():
            device = self._replicas[start][0]
            stop = self._blocks[device][1]
            out[start - self.lo : stop - self.lo] = np.asarray(self._buffers[device])
        return out


class GroupUpdate(NamedTuple):
    """One group's change for :func:`update_groups`: what :meth:`DeviceRows.update_cells`
    takes."""

    rows: np.ndarray  # i32[k] the rows the group's batch touched (local)
    source: np.ndarray  # i32[hi - lo, P] the group's table, indexed by ``row - lo``
    whole_below: int  # blocks below this global row may be uploaded whole
    cells: tuple[np.ndarray, np.ndarray]  # (i64[n] global rows, non-decreasing; i64[n] cols)


def update_groups(groups: Sequence[DeviceRows], updates: Sequence[GroupUpdate | None]) -> None:
    """Publish several groups' changes (one :class:`GroupUpdate` each, or None) on device
    blocks they share, with one dispatch per device where every group's change in a block is
    a small cell batch (the decode case); other blocks take the per-group path.
    All groups must cover the same rows with the same sharding.
    """
    first = groups[0]
    n = len(groups)
    # Per group: cell cut points per block (or None when the group has nothing to send).
    cuts = [None if u is None or u.rows.size == 0 else first._cuts(u.cells[0]) for u in updates]
    for b, start in enumerate(first._starts.tolist()):
        spans = [None if cut is None else (cut[b], cut[b + 1]) for cut in cuts]
        if all(sp is None or sp[0] == sp[1] for sp in spans):
            continue
        sizes = [0 if sp is None else sp[1] - sp[0] for sp in spans]
        if max(sizes) > CELL_BUCKETS[-1]:
            for g, u in enumerate(updates):
                if sizes[g]:
                    ci, cj = spans[g]
                    rows, cols = u.cells
                    groups[g].update_cells(rows[ci:cj], cols[ci:cj], u.source, u.whole_below)
            continue
        k = cell_bucket(max(sizes))
        packed = np.zeros(n + 3 * n * k, dtype=np.int32)
        packed[:n] = sizes
        for g, u in enumerate(updates):
            if sizes[g]:
                rcv = packed[n + 3 * g * k : n + 3 * (g + 1) * k].reshape(3, k)
                kernels.pack_cells(rcv, u.cells, u.source, groups[g].lo, start, spans[g])
        _put_on(groups, first._replicas[start], packed)


def publish_packed(groups: Sequence[DeviceRows], packed: np.ndarray, touched: np.ndarray) -> None:
    """Publish a packed update (``shard.frame.apply_groups``): for each block index in
    ``touched``, ``packed[block]`` (``i32[G + 3 G K]``, every group's changed cells there)
    goes to each device holding that block in one dispatch. ``groups`` share their blocks
    (:attr:`DeviceRows.packing`)."""
    by_block = groups[0]._block_devices
    puts = [(device, packed[b]) for b in touched.tolist() for device in by_block[b]]
    for device, cells in puts:  # the dispatches back to back
        new = _put_packed(tuple([dev._buffers[device] for dev in groups]), cells)
        for dev, buf in zip(groups, new, strict=True):
            dev._buffers[device] = buf


def _put_on(
    groups: Sequence[DeviceRows], devices: Sequence[jax.Device], packed: np.ndarray
) -> None:
    for device in devices:
        new = _put_packed(tuple([dev._buffers[device] for dev in groups]), packed)
        for dev, buf in zip(groups, new, strict=True):
            dev._buffers[device] = buf


def warmup_groups(groups: Sequence[DeviceRows]) -> None:
    """Compile the fused cell update of :func:`update_groups` and :func:`publish_packed` on
    every device, for every bucket size (writing nothing)."""
    first = groups[0]
    n = len(groups)
    for device in first._blocks:
        for bucket in CELL_BUCKETS:
            _put_on(groups, [device], np.zeros(n + 3 * n * bucket, dtype=np.int32))


def assemble(
    shape: tuple[int, int], sharding: jax.sharding.Sharding, buffers: Sequence[jax.Array]
) -> jax.Array:
    """The global array over ``sharding`` from this process's per-device buffers (metadata only)."""
    if len(buffers) == 1 and isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return buffers[0]
    return jax.make_array_from_single_device_arrays(shape, sharding, list(buffers))
