"""What a commit returns: the epoch, and per shard the rows and bytes sent and a checksum."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShardReceipt:
    shard: int
    rows: int  # row updates sent to this shard, over all groups
    bytes: int  # int32 payload of the shard's batch (its columns), the same on every backend
    checksum: int  # u64 checksum of the shard's rows at this epoch, as the shard reported it
    apply_us: int = 0  # how long the shard took to apply its batch, as it reported (confirmed)


@dataclass(frozen=True)
class CommitReceipt:
    """``epoch`` is the epoch now published (or, unconfirmed, in flight); ``changed`` is
    False when nothing was sent; ``shards`` has one receipt per shard the epoch touched (sent
    a message: changed rows, a new part of the step schedule, KV copies), in shard order, and
    a shard's ``checksum`` is what it confirmed (or, before ``wait()``, what it must
    confirm). A shard not among them holds what it held, at an older epoch.

    ``kv_copies`` holds, per group, the ``i32[2, K]`` KV copies (source page, destination
    page) this epoch asks of the model step: rows that moved onto new pages. Empty
    (``K == 0``) when nothing moved.
    """

    epoch: int
    num_reqs: int
    changed: bool
    shards: tuple[ShardReceipt, ...]
    kv_copies: tuple[np.ndarray, ...] = ()
    confirmed: bool = True  # False for commit(wait=False) until wait() confirms the epoch

    def confirm(self, apply_us: Sequence[int] = ()) -> CommitReceipt:
        """This receipt once every shard confirmed its epoch (``apply_us``: each shard's own
        apply time, from its ack)."""
        shards = self.shards
        if apply_us:
            shards = tuple(
                ShardReceipt(s.shard, s.rows, s.bytes, s.checksum, us)
                for s, us in zip(shards, apply_us, strict=True)
            )
        return CommitReceipt(
            self.epoch, self.num_reqs, self.changed, shards, self.kv_copies, confirmed=True
        )

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def checksums(self) -> tuple[int, ...]:
        return tuple(s.checksum for s in self.shards)
