"""What a shard keeps for the model step: the epoch's step inputs and the pending KV copies.

The inputs are built on the shard's own devices (its sub-mesh of the row axis) from its
committed device table and the per-row counts the epoch carries; nothing per token crosses
the wire. They are built when first asked for (by the model step, or a snapshot), not in
the commit: JAX would only queue the work there anyway, and the commit stays the cost of
its row changes. The copy plan is every epoch's ``kv_copies`` composed until a model step takes it,
so two commits without a step in between lose no copy and copy nothing twice. Within a plan
every copy reads before any writes; where a later epoch writes a page an earlier epoch's
copy still reads, the plans stay separate rounds, applied in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..routing.mesh import SHARD_AXIS, shard_mesh, shard_submesh
from ..rows.copies import compose, plan_of
from ..rows.device import DeviceRows, assemble
from ..rows.messages import Schedule, ShardBatch
from .step_inputs import StepInputs, build_step_inputs


@dataclass(frozen=True)
class StepConfig:
    """What building a shard's step needs besides its tables: the group page sizes and the
    shard's token budget."""

    page_sizes: tuple[int, ...]
    tokens_per_shard: int


class SavedStep(NamedTuple):
    """What :meth:`StepState.restore` needs to step back over one :meth:`StepState.advance`."""

    schedule: Schedule | None
    inputs: StepInputs | None
    copies: list[list[dict[int, int]]]  # per group, rounds of destination -> source page
    copies_epoch: int


class StepState:
    """One shard's step inputs and pending KV copies.

    Args:
      config: page sizes and token budget.
      sharding: the row sharding of the global tables (its mesh and row axis).
      num_shards, shard_id, lo: which shard this is and its first global row.
    """

    def __init__(
        self,
        config: StepConfig,
        sharding: NamedSharding,
        num_shards: int,
        shard_id: int,
        lo: int,
    ) -> None:
        self.config = config
        self.row_axis = sharding.spec[0]
        self.mesh = shard_submesh(sharding.mesh, self.row_axis, num_shards, shard_id)
        self.lo = lo
        self.schedule: Schedule | None = None  # the last epoch's, if it had one
        self._inputs: StepInputs | None = None  # built from it on self.mesh, once asked for
        self._devices: Sequence[DeviceRows] = ()
        # per group, rounds of pending copies (destination -> source), applied in order
        self.copies: list[list[dict[int, int]]] = [[] for _ in config.page_sizes]
        # The last epoch that brought copies: every shard was sent it (an epoch with KV
        # copies touches them all), so every process names the pending copies alike.
        self.copies_epoch = 0

    @property
    def inputs(self) -> StepInputs | None:
        """The last epoch's step inputs on this shard's devices (None without a schedule)."""
        if self._inputs is None and self.schedule is not None:
            self._inputs = self._build(self.schedule, self._devices)
        return self._inputs

    def saved(self) -> SavedStep:
        """What :meth:`restore` needs to step back over the next :meth:`advance`."""
        rounds = [[dict(r) for r in g] for g in self.copies]
        return SavedStep(self.schedule, self._inputs, rounds, self.copies_epoch)

    def restore(self, saved: SavedStep) -> None:
        self.schedule, self._inputs = saved.schedule, saved.inputs
        self.copies = [[dict(r) for r in g] for g in saved.copies]
        self.copies_epoch = saved.copies_epoch

    def reset(self) -> None:
        self.schedule = self._inputs = None
        self.copies = [[] for _ in self.config.page_sizes]

    def advance(self, batch: ShardBatch, devices: Sequence[DeviceRows]) -> None:
        """The epoch of ``batch`` was applied to ``devices``: its schedule (if any) is the
        step's, and its copy plan joins the pending ones."""
        self.schedule, self._inputs, self._devices = batch.schedule, None, devices
        for rounds, plan in zip(self.copies, batch.kv_copies, strict=False):
            if not plan.size:
                continue
            self.copies_epoch = batch.epoch
            if not rounds or set(plan[1].tolist()) & set(rounds[-1].values()):
                rounds.append({})  # it writes a page the last round still reads
            compose(rounds[-1], plan[0].tolist(), plan[1].tolist())

    def _build(self, schedule: Schedule, devices: Sequence[DeviceRows]) -> StepInputs:
        rows = len(schedule.sched)
        tables = [
            assemble(
                (rows, d.shape[1]), NamedSharding(self.mesh, P(self.row_axis, None)), d.buffers()
            )
            for d in devices
        ]
        # Explicit puts: in a multi-process job jit takes no numpy for a sharded argument.
        counts = NamedSharding(self.mesh, P(self.row_axis))
        return build_step_inputs(
            tables,
            jax.device_put(np.array(schedule.sched, np.int32), counts),
            jax.device_put(np.array(schedule.done, np.int32), counts),
            mesh=self.mesh,
            row_axis=self.row_axis,
            page_sizes=self.config.page_sizes,
            num_shards=1,
            tokens_per_shard=self.config.tokens_per_shard,
            row_offset=self.lo,
        )

    def take_copies(self) -> tuple[tuple[np.ndarray, ...], ...]:
        """The pending plans per group (rounds, in order), which the caller now owes the KV
        cache; clears them."""
        plans = self.pending_copies()
        self.copies = [[] for _ in self.config.page_sizes]
        return plans

    def drop_pools(self, pools: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Forget the pending copies from or into ``pools`` (``[lo, hi)`` page ids of shards
        whose process was replaced: their KV is gone). Returns, per group, the destination
        pages outside those pools whose source was inside one (``i64[k]``): pages whose KV
        will never arrive."""
        bounds = np.array(pools, np.int64).reshape(-1, 2)

        def inside(pages: np.ndarray) -> np.ndarray:
            return ((pages[:, None] >= bounds[:, 0]) & (pages[:, None] < bounds[:, 1])).any(1)

        lost = []
        for rounds in self.copies:
            gone: set[int] = set()
            for pending in rounds:
                dst = np.fromiter(pending, np.int64, len(pending))
                src = np.fromiter(pending.values(), np.int64, len(pending))
                dead_dst, dead_src = inside(dst), inside(src)
                for d in dst[dead_dst | dead_src].tolist():
                    del pending[d]
                gone.update(dst[dead_src & ~dead_dst].tolist())
            rounds[:] = [r for r in rounds if r]
            lost.append(np.array(sorted(gone), np.int64))
        return lost

    def pending_copies(self) -> tuple[tuple[np.ndarray, ...], ...]:
        return tuple(tuple(plan_of(r) for r in rounds if r) for rounds in self.copies)

    def to_numpy(self) -> StepInputs | None:
        """This shard's part of the step inputs as numpy (token block, rows, offsets); None
        when the last epoch carried no schedule."""
        if self.inputs is None:
            return None
        x = self.inputs
        return StepInputs(
            np.asarray(x.token_rows),
            np.asarray(x.positions),
            tuple(np.asarray(s) for s in x.slot_mapping),
            np.asarray(x.kv_lens),
            np.asarray(x.cu_q_lens),
        )


@dataclass
class ShardStep:
    """What a ``run_on_shards(fn, step=True)`` function gets besides the tables.

    ``inputs`` are the epoch's step inputs as global arrays (this process holds its part);
    ``epoch`` the epoch this process's shard holds (shards an epoch did not touch hold an
    older one), ``copies_epoch`` the epoch that brought the newest pending KV copies (the
    same in every process: it names them on the KV channel);
    ``kv_copies`` the pending KV copies per group (global page ids, the same in every
    process), as rounds of ``i32[2, K]`` plans to apply in order with ``apply_kv_copies``
    before attention reads the cache: call :meth:`take_kv_copies` when you apply them, so
    no copy is made twice.
    """

    epoch: int
    inputs: StepInputs | None
    kv_copies: tuple[tuple[np.ndarray, ...], ...]
    _states: Sequence[StepState]
    copies_epoch: int = 0

    def take_kv_copies(self) -> tuple[tuple[np.ndarray, ...], ...]:
        for state in self._states:
            state.take_copies()
        return self.kv_copies


def shard_step(
    epoch: int,
    states: Sequence[StepState],
    sharding: NamedSharding,
    num_shards: int,
    num_rows: int,
    tables: Sequence[jax.Array] | None = None,
) -> ShardStep:
    """The :class:`ShardStep` of the shards ``states`` held by this process (all of them for
    the local backend, one per Ray shard process). With every shard here and the global
    ``tables`` given, the inputs are built in one program over the whole mesh; otherwise
    each shard's part is glued into global arrays over ``sharding``'s mesh without moving
    data."""
    if any(s.schedule is None for s in states):
        inputs = None
    elif tables is not None and len(states) == num_shards:
        inputs = _build_all(states, tables, sharding, num_shards)
    else:
        inputs = _glue([s.inputs for s in states], sharding, num_shards, num_rows)
    copies_epoch = max(s.copies_epoch for s in states)
    return ShardStep(epoch, inputs, states[0].pending_copies(), list(states), copies_epoch)


def _build_all(
    states: Sequence[StepState],
    tables: Sequence[jax.Array],
    sharding: NamedSharding,
    num_shards: int,
) -> StepInputs:
    config = states[0].config
    return build_step_inputs(
        tables,
        np.concatenate([s.schedule.sched for s in states]).astype(np.int32),
        np.concatenate([s.schedule.done for s in states]).astype(np.int32),
        mesh=sharding.mesh,
        row_axis=sharding.spec[0],
        page_sizes=config.page_sizes,
        num_shards=num_shards,
        tokens_per_shard=config.tokens_per_shard,
    )


def _glue(
    parts: Sequence[StepInputs], sharding: NamedSharding, num_shards: int, num_rows: int
) -> StepInputs:
    mesh, row_axis = sharding.mesh, sharding.spec[0]
    flat = NamedSharding(mesh, P(row_axis))
    tokens = num_shards * parts[0].token_rows.shape[0]

    def glue(field, shape, out_sharding):
        bufs = [sh.data for p in parts for sh in field(p).addressable_shards]
        return jax.make_array_from_single_device_arrays(shape, out_sharding, bufs)

    slots = tuple(
        glue(lambda p, g=g: p.slot_mapping[g], (tokens,), flat)
        for g in range(len(parts[0].slot_mapping))
    )
    offsets = NamedSharding(shard_mesh(mesh, row_axis, num_shards), P(SHARD_AXIS, None))
    return StepInputs(
        glue(lambda p: p.token_rows, (tokens,), flat),
        glue(lambda p: p.positions, (tokens,), flat),
        slots,
        glue(lambda p: p.kv_lens, (num_rows,), flat),
        glue(lambda p: p.cu_q_lens, (num_shards, parts[0].cu_q_lens.shape[1]), offsets),
    )
