"""Where shards live. ``LocalBackend`` keeps them in the driver; ``ray_actors`` has the other.

An out-of-process backend (:class:`Backend`) delivers one wire message per shard and
reports, per shard, an :class:`Ack` or the exception that shard raised; the coordinator
decides what a failure means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from .device import DeviceRows, assemble
from .layout import ShardLayout
from .shard import Ack


class Backend(Protocol):
    """Shards in other processes, reached with wire messages."""

    num_shards: int
    in_process = False

    def apply(
        self, messages: Sequence[bytes], meanwhile: Callable[[], None] | None = None
    ) -> list[Ack | BaseException]: ...

    def rollback(self, shards: Sequence[int], epoch: int) -> list[Ack | BaseException]: ...

    def device_snapshot(self, group: int) -> np.ndarray: ...

    def run_on_shards(self, fn: Callable[..., Any], *args: Any) -> list[Any]: ...

    def status(self) -> list[Ack]: ...

    def reseed(self, messages: Sequence[bytes | None]) -> list[Ack | BaseException]: ...

    def export(self) -> list[bytes | None]: ...

    def restart(self) -> None: ...

    def close(self, clean: bool = True) -> None: ...


class LocalBackend:
    """In-process shards: one JAX process owns every device of the mesh.

    Shard ``s`` owns the device buffers of its rows. Its host rows are the coordinator's
    published tables (``published[g][lo:hi]``): in one process a second copy would only
    repeat the same vectorised apply, so a commit here costs the coordinator's bookkeeping
    plus the dirty-row device updates, and nothing crosses a wire. The wire format, shard
    epochs and rollback belong to the out-of-process backends.
    """

    in_process = True

    def __init__(
        self,
        layout: ShardLayout,
        sharding: jax.sharding.NamedSharding,
        published: Sequence[np.ndarray],
        warmup: bool = True,
    ) -> None:
        self.layout = layout
        self.sharding = sharding
        self.num_shards = layout.num_shards
        self._published = published
        self._warmup = warmup
        self._arrays: dict[int, jax.Array] = {}  # assembled global arrays, until a change
        self.restart()

    def restart(self) -> None:
        """(Re)build every shard's device buffers from the published tables."""
        self._arrays.clear()
        self.devices = [
            [
                DeviceRows(
                    table.shape,
                    self.sharding,
                    table[rows.start : rows.stop],
                    rows.start,
                    rows.stop,
                    warmup=self._warmup,
                )
                for table in self._published
            ]
            for rows in map(self.layout.shard_rows, range(self.num_shards))
        ]

    def publish(self, group_cells: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        """Upload the given cells (global rows non-decreasing, columns) of each group from
        the published tables."""
        self._arrays.clear()
        rps = self.layout.rows_per_shard
        bounds = np.arange(1, self.num_shards) * rps
        for g, (rows, cols) in enumerate(group_cells):
            if rows.size == 0:
                continue
            table = self._published[g]
            cuts = rows.searchsorted(bounds).tolist()
            for s, (i, j) in enumerate(zip([0, *cuts], [*cuts, rows.size], strict=True)):
                if j > i:
                    lo = s * rps
                    self.devices[s][g].update_cells(
                        rows[i:j], cols[i:j], table[lo : lo + rps], lo + rps
                    )

    def group_array(self, group: int) -> jax.Array:
        if group not in self._arrays:
            buffers = [buf for shard in self.devices for buf in shard[group].buffers()]
            shape = self._published[group].shape
            self._arrays[group] = assemble(shape, self.sharding, buffers)
        return self._arrays[group]

    def device_snapshot(self, group: int) -> np.ndarray:
        return np.concatenate([shard[group].to_numpy() for shard in self.devices])

    def run_on_shards(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        arrays = [self.group_array(g) for g in range(len(self._published))]
        return [fn(arrays, *args) for _ in range(self.num_shards)]

    def close(self, clean: bool = True) -> None:
        self.devices = []
        self._arrays.clear()
