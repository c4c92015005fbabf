"""What crosses between coordinator and shard, as values: batches, acks and refusals.

:mod:`.wire` turns them into bytes and back; in-process shards take them as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..constants import OP_APPEND, OP_CLEAR, OP_SET

__all__ = [
    "OP_APPEND",
    "OP_CLEAR",
    "OP_SET",
    "Ack",
    "GroupBatch",
    "Refusal",
    "Schedule",
    "ShardBatch",
]


@dataclass(frozen=True, eq=False)
class GroupBatch:
    """Columnar updates of one group; every array is ``i32``.

    ``op[i]`` (``OP_SET`` / ``OP_APPEND`` / ``OP_CLEAR``) rewrites row ``row[i]`` (strictly
    increasing) from slot ``start[i]`` to its new count ``count[i]``; ``pages`` holds the
    ``count - start`` new page ids of every op, flat, in op order.
    """

    op: np.ndarray
    row: np.ndarray
    start: np.ndarray
    count: np.ndarray
    pages: np.ndarray

    @property
    def size(self) -> int:
        return int(self.row.size)

    @property
    def nbytes(self) -> int:
        """Bytes of the five int32 columns: what a commit sends for this group on any
        backend."""
        return 4 * (4 * self.row.size + self.pages.size)

    @classmethod
    def empty(cls) -> GroupBatch:
        z = np.empty(0, dtype=np.int32)
        return cls(z, z, z, z, z)

    def cuts(self, bounds: Sequence[int]) -> np.ndarray:
        """``i64[len(bounds)]`` where each of row ``bounds`` falls among this batch's rows."""
        return np.searchsorted(self.row, np.asarray(bounds, dtype=np.int32))

    def split(self, bounds: Sequence[int], cut: np.ndarray | None = None) -> list[GroupBatch]:
        """The batch cut at row ``bounds`` (``b[0] <= b[1] <= ...``): piece ``s`` holds rows
        ``[b[s], b[s + 1])``, renumbered from ``b[s]`` (``cut``: :meth:`cuts` of ``bounds``,
        when the caller has it already)."""
        bounds = np.asarray(bounds, dtype=np.int32)
        cut = self.cuts(bounds) if cut is None else cut
        written = np.zeros(self.row.size + 1, np.int64)
        np.cumsum(self.count - self.start, out=written[1:])
        # Every row renumbered at once (rows outside the bounds belong to no piece).
        local = self.row.copy()
        local[cut[0] : cut[-1]] -= np.repeat(bounds[:-1], np.diff(cut))
        cut, page_cut = cut.tolist(), written[cut].tolist()
        return [
            GroupBatch(self.op[i:j], local[i:j], self.start[i:j], self.count[i:j], self.pages[p:q])
            for i, j, p, q in zip(cut, cut[1:], page_cut, page_cut[1:], strict=False)
        ]

    def pieces(
        self, bounds: np.ndarray, cut: np.ndarray, shards: Sequence[int]
    ) -> list[GroupBatch]:
        """The pieces :meth:`split` gives, for ``shards`` only (``cut``: :meth:`cuts` of
        ``bounds``): the work grows with this batch and the shards asked for, not with the
        number of bounds."""
        if not self.row.size:
            return [self] * len(shards)
        written = np.zeros(self.row.size + 1, np.int64)
        np.cumsum(self.count - self.start, out=written[1:])
        local = self.row - np.repeat(bounds[:-1].astype(np.int32), np.diff(cut))
        cuts, page_cuts = cut.tolist(), written[cut].tolist()
        empty = GroupBatch.empty()
        out = []
        for s in shards:
            i, j = cuts[s], cuts[s + 1]
            if i == j:
                out.append(empty)
                continue
            p, q = page_cuts[s], page_cuts[s + 1]
            out.append(
                GroupBatch(
                    self.op[i:j], local[i:j], self.start[i:j], self.count[i:j], self.pages[p:q]
                )
            )
        return out


@dataclass(frozen=True, eq=False)
class Schedule:
    """One model step's token counts for a shard's rows (local row order), as the
    scheduler gives them: ``sched`` i32[rows] tokens scheduled now, ``done`` i32[rows]
    tokens already computed. The shard builds the step's inputs from them on its devices."""

    sched: np.ndarray
    done: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.sched.nbytes + self.done.nbytes


@dataclass(frozen=True, eq=False)
class ShardBatch:
    """Everything one shard applies for one epoch, on top of epoch ``base``.

    A full-state batch (``base == 0``, one SET per non-empty row) rebuilds a shard or
    exports one. ``generation`` is the sending coordinator's: a shard applies only batches of
    the generation it was last fenced to (see ``Shard.fence``). ``schedule``, when the
    commit carries one, is the step's per-row token counts of the shard's rows.
    ``kv_copies`` (per group ``i32[2, K]`` source and destination global pages, every shard
    gets the whole plan) is the KV a model step must copy before its attention reads: rows
    that moved to new pages. ``touched`` is how many shards the epoch reaches (0: not said,
    as in a full-state batch): a coordinator that takes the shards over tells from it
    whether every shard the last epoch reached applied it.
    """

    epoch: int
    base: int
    shard: int
    groups: tuple[GroupBatch, ...]
    generation: int = 0
    schedule: Schedule | None = None
    kv_copies: tuple[np.ndarray, ...] = ()
    touched: int = 0

    @property
    def rows(self) -> int:
        return sum(g.size for g in self.groups)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.schedule is None else self.schedule.nbytes
        extra += sum(c.nbytes for c in self.kv_copies)
        return extra + sum(g.nbytes for g in self.groups)

    @classmethod
    def full_state(
        cls,
        epoch: int,
        shard: int,
        tables: Sequence[np.ndarray],
        counts: Sequence[np.ndarray],
        generation: int = 0,
    ) -> ShardBatch:
        """One SET per non-empty row of each group's ``tables`` / ``counts`` (local rows)."""
        groups = []
        for table, count in zip(tables, counts, strict=True):
            rows = np.flatnonzero(count).astype(np.int32)
            n = count[rows].astype(np.int32)
            mask = np.arange(table.shape[1])[None, :] < n[:, None]
            pages = table[rows][mask].astype(np.int32)
            op = np.full(rows.size, OP_SET, np.int32)
            groups.append(GroupBatch(op, rows, np.zeros(rows.size, np.int32), n, pages))
        return cls(epoch, 0, shard, tuple(groups), generation)


@dataclass(frozen=True)
class Ack:
    """A shard's answer: the epoch it now holds and the checksum of its rows.

    ``rows`` counts the row updates of the batch answered; ``applied`` is False when nothing
    changed (a status query, or a re-sent epoch acknowledged without applying it again);
    ``generation`` is the coordinator generation the shard obeys; ``apply_us`` how long the
    shard itself took to apply the batch answered.
    """

    shard: int
    epoch: int
    checksum: int
    rows: int
    applied: bool
    generation: int = 0
    apply_us: int = 0


REFUSAL_KINDS = ("wire", "fenced", "error")


@dataclass(frozen=True)
class Refusal:
    """A shard's answer when it did not do what it was asked; its state is unchanged.

    ``kind`` is ``"wire"`` when the request itself was refused (a malformed or inconsistent
    batch), ``"fenced"`` when it came from an older coordinator than the shard obeys (its
    ``generation`` then says which one it obeys), ``"error"`` for anything else.
    """

    shard: int
    kind: str
    message: str
    generation: int = 0
