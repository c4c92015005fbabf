"""A shard: the numpy tables of its rows per group, their device buffers and its epoch.

The same class runs inside the driver (``backend="local"``) and inside a Ray actor
(``backend="ray"``). Its only input is wire bytes; it applies an epoch's batch with
vectorised numpy, updates just the touched rows on its devices, and can step back one epoch
(the undo of the last batch is kept) so a commit that failed elsewhere publishes nowhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import jax
import numpy as np

from . import checksum, kernels
from .checksum import segment_index
from .constants import PAGE_TABLE_PADDING_VAL
from .device import DeviceRows, assemble, update_groups, warmup_groups
from .errors import WireFormatError
from .layout import ShardLayout
from .wire import OP_APPEND, GroupBatch, WireLimits, decode, encode, state_batch


@dataclass(frozen=True)
class ShardSpec:
    """What a shard needs to build itself; identical in every process.

    Args:
      shard_id: this shard's index.
      layout: the routing layout (rows, shards, device blocks).
      widths: pages per row of each KV-cache group.
      warmup: compile the device update buckets at start-up.
    """

    shard_id: int
    layout: ShardLayout
    widths: tuple[int, ...]
    warmup: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.shard_id < self.layout.num_shards:
            raise ValueError(
                f"shard_id={self.shard_id} is out of range for {self.layout.num_shards} shards"
            )


@dataclass(frozen=True)
class Ack:
    """A shard's answer to a batch: the epoch it now holds and the checksum of its rows."""

    shard: int
    epoch: int
    checksum: int
    rows: int
    applied: bool


def check_group(counts: np.ndarray, batch: GroupBatch, g: int) -> np.ndarray:
    """Refuse a batch whose appends do not start at the rows' held counts; returns the
    held counts of the batch's rows. (Numpy reference of ``kernels.first_bad_append``, which
    ``Shard.apply`` uses.)"""
    held = counts[batch.row]
    bad = (held != batch.start) & (batch.op == OP_APPEND)
    if bad.any():
        i = int(bad.nonzero()[0][0])
        raise WireFormatError(
            f"group {g}: APPEND to local row {int(batch.row[i])} starts at "
            f"{int(batch.start[i])} but the row holds {int(held[i])} pages"
        )
    return held


def apply_group(
    table: np.ndarray,
    counts: np.ndarray,
    batch: GroupBatch,
    held: np.ndarray | None = None,
    cells: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Write ``batch`` into ``table`` (``i32[rows, P]``) and ``counts`` without a Python loop.

    ``held`` (the rows' current counts) and ``cells`` (``segment_index`` of the written
    cells) may be passed when the caller has them already.
    """
    if batch.size == 0:
        return
    old = counts[batch.row] if held is None else held
    shrink = old > batch.count
    if shrink.any():
        r, c = segment_index(batch.row[shrink], batch.count[shrink], old[shrink])
        table[r, c] = PAGE_TABLE_PADDING_VAL
    r, c = segment_index(batch.row, batch.start, batch.count) if cells is None else cells
    table[r, c] = batch.pages
    counts[batch.row] = batch.count


@dataclass
class _Undo:
    epoch: int
    digest: bytes | None
    checksum: int
    # per group: rows touched, old counts, old checksum terms, replaced-row mask, old rows
    # of the replaced ones
    groups: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None]


class Shard:
    """Rows ``layout.shard_rows(shard_id)`` of every group, on the host and on devices."""

    def __init__(self, spec: ShardSpec, sharding: jax.sharding.Sharding) -> None:
        layout = spec.layout
        rows = layout.shard_rows(spec.shard_id)
        self.spec = spec
        self.sharding = sharding
        self.lo, self.hi = rows.start, rows.stop
        self.limits = WireLimits(layout.rows_per_shard, spec.widths)
        n = layout.rows_per_shard
        self.tables = [np.full((n, w), PAGE_TABLE_PADDING_VAL, np.int32) for w in spec.widths]
        self.counts = [np.zeros(n, np.int32) for _ in spec.widths]
        self.inner = [np.zeros(n, np.uint64) for _ in spec.widths]  # checksum terms per row
        self.checksum = 0
        self.epoch = 0
        self._digest: bytes | None = None
        self._undo: _Undo | None = None
        # Checksum tables the compiled apply reads: column weights per group, row mixes.
        self._col_w = [checksum.col_weights(np.arange(w)) for w in spec.widths]
        self._mix_size = checksum.table_size(layout.max_num_reqs)
        self.devices = [
            DeviceRows(
                (layout.max_num_reqs, w), sharding, table, self.lo, self.hi, warmup=spec.warmup
            )
            for w, table in zip(spec.widths, self.tables, strict=True)
        ]
        if spec.warmup:
            warmup_groups(self.devices)
            self._warm_kernels()

    def _warm_kernels(self) -> None:
        """Compile (or load from numba's cache) the apply kernels for the argument types a
        decoded message has (read-only int32 columns), before the first commit."""
        empty = np.frombuffer(b"", dtype="<i4")
        none = np.empty(0, np.int64)
        kernels.check_values(empty, empty, empty, empty, empty, 1, 1)
        for g in range(len(self.tables)):
            kernels.first_bad_append(self.counts[g], empty, empty, empty)
            kernels.apply_batch(
                self.tables[g],
                self.counts[g],
                self.inner[g],
                empty,
                empty,
                empty,
                empty,
                self._col_w[g],
                checksum.row_mix_table(g, self._mix_size),
                self.lo,
                checksum.C_COUNT,
                none,
                none,
            )

    def _ack(self, rows: int, applied: bool) -> Ack:
        return Ack(self.spec.shard_id, self.epoch, self.checksum, rows, applied)

    def status(self) -> Ack:
        """The epoch this shard holds and the checksum of its rows."""
        return self._ack(0, applied=False)

    def apply(self, message: bytes) -> Ack:
        """Apply one epoch's batch; a re-sent epoch is acknowledged without applying it again."""
        batch = decode(message, self.limits)
        if batch.shard != self.spec.shard_id:
            raise WireFormatError(
                f"batch for shard {batch.shard} sent to shard {self.spec.shard_id}"
            )
        digest = hashlib.blake2b(message, digest_size=16).digest()
        if batch.epoch == self.epoch:
            if digest != self._digest:
                raise WireFormatError(f"epoch {batch.epoch} was already applied with other content")
            return self._ack(batch.rows, applied=False)
        if batch.base != self.epoch:
            raise WireFormatError(
                f"batch for epoch {batch.epoch} builds on epoch {batch.base}, "
                f"but shard {self.spec.shard_id} holds epoch {self.epoch}"
            )
        for g, gb in enumerate(batch.groups):
            bad = kernels.first_bad_append(self.counts[g], gb.op, gb.row, gb.start)
            if bad >= 0:
                raise WireFormatError(
                    f"group {g}: APPEND to local row {int(gb.row[bad])} starts at "
                    f"{int(gb.start[bad])} but the row holds {int(self.counts[g][gb.row[bad]])} "
                    "pages"
                )
        undo = _Undo(self.epoch, self._digest, self.checksum, [])
        total = self.checksum
        device_updates: list = [None] * len(batch.groups)
        mix_size = self._mix_size
        for g, gb in enumerate(batch.groups):
            if gb.size == 0:
                undo.groups.append(None)
                continue
            rows = gb.row
            held = self.counts[g][rows]
            replaced = gb.op != OP_APPEND
            # Appends are undone by truncation; only replaced rows need their old content.
            undo.groups.append(
                (rows, held, self.inner[g][rows], replaced, self.tables[g][rows[replaced]])
            )
            size = int(np.maximum(gb.count, held).sum(dtype=np.int64) - gb.start.sum())
            cells_r = np.empty(size, np.int64)
            cells_c = np.empty(size, np.int64)
            delta, n = kernels.apply_batch(
                self.tables[g],
                self.counts[g],
                self.inner[g],
                rows,
                gb.start,
                gb.count,
                gb.pages,
                self._col_w[g],
                checksum.row_mix_table(g, mix_size),
                self.lo,
                checksum.C_COUNT,
                cells_r,
                cells_c,
            )
            total = checksum.add(total, int(delta))
            # Changed cells: the written ones, plus the tail a shorter row left behind.
            device_updates[g] = (
                rows + self.lo,
                self.tables[g],
                self.hi,
                (cells_r[:n] + self.lo, cells_c[:n]),
            )
        update_groups(self.devices, device_updates)
        self._undo = undo
        self.checksum = total
        self.epoch = batch.epoch
        self._digest = digest
        return self._ack(batch.rows, applied=True)

    def rollback(self, epoch: int) -> Ack:
        """Step back from ``epoch`` to the epoch before it (no-op if ``epoch`` is not held)."""
        if self.epoch != epoch:
            return self._ack(0, applied=False)
        undo = self._undo
        if undo is None:
            raise RuntimeError(f"shard {self.spec.shard_id} cannot step back from epoch {epoch}")
        for g, entry in enumerate(undo.groups):
            if entry is None:
                continue
            rows, counts, inner, replaced, old_rows = entry
            table = self.tables[g]
            appended = ~replaced
            r, c = segment_index(rows[appended], counts[appended], self.counts[g][rows[appended]])
            table[r, c] = PAGE_TABLE_PADDING_VAL
            table[rows[replaced]] = old_rows
            self.counts[g][rows] = counts
            self.inner[g][rows] = inner
            self.devices[g].update(rows + self.lo, table, whole_below=self.hi)
        self.epoch, self._digest, self.checksum = undo.epoch, undo.digest, undo.checksum
        self._undo = None
        return self._ack(0, applied=True)

    def reseed(self, message: bytes | None) -> Ack:
        """Replace every row with a full-state message (``wire.state_batch``; None: empty).

        Used to rebuild a replaced shard from the coordinator's published tables.
        """
        batch = decode(message, self.limits) if message is not None else None
        if batch is not None and batch.shard != self.spec.shard_id:
            raise WireFormatError(f"state for shard {batch.shard} sent to {self.spec.shard_id}")
        total = 0
        for g, table in enumerate(self.tables):
            table.fill(PAGE_TABLE_PADDING_VAL)
            self.counts[g].fill(0)
            self.inner[g].fill(0)
            if batch is not None:
                gb = batch.groups[g]
                apply_group(table, self.counts[g], gb)
                self.inner[g][gb.row] = checksum.updated_inner(
                    self.inner[g][gb.row], gb.start, gb.count, gb.pages
                )
                total = checksum.add(
                    total,
                    checksum.total_delta(
                        g, gb.row + self.lo, np.zeros(gb.size, np.uint64), self.inner[g][gb.row]
                    ),
                )
            self.devices[g].reset(table)
        self.checksum = total
        self.epoch = batch.epoch if batch is not None else 0
        self._digest, self._undo = None, None
        return self._ack(0, applied=True)

    def export(self) -> bytes | None:
        """This shard's rows as a full-state message at its epoch (None at epoch 0)."""
        if self.epoch == 0:
            return None
        return encode(state_batch(self.epoch, self.spec.shard_id, self.tables, self.counts))

    def buffers(self, group: int) -> list[jax.Array]:
        return self.devices[group].buffers()

    def group_arrays(self) -> list[jax.Array]:
        """Each group's global array built from this process's buffers (multi-controller)."""
        return [assemble(d.shape, self.sharding, d.buffers()) for d in self.devices]

    def snapshot(self, group: int) -> np.ndarray:
        """``i32[rows_per_shard, P]`` copy of this shard's rows as its devices hold them."""
        return self.devices[group].to_numpy()
