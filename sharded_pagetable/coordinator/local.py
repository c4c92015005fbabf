"""``backend="local"``: every shard in the driver, one JAX process owning every device.

The shards are real :class:`Shard` objects with their own tables, epochs, checksums and
undo, handed the coordinator's batches as values (no socket, no encoding); so a local
table checks itself exactly as a Ray one does, and costs one more apply per commit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import RunOnShardsError
from ..routing.layout import ShardLayout
from ..rows.device import assemble
from ..rows.messages import ShardBatch
from ..shard.shard import Shard, ShardSpec, step_of
from ..shard.step_inputs import StepInputs
from .backend import Result


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or the exception it raised (reported per shard, as a remote call is)."""
    try:
        return fn(*args)
    except Exception as exc:
        return exc


def _joined(per_shard: Sequence[dict[jax.Device, jax.Array]]) -> list[jax.Array]:
    """One buffer per device: the buffers every shard (in shard order) keeps there, joined
    along the rows (on that device)."""
    devices = dict.fromkeys(d for bufs in per_shard for d in bufs)
    return [jnp.concatenate([bufs[d] for bufs in per_shard if d in bufs]) for d in devices]


class LocalBackend:
    """In-process shards over one mesh of this process's devices.

    Args:
      specs: one spec per shard.
      sharding: the row sharding of every group's global array.
    """

    def __init__(self, specs: Sequence[ShardSpec], sharding: jax.sharding.NamedSharding) -> None:
        self.specs = list(specs)
        self.sharding = sharding
        self.num_shards = len(self.specs)
        self.started_shards = True
        self.layout: ShardLayout = self.specs[0].layout
        self._results: list[Result] = []
        self._arrays: dict[int, jax.Array] = {}  # assembled global arrays, until a change
        self.restart()

    def restart(self) -> None:
        self._arrays.clear()
        self.shards = [Shard(spec, self.sharding) for spec in self.specs]

    def send(self, batches: Sequence[ShardBatch]) -> None:
        self._arrays.clear()
        self._results = [_call(self.shards[b.shard].apply, b) for b in batches]

    def collect(self) -> list[Result]:
        results, self._results = self._results, []
        return results

    def fence(self, generation: int) -> list[Result]:
        return [_call(s.fence, generation) for s in self.shards]

    def rollback(self, shards: Sequence[int], epoch: int, generation: int) -> list[Result]:
        self._arrays.clear()
        return [_call(self.shards[s].rollback, epoch, generation) for s in shards]

    def status(self) -> list:
        return [s.status() for s in self.shards]

    def replace_dead(self) -> list[int]:
        """In-process shards share the driver's fate: every one is replaced."""
        self.restart()
        return list(range(self.num_shards))

    def reseed(
        self, shards: Sequence[int], states: Sequence[ShardBatch | None], generation: int
    ) -> list[Result]:
        self._arrays.clear()
        return [
            _call(self.shards[s].reseed, b, generation) for s, b in zip(shards, states, strict=True)
        ]

    def export(self, generations: Sequence[int]) -> list[ShardBatch | BaseException | None]:
        return [_call(s.export, g) for s, g in zip(self.shards, generations, strict=True)]

    def group_array(self, group: int) -> jax.Array:
        """Group ``group``'s global array over every device, assembled from the shards'
        buffers and kept until the next change. Where several shards share a device, the
        device's block is their rows joined in shard order (one copy per read after a
        change); otherwise the shards' own buffers are used as they are."""
        if group not in self._arrays:
            shape = self.shards[0].devices[group].shape
            if self.layout.shards_per_block == 1:
                buffers = [buf for shard in self.shards for buf in shard.buffers(group)]
            else:
                buffers = _joined(
                    [
                        dict(zip(s.devices[group].devices, s.buffers(group), strict=True))
                        for s in self.shards
                    ]
                )
            self._arrays[group] = assemble(shape, self.sharding, buffers)
        return self._arrays[group]

    def device_snapshot(self, group: int) -> np.ndarray:
        return np.concatenate([s.snapshot(group) for s in self.shards])

    def step_snapshot(self) -> list[StepInputs]:
        return [s.step_snapshot() for s in self.shards]

    def drop_kv_copies(self, pools: Sequence[tuple[int, int]]) -> list[list[np.ndarray]]:
        return [s.drop_kv_copies(pools) for s in self.shards]

    def run_on_shards(self, fn: Callable[..., Any], *args: Any, step: bool = False) -> list[Any]:
        """``fn`` once: every shard lives in this one process, which sees the whole arrays
        (the result stands for every shard)."""
        arrays = [self.group_array(g) for g in range(len(self.specs[0].widths))]
        extra = (step_of(self.shards, self.num_shards, arrays),) if step else ()
        try:
            result = fn(arrays, *extra, *args)
        except Exception as exc:
            raise RunOnShardsError(0, type(exc).__name__, str(exc)) from exc
        return [result] * self.num_shards

    def close(self, clean: bool = True) -> None:
        self.shards = []
        self._arrays.clear()

    def detach(self) -> None:
        self.close()
