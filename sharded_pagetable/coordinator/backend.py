"""What the coordinator needs from wherever its shards live.

Two implementations: :class:`~.local.LocalBackend` (shards in the driver) and
``ray_actors.backend.RayBackend`` (one Ray actor per shard). Both hold real
:class:`~sharded_pagetable.shard.shard.Shard` objects and hand them the same
:class:`~sharded_pagetable.rows.messages.ShardBatch` values (the Ray one over the wire),
so the coordinator's commit, recovery and attach are one path for both. A call that
reaches several shards reports, per shard, an :class:`Ack` or the exception that shard
raised; the coordinator decides what a failure means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from ..rows.messages import Ack, ShardBatch
from ..shard.step_inputs import StepInputs

Result = Ack | BaseException


class Backend(Protocol):
    num_shards: int
    started_shards: bool  # whether this backend started its shards (and so may stop them)

    def send(self, batches: Sequence[ShardBatch]) -> None:
        """Start delivering one epoch to the shards it touches: one batch each, to shard
        ``batch.shard``, in increasing shard order (the other shards get nothing)."""

    def collect(self) -> list[Result]:
        """The answers to the batches of the last :meth:`send`, in their order."""

    def fence(self, generation: int) -> list[Result]:
        """Make every shard obey coordinator ``generation`` (and refuse older ones)."""

    def rollback(self, shards: Sequence[int], epoch: int, generation: int) -> list[Result]:
        """Ask ``shards`` to step back from ``epoch``."""

    def status(self) -> list[Ack]:
        """The epoch, checksum and obeyed generation of every shard now."""

    def reseed(
        self, shards: Sequence[int], states: Sequence[ShardBatch | None], generation: int
    ) -> list[Result]:
        """Rebuild ``shards`` from full-state batches (None: empty), in that order."""

    def export(self, generations: Sequence[int]) -> list[ShardBatch | BaseException | None]:
        """Every shard's rows as a full-state batch at its epoch (None at epoch 0), read at
        ``generations[s]`` (a shard refuses any generation but the one it obeys)."""

    def replace_dead(self) -> list[int]:
        """Give every shard whose process is gone a new, empty one; returns those shards
        (every shard when the backend cannot replace one alone)."""

    def drop_kv_copies(self, pools: Sequence[tuple[int, int]]) -> list[list[np.ndarray]]:
        """Make every shard forget the KV copies pending from or into ``pools`` (page ranges
        of replaced shards); per shard, per group, the pages whose KV will not arrive."""

    def group_array(self, group: int) -> jax.Array:
        """Group ``group``'s committed global array, where the driver can hold it."""

    def device_snapshot(self, group: int) -> np.ndarray:
        """``i32[R, P]`` copy of group ``group`` as the shards' devices hold it."""

    def run_on_shards(self, fn: Callable[..., Any], *args: Any, step: bool = False) -> list[Any]:
        """``fn(list_of_group_arrays, [step,] *args)`` in every shard process."""

    def step_snapshot(self) -> list[StepInputs]:
        """Every shard's part of the last epoch's step inputs, as numpy."""

    def close(self, clean: bool = True) -> None:
        """Stop the shards this backend started."""

    def detach(self) -> None:
        """Let go of the shards without stopping them."""
