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
from ..shard.step_inputs import StepInputs
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

    def step_snapshot(self) -> StepInputs:
        """Numpy copies of the last epoch's step inputs, gathered from every shard: token
        rows, positions and per-group slot mapping ``i32[T]``, kv lens ``i32[R]``, and
        ``cu_q_lens`` ``i32[S, R/S + 1]`` (shard ``s``'s tokens fill ``[s*T/S, (s+1)*T/S)``).
        Raises if that epoch carried no schedule."""
        parts = self._read(lambda backend: backend.step_snapshot())
        if any(p is None for p in parts):
            raise RuntimeError(
                "the last epoch carried no schedule: commit(num_reqs, num_scheduled_tokens=..., "
                "num_computed_tokens=...) first"
            )
        return StepInputs(
            np.concatenate([p.token_rows for p in parts]),
            np.concatenate([p.positions for p in parts]),
            tuple(np.concatenate(g) for g in zip(*(p.slot_mapping for p in parts), strict=True)),
            np.concatenate([p.kv_lens for p in parts]),
            np.concatenate([p.cu_q_lens for p in parts]),
        )

    def run_on_shards(self, fn: Callable[..., Any], *args: Any, step: bool = False) -> list[Any]:
        """Run ``fn(list_of_group_arrays, *args)`` in every shard process at once.

        The arrays are the committed global arrays (each process sees its addressable part),
        so a jitted function over them is an SPMD program across the shard processes. ``fn``
        is trusted driver code, run with the shard process's privileges; if it raises,
        :class:`RunOnShardsError` names the shard and the table stays healthy. With
        ``step=True`` it is called ``fn(arrays, step, *args)``: ``step`` is a
        :class:`~sharded_pagetable.shard.step.ShardStep` holding the epoch's step inputs as
        global arrays and the KV copies the model step owes before attention.
        """
        return self._read(lambda backend: backend.run_on_shards(fn, *args, step=step))

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
            self._settle_in_flight()
            return self._retrying(guarded)
