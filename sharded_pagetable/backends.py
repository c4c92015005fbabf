"""Where shards live. ``LocalBackend`` keeps them in the driver; ``ray_actors`` has the other.

A backend delivers one message per shard and reports, per shard, an :class:`Ack` or the
exception that shard raised; the coordinator decides what a failure means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from .device import assemble
from .shard import Ack, Shard, ShardSpec


class Backend(Protocol):
    num_shards: int

    def apply(self, messages: Sequence[bytes]) -> list[Ack | BaseException]: ...

    def rollback(self, shards: Sequence[int], epoch: int) -> list[Ack | BaseException]: ...

    def device_snapshot(self, group: int) -> np.ndarray: ...

    def run_on_shards(self, fn: Callable[..., Any], *args: Any) -> list[Any]: ...

    def status(self) -> list[Ack]: ...

    def reseed(self, messages: Sequence[bytes | None]) -> list[Ack | BaseException]: ...

    def export(self) -> list[bytes | None]: ...

    def restart(self) -> None: ...

    def close(self, clean: bool = True) -> None: ...


class LocalBackend:
    """Every shard in this process; one JAX process owns every device of the mesh."""

    def __init__(self, specs: Sequence[ShardSpec], sharding: jax.sharding.NamedSharding) -> None:
        self.sharding = sharding
        self.shards = [Shard(spec, sharding) for spec in specs]
        self.num_shards = len(self.shards)
        self._arrays: dict[int, jax.Array] = {}  # assembled global arrays, until a change

    def _each(self, calls: Sequence[Callable[[], Ack]]) -> list[Ack | BaseException]:
        self._arrays.clear()
        results: list[Ack | BaseException] = []
        for call in calls:
            try:
                results.append(call())
            except Exception as exc:  # reported per shard; the coordinator decides
                results.append(exc)
        return results

    def apply(self, messages: Sequence[bytes]) -> list[Ack | BaseException]:
        return self._each(
            [lambda s=s, m=m: s.apply(m) for s, m in zip(self.shards, messages, strict=True)]
        )

    def rollback(self, shards: Sequence[int], epoch: int) -> list[Ack | BaseException]:
        return self._each([lambda i=i: self.shards[i].rollback(epoch) for i in shards])

    def group_array(self, group: int) -> jax.Array:
        if group not in self._arrays:
            first = self.shards[0].devices[group]
            buffers = [buf for shard in self.shards for buf in shard.buffers(group)]
            self._arrays[group] = assemble(first.shape, self.sharding, buffers)
        return self._arrays[group]

    def device_snapshot(self, group: int) -> np.ndarray:
        return np.concatenate([s.snapshot(group) for s in self.shards])

    def run_on_shards(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        arrays = [self.group_array(g) for g in range(len(self.shards[0].devices))]
        return [fn(arrays, *args) for _ in self.shards]

    def status(self) -> list[Ack]:
        return [s.status() for s in self.shards]

    def reseed(self, messages: Sequence[bytes | None]) -> list[Ack | BaseException]:
        return self._each(
            [lambda s=s, m=m: s.reseed(m) for s, m in zip(self.shards, messages, strict=True)]
        )

    def export(self) -> list[bytes | None]:
        return [s.export() for s in self.shards]

    def restart(self) -> None:
        """Replace every shard with a fresh, empty one."""
        self._arrays.clear()
        self.shards = [Shard(s.spec, self.sharding) for s in self.shards]

    def close(self, clean: bool = True) -> None:
        self.shards = []
