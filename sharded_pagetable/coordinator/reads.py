"""The reads of a sharded table that reach the shards: device snapshots, shard status,
``run_on_shards``. A read that finds a shard lost fails the table closed (and, with
``recover="auto"``, recovers it and reads again); one that finds the table taken over by a
newer coordinator fences this one off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ..errors import FencedError, ShardFailedError
from ..table.validation import check_index
from .backend import Backend
from .view import synchronized


class ShardReads:
    """Mixed into ``ShardedPageTable``: it provides ``_lock``, ``_hosts``,
    ``_live_backend``, ``_retrying``, ``_failed`` and ``_fenced``."""

    @synchronized  # a commit in another thread would donate the buffers under us
    def _group_array(self, group: int) -> jax.Array:
        return self._live_backend().group_array(group)

    def device_snapshot(self, group: int) -> np.ndarray:
        """``i32[R, P]`` numpy copy of group ``group``'s committed device table."""
        group = check_index(group, len(self._hosts), "group")
        return self._read(lambda backend: backend.device_snapshot(group))

    def run_on_shards(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run ``fn(list_of_group_arrays, *args)`` in every shard process at once.

        The arrays are the committed global arrays (each process sees its addressable part),
        so a jitted function over them is an SPMD program across the shard processes. ``fn``
        is trusted driver code, run with the shard process's privileges; if it raises,
        :class:`RunOnShardsError` names the shard and the table stays healthy.
        """
        return self._read(lambda backend: backend.run_on_shards(fn, *args))

    def shard_status(self) -> list[tuple[int, int]]:
        """``(epoch, checksum)`` each shard reports now; all equal to ``(t.epoch, receipt
        checksum)`` when the table is healthy."""
        return self._read(lambda backend: [(a.epoch, a.checksum) for a in backend.status()])

    def _read(self, fn: Callable[[Backend], Any]) -> Any:
        """A read on the shards; a lost shard fails the table closed."""

        def guarded(backend: Backend) -> Any:
            try:
                return fn(backend)
            except ShardFailedError as exc:
                self._failed = exc
                raise
            except FencedError as exc:
                self._fenced = exc
                raise

        with self._lock:
            return self._retrying(guarded)
