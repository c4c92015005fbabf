"""Small pieces of the coordinator's surface: ``t[g]`` and the table-wide lock."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

if TYPE_CHECKING:
    from .coordinator import ShardedPageTable


def synchronized(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``method`` under the table's lock, so scheduler threads may share a table."""

    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class GroupView:
    """``t[g]`` of a sharded table: host reads come from the coordinator's mirror."""

    def __init__(self, table: ShardedPageTable, group: int) -> None:
        self._table = table
        self._group = group
        host = table._hosts[group]
        self.max_num_reqs = host.num_rows
        self.max_num_pages_per_req = host.capacity
        self.max_num_batched_tokens = table.max_num_batched_tokens

    @property
    def page_table_cpu(self) -> np.ndarray:  # i32[R, P]
        return self._table._hosts[self._group].table

    @property
    def num_pages_per_row(self) -> np.ndarray:  # i32[R]
        return self._table._hosts[self._group].counts

    def get_cpu_tensor(self) -> np.ndarray:
        return self.page_table_cpu

    def get_device_tensor(self) -> jax.Array:
        """The group's global array (``backend="local"`` only: elsewhere it lives in the shard
        processes; use ``run_on_shards`` or ``device_snapshot``)."""
        return self._table._group_array(self._group)
