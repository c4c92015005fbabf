"""``t[g]`` of a sharded table."""

from __future__ import annotations

from collections.abc import Callable

import jax

from ..table.host import HostRows, HostView


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
        super().__init__(host)
        self._device_tensor = device_tensor
        self.max_num_reqs = host.usable_rows  # the table's max_num_reqs, not its capacity
        self.max_num_pages_per_req = host.capacity
        self.max_num_batched_tokens = max_num_batched_tokens

    def get_device_tensor(self) -> jax.Array:
        """The group's global array (``backend="local"`` only: elsewhere it lives in the shard
        processes; use ``run_on_shards`` or ``device_snapshot``)."""
        return self._device_tensor()
