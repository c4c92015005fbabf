"""Small pieces of the coordinator's surface: ``t[g]`` and the table-wide lock."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from ..table.host import HostRows, HostView


def synchronized(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``method`` under the table's lock, so scheduler threads may share a table."""

    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class GroupView(HostView):
    """``t[g]`` of a sharded table: host reads come from the coordinator's mirror.

    Args:
      host: the group's mirror.
      max_num_batched_tokens: the table's token budget (the seed's attribute).
      device_tensor: returns the group's committed global array, where the driver has it.
    """

    def __init__(
        self, host: HostRows, max_num_batched_tokens: int, device_tensor: Callable[[], jax.Array]
    ) -> None:
        self._host = host
        self._device_tensor = device_tensor
        self.max_num_reqs = host.num_rows
        self.max_num_pages_per_req = host.capacity
        self.max_num_batched_tokens = max_num_batched_tokens

    def get_device_tensor(self) -> jax.Array:
        """The group's global array (``backend="local"`` only: elsewhere it lives in the shard
        processes; use ``run_on_shards`` or ``device_snapshot``)."""
        return self._device_tensor()


def when_open(method: Callable[..., Any]) -> Callable[..., Any]:
    """``synchronized(method)`` that first refuses a closed table (a row op after
    ``close()`` must not change a mirror nobody will publish)."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._open()
        return method(self, *args, **kwargs)

    return synchronized(call)
