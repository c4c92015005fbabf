"""A shard: the tables of its rows per KV-cache group, their device buffers and its epoch.

The same class serves both backends: in the driver (``backend="local"``, handed batches as
values) and inside a Ray actor (``backend="ray"``, which decodes wire bytes first). It
applies an epoch's batch in one compiled pass (:mod:`.frame`; a frame that arrives as wire
bytes is read and applied in the same call), updates just the changed cells on its devices
(one dispatch per device), reports the checksum of what it now holds, and can step back one
epoch (it keeps the undo of its last batch) so a commit that failed elsewhere publishes
nowhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import numpy as np

from ..constants import (
    GENERATION_STEP,
    MAX_FIRST_COUNTER,
    MAX_GENERATION,
    PAGE_TABLE_PADDING_VAL,
)
from ..errors import FencedError, WireFormatError
from ..routing.layout import ShardLayout
from ..routing.mesh import shard_rows_sharding
from ..rows import checksum, kernels
from ..rows.checksum import GroupConsts, segment_index
from ..rows.device import (
    DeviceRows,
    GroupUpdate,
    assemble,
    publish_packed,
    update_groups,
    warmup_groups,
)
from ..rows.messages import Ack, GroupBatch, ShardBatch
from . import frame
from .frame import Applied, apply_frame
from .step import SavedStep, ShardStep, StepConfig, StepState, shard_step
from .step_inputs import StepInputs
from .wire import VERSION, WireLimits, batch_of, decode, decode_columns, encode
from .wire import warm_up as wire_warm_up


@dataclass(frozen=True)
class ShardSpec:
    """What a shard needs to build itself; identical in every process.

    Args:
      shard_id: this shard's index.
      layout: the routing layout (rows, shards, device blocks).
      widths: pages per row of each KV-cache group.
      warmup: compile the device update buckets and kernels at start-up.
      step: page sizes and token budget for building step inputs (None: no schedules).
    """

    shard_id: int
    layout: ShardLayout
    widths: tuple[int, ...]
    warmup: bool = True
    step: StepConfig | None = None

    @property
    def shape(self) -> list:
        """What a shard and a coordinator must agree on to share a table: rows, shards,
        device blocks and pages per row of each group."""
        layout = self.layout
        return [layout.max_num_reqs, layout.num_shards, layout.num_blocks, list(self.widths)]

    def __post_init__(self) -> None:
        if not 0 <= self.shard_id < self.layout.num_shards:
            raise ValueError(
                f"shard_id={self.shard_id} is out of range for {self.layout.num_shards} shards"
            )


def batch_digest(batch: ShardBatch) -> bytes:
    """Identity of a batch's content (to tell a re-sent epoch from a different one)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.array([batch.epoch, batch.base, batch.shard], np.int64).tobytes())
    cols = [c for g in batch.groups for c in (g.op, g.row, g.start, g.count, g.pages)]
    if batch.schedule is not None:
        cols += [batch.schedule.sched, batch.schedule.done]
    for col in [*cols, *batch.kv_copies]:
        h.update(np.int64(col.size).tobytes())
        h.update(np.ascontiguousarray(col, dtype="<i4").tobytes())
    return h.digest()


def check_appends(counts: np.ndarray, batch: GroupBatch, group: int) -> None:
    """Refuse ``batch`` (of group ``group``) if an APPEND does not start at its row's held
    count in ``counts``: the shard and the sender disagree about that row."""
    bad = kernels.first_bad_append(counts, batch)
    if bad >= 0:
        raise WireFormatError(
            f"group {group}: APPEND to local row {int(batch.row[bad])} starts at "
            f"{int(batch.start[bad])} but the row holds {int(counts[batch.row[bad]])} pages"
        )


class _GroupUndo(NamedTuple):
    rows: np.ndarray  # i32[k] local rows the batch touched
    before: kernels.Before  # their counts, terms and rewritten rows before it


class _GroupUndos(Sequence):
    """Per group, the :class:`_GroupUndo` of a batch (None for a group it left alone), cut
    from the whole batch's record (:class:`~.frame.Applied`) only when a rollback reads it:
    the frames that are never rolled back (nearly all) pay for one object."""

    def __init__(self, batch: ShardBatch, applied: Applied, widths: Sequence[int]) -> None:
        self._groups, self._applied, self._widths = batch.groups, applied, widths

    def __len__(self) -> int:
        return len(self._groups)

    def __getitem__(self, g: int) -> _GroupUndo | None:  # type: ignore[override]
        gb = self._groups[g]
        if not gb.size:
            return None
        first = sum(b.size for b in self._groups[:g])
        return _GroupUndo(gb.row, self._applied.before(g, first, gb.size, self._widths[g]))


@dataclass
class _Undo:
    epoch: int
    applied: ShardBatch | bytes | None  # the message of that epoch
    checksum: int
    groups: Sequence[_GroupUndo | None]
    step: SavedStep | None = None  # the step state before the epoch


class Shard:
    """Rows ``layout.shard_rows(shard_id)`` of every group, on the host and on devices."""

    def __init__(self, spec: ShardSpec, sharding: jax.sharding.Sharding) -> None:
        layout = spec.layout
        rows = layout.shard_rows(spec.shard_id)
        self.spec = spec
        self.sharding = sharding
        self.lo, self.hi = rows.start, rows.stop
        self.limits = WireLimits.for_layout(layout, spec.widths)
        n = layout.rows_per_shard
        self.tables = [np.full((n, w), PAGE_TABLE_PADDING_VAL, np.int32) for w in spec.widths]
        self.counts = [np.zeros(n, np.int32) for _ in spec.widths]
        self.inner = [np.zeros(n, np.uint64) for _ in spec.widths]  # checksum terms per row
        self.consts = [
            GroupConsts.build(g, w, layout.max_num_reqs, self.lo) for g, w in enumerate(spec.widths)
        ]
        self.checksum = 0
        self.epoch = 0
        self.generation = 0  # the coordinator this shard obeys (see fence)
        self._applied: ShardBatch | bytes | None = None  # the message of this epoch
        self._undo: _Undo | None = None
        # Its own device blocks, or (shards sharing a device) buffers of its own rows there.
        own = shard_rows_sharding(sharding, layout, spec.shard_id)
        self.devices = [
            # The fused update below is what commits use; the per-group one (blocks with
            # more changed cells than the largest bucket) compiles on first use.
            DeviceRows((layout.max_num_reqs, w), own, table, self.lo, self.hi, warmup=False)
            for w, table in zip(spec.widths, self.tables, strict=True)
        ]
        self.step = None
        if spec.step is not None:
            self.step = StepState(spec.step, sharding, layout.num_shards, spec.shard_id, self.lo)
        if spec.warmup:
            warmup_groups(self.devices)  # the step build compiles on the first schedule
            for g, consts in enumerate(self.consts):
                kernels.warm_up(self.tables[g], self.counts[g], self.inner[g], consts)
            self._warm_up_apply()

    def _ack(self, rows: int, applied: bool, apply_us: int = 0) -> Ack:
        return Ack(
            self.spec.shard_id, self.epoch, self.checksum, rows, applied, self.generation, apply_us
        )

    def status(self) -> Ack:
        """The epoch this shard holds and the checksum of its rows."""
        return self._ack(0, applied=False)

    def fence(self, generation: int) -> Ack:
        """Obey the coordinator of ``generation`` from now on: commits, rollbacks, re-seeds
        and exports of any other generation are refused.

        A lower generation raises ``FencedError``. ``WireFormatError`` refuses one that is
        not an int in ``0..MAX_GENERATION`` (no ack could carry it) or whose take-over
        counter jumps more than ``GENERATION_STEP`` past this shard's (``MAX_FIRST_COUNTER``
        for a shard that obeys no coordinator yet): one call must not use up the counters
        later take-overs need. A refused fence changes nothing.
        """
        if type(generation) is not int:
            raise WireFormatError(f"generation must be an int, got {type(generation).__name__}")
        if not 0 <= generation <= MAX_GENERATION:
            shown = f"{generation:#x}" if generation.bit_length() <= 80 else "out of range"
            raise WireFormatError(
                f"generation {shown} ({generation.bit_length()} bits) is not in 0..2**64-1"
            )
        if generation < self.generation:
            raise FencedError(generation, self.generation)
        counter, own = generation >> 32, self.generation >> 32
        limit = own + GENERATION_STEP if self.generation else MAX_FIRST_COUNTER
        if counter > limit:
            raise WireFormatError(
                f"generation {generation:#x} jumps shard {self.spec.shard_id}'s take-over "
                f"counter from {own} to {counter}; a fence may raise it to {limit} at most "
                "(a take-over adds 1)"
            )
        self.generation = generation
        return self._ack(0, applied=False)

    def _obey(self, generation: int) -> None:
        if generation < self.generation:
            raise FencedError(generation, self.generation)
        if generation != self.generation:
            raise WireFormatError(
                f"generation {generation:#x} has not fenced shard {self.spec.shard_id} "
                f"(it obeys {self.generation:#x})"
            )

    def _check(self, batch: ShardBatch) -> None:
        """Refuse a batch that is not the next epoch for this shard's rows."""
        if batch.shard != self.spec.shard_id:
            raise WireFormatError(
                f"batch for shard {batch.shard} sent to shard {self.spec.shard_id}"
            )
        if batch.base != self.epoch:
            raise WireFormatError(
                f"batch for epoch {batch.epoch} builds on epoch {batch.base}, "
                f"but shard {self.spec.shard_id} holds epoch {self.epoch}"
            )
        if len(batch.groups) != len(self.tables):
            raise WireFormatError(f"batch has {len(batch.groups)} groups, shard {len(self.tables)}")
        if self.step is None and batch.schedule is not None:
            raise WireFormatError(f"shard {self.spec.shard_id} was built without step inputs")
        # APPENDs are checked against the held counts by frame.apply_groups before it
        # writes anything (see _apply_rows).

    def _decoded(self, batch: ShardBatch | bytes) -> ShardBatch:
        return batch if isinstance(batch, ShardBatch) else decode(batch, self.limits)

    def _decoded_columns(
        self, batch: ShardBatch | bytes
    ) -> tuple[ShardBatch, np.ndarray, np.ndarray]:
        """The batch, and its columns as frame.apply_groups takes them."""
        if isinstance(batch, ShardBatch):
            return batch, *frame.flat_columns(batch.groups)
        return decode_columns(batch, self.limits)

    _batch_consts: frame.Consts | None = None  # built on first use (_consts_of)

    def _consts_of(self) -> frame.Consts:
        consts = self._batch_consts
        if consts is None or consts.source is not self.consts:
            consts = self._batch_consts = frame.Consts.of(self.consts)
        return consts

    def _warm_up_apply(self) -> None:
        """Compile (or load) what :meth:`apply` runs on a frame before the first one: the
        general path, and the one-call path on a frame it refuses (this shard's epoch)."""
        wire_warm_up(self.limits)
        packing = self.devices[0].packing
        frame.warm_up(self.tables, self.counts, self.inner, self._consts_of(), packing)
        empty = GroupBatch.empty()
        message = encode(ShardBatch(self.epoch + 1, self.epoch, 0, (empty,) * len(self.tables)))
        state = (tuple(self.tables), tuple(self.counts), tuple(self.inner))
        if apply_frame(
            message, VERSION, self.limits, -1, self.epoch, self.generation, True, state,
            self._consts_of(), packing,
        ) is not None:  # fmt: skip
            raise AssertionError("a frame for another shard was applied")

    def _apply_rows(self, batch: ShardBatch, cols: np.ndarray, offs: np.ndarray) -> Applied:
        """Apply a checked batch's rows to every group in one compiled pass (refusing it,
        unchanged, if an APPEND does not start at its row's held count)."""
        applied = frame.apply_groups(
            tuple(self.tables), tuple(self.counts), tuple(self.inner), self._consts_of(),
            cols, offs, self.devices[0].packing,
        )  # fmt: skip
        if applied.bad is not None:
            g, i = applied.bad
            gb = batch.groups[g]
            raise WireFormatError(
                f"group {g}: APPEND to local row {int(gb.row[i])} starts at "
                f"{int(gb.start[i])} but the row holds {int(self.counts[g][gb.row[i]])} pages"
            )
        return applied

    def _publish(self, batch: ShardBatch, applied: Applied) -> None:
        """Tell the devices every changed cell: one dispatch per touched device when the
        batch packed (the decode case), else the per-group path."""
        if applied.packed.size:
            publish_packed(self.devices, applied.packed, applied.touched)
            return
        updates: list[GroupUpdate | None] = []
        first = 0
        for g, gb in enumerate(batch.groups):
            cells = applied.cells(gb, first, self.lo)
            updates.append(GroupUpdate(gb.row, self.tables[g], self.hi, cells) if gb.size else None)
            first += gb.size
        update_groups(self.devices, updates)

    def _undo_of(self, batch: ShardBatch, applied: Applied) -> _Undo:
        groups = _GroupUndos(batch, applied, self.spec.widths)
        return _Undo(self.epoch, self._applied, self.checksum, groups)

    def apply(self, batch: ShardBatch | bytes) -> Ack:
        """Apply one epoch's batch (a value, or wire bytes decoded strictly first); a re-sent
        epoch is acknowledged without applying it again."""
        t0 = time.perf_counter()
        if type(batch) is bytes:  # the usual frame: read and applied in one compiled call
            got = apply_frame(
                batch, VERSION, self.limits, self.spec.shard_id, self.epoch, self.generation,
                self.step is not None, (tuple(self.tables), tuple(self.counts),
                tuple(self.inner)), self._consts_of(), self.devices[0].packing,
            )  # fmt: skip
            if got is not None:
                decoded = batch_of(
                    got.epoch, got.base, self.spec.shard_id, got.generation, got.touched,
                    got.flat, got.offs, got.has_sched,
                )  # fmt: skip
                return self._applied_now(decoded, batch, got.applied, t0)
        message = batch
        batch, cols, offs = self._decoded_columns(batch)
        self._obey(batch.generation)
        if batch.epoch == self.epoch and batch.shard == self.spec.shard_id:
            if not self._same_as_applied(message, batch):
                raise WireFormatError(f"epoch {batch.epoch} was already applied with other content")
            return self._ack(batch.rows, applied=False)
        self._check(batch)
        return self._applied_now(batch, message, self._apply_rows(batch, cols, offs), t0)

    def _applied_now(
        self, batch: ShardBatch, message: ShardBatch | bytes, applied: Applied, t0: float
    ) -> Ack:
        """Finish applying ``batch`` (its rows are in the tables): devices, step state, the
        undo, the new epoch and checksum; the ack."""
        undo = self._undo_of(batch, applied)
        self._publish(batch, applied)
        if self.step is not None:
            undo.step = self.step.saved()
            self.step.advance(batch, self.devices)
        self._undo = undo
        self.checksum = checksum.add(self.checksum, applied.delta)
        self.epoch = batch.epoch
        self._applied = message
        # applied.size is batch.rows: one entry per row update
        return self._ack(applied.size, True, int((time.perf_counter() - t0) * 1e6))

    def _same_as_applied(self, message: ShardBatch | bytes, batch: ShardBatch) -> bool:
        """Whether a re-sent epoch carries what this shard applied for it. Wire bytes compare
        as bytes; otherwise both sides are compared by content (a rare path: the hot one
        keeps the applied message and hashes nothing)."""
        applied = self._applied
        if applied is None:
            return False
        if isinstance(applied, bytes) and isinstance(message, bytes):
            return applied == message
        if not isinstance(applied, ShardBatch):
            applied = decode(applied, self.limits)
        return applied is batch or batch_digest(applied) == batch_digest(batch)

    def rollback(self, epoch: int, generation: int = 0) -> Ack:
        """Step back from ``epoch`` to the epoch before it (no-op if ``epoch`` is not held)."""
        self._obey(generation)
        if self.epoch != epoch:
            return self._ack(0, applied=False)
        undo = self._undo
        if undo is None:
            raise RuntimeError(f"shard {self.spec.shard_id} cannot step back from epoch {epoch}")
        for g, entry in enumerate(undo.groups):
            if entry is None:
                continue
            table, rows, before = self.tables[g], entry.rows, entry.before
            appended = ~before.replaced
            r, c = segment_index(
                rows[appended], before.counts[appended], self.counts[g][rows[appended]]
            )
            table[r, c] = PAGE_TABLE_PADDING_VAL
            table[rows[before.replaced]] = before.old_rows
            self.counts[g][rows] = before.counts
            self.inner[g][rows] = before.inner
            self.devices[g].update(rows + self.lo, table, whole_below=self.hi)
        if self.step is not None and undo.step is not None:
            self.step.restore(undo.step)
        self.epoch, self._applied, self.checksum = undo.epoch, undo.applied, undo.checksum
        self._undo = None
        return self._ack(0, applied=True)

    def reseed(self, batch: ShardBatch | bytes | None, generation: int = 0) -> Ack:
        """Replace every row with a full-state batch (``ShardBatch.full_state``; None: empty).

        Used to rebuild a replaced shard from the coordinator's published rows; a schedule
        in the batch is that epoch's, so a model step can run on the rebuilt shard at once.
        """
        batch = None if batch is None else self._decoded(batch)
        self._obey(generation if batch is None else batch.generation)
        if batch is not None and batch.shard != self.spec.shard_id:
            raise WireFormatError(f"state for shard {batch.shard} sent to {self.spec.shard_id}")
        if batch is not None and len(batch.groups) != len(self.tables):
            raise WireFormatError(f"state has {len(batch.groups)} groups, shard {len(self.tables)}")
        total = 0
        for g, table in enumerate(self.tables):
            table.fill(PAGE_TABLE_PADDING_VAL)
            self.counts[g].fill(0)
            self.inner[g].fill(0)
            if batch is not None:
                delta = kernels.apply_batch_fresh(
                    table, self.counts[g], self.inner[g], batch.groups[g], self.consts[g]
                )
                total = checksum.add(total, delta)
            self.devices[g].reset(table)
        self.checksum = total
        self.epoch = batch.epoch if batch is not None else 0
        self._applied, self._undo = None, None
        if self.step is not None:
            self.step.reset()  # the KV the plan referred to died with the old process
            if batch is not None and batch.schedule is not None:
                self.step.advance(batch, self.devices)  # the epoch's step can run again
        return self._ack(0, applied=True)

    def export(self, generation: int = 0) -> ShardBatch | None:
        """This shard's rows as a full-state batch at its epoch (None at epoch 0), saying how
        many shards the epoch it last applied reached (see ``take_over``)."""
        self._obey(generation)
        if self.epoch == 0:
            return None
        state = ShardBatch.full_state(
            self.epoch, self.spec.shard_id, self.tables, self.counts, generation
        )
        applied = self._applied
        if isinstance(applied, bytes):
            applied = decode(applied, self.limits)
        if applied is None:  # rebuilt at a confirmed epoch: nothing to say
            return state
        return dataclasses.replace(state, touched=applied.touched)

    def drop_kv_copies(self, pools: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Forget pending KV copies from or into the page ``pools`` of replaced shards;
        returns per group the pages whose KV will not arrive (see
        :meth:`StepState.drop_pools`)."""
        if self.step is None:
            return []
        return self.step.drop_pools(pools)

    def step_snapshot(self) -> StepInputs | None:
        """This shard's part of the last epoch's step inputs, as numpy (None without)."""
        return None if self.step is None else self.step.to_numpy()

    def buffers(self, group: int) -> list[jax.Array]:
        return self.devices[group].buffers()

    def group_arrays(self) -> list[jax.Array]:
        """Each group's global array built from this process's buffers (multi-controller)."""
        return [assemble(d.shape, self.sharding, d.buffers()) for d in self.devices]

    def snapshot(self, group: int) -> np.ndarray:
        """``i32[rows_per_shard, P]`` copy of this shard's rows as its devices hold them."""
        return self.devices[group].to_numpy()


def step_of(
    shards: Sequence[Shard], num_shards: int, tables: Sequence[jax.Array] | None = None
) -> ShardStep:
    """The :class:`ShardStep` a ``run_on_shards(fn, step=True)`` function gets, over the
    ``shards`` this process holds: every shard for the local backend (which passes the
    global ``tables`` too), its one shard in a Ray shard process. Raises ``RuntimeError``
    when the shards were built without step inputs."""
    first = shards[0]
    if first.step is None:
        raise RuntimeError("this table's shards build no step inputs")
    states = [s.step for s in shards]
    rows = first.spec.layout.max_num_reqs
    return shard_step(first.epoch, states, first.sharding, num_shards, rows, tables)
