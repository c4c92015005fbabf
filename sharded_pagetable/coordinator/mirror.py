"""The coordinator's mirror: every row of every group on the host, its row operations and
their validation, and the epochs staged from it.

A commit is three steps with one owner each: the mirror *stages* an epoch (the changed rows
of every group, split by shard once, with the copy plans: :meth:`Mirror.stage`), the
committer sends it and waits for the shards, and the mirror *publishes* it (taking it as
what the shards hold, with the checksum each must report) or steps back
(:meth:`Mirror.unpublish`), keeping every change made since.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..routing.layout import ShardLayout
from ..routing.pools import PagePools
from ..rows.checksum import GroupConsts
from ..rows.messages import Schedule, ShardBatch
from ..table.host import HostRows, Unpublish
from ..table.schedule import check_schedule
from .epochs import (
    EpochId,
    EpochPlan,
    expected_after,
    live_rows,
    published_states,
    shard_messages,
    shard_sums,
    touched_shards,
)
from .pooled import PooledRowOps
from .start import step_config


@dataclass(frozen=True, eq=False)
class Published:
    """An epoch the mirror took as published: each shard's checksum after it, and the undo
    of every group (:meth:`Mirror.unpublish`)."""

    expected: list[int]
    undo: list[Unpublish]


class Mirror(PooledRowOps):
    """Every row of a sharded table on the host, one :class:`HostRows` per group.

    Args:
      layout: how rows split over shards.
      widths: pages per row of each group.
      page_sizes: tokens per page of each group.
      max_num_batched_tokens: the per-step token budget.
      num_pages: if given, page ids must be below it.
      pools: the shards' page pools, or None.
    """

    def __init__(
        self,
        layout: ShardLayout,
        widths: Sequence[int],
        page_sizes: Sequence[int],
        max_num_batched_tokens: int,
        num_pages: int | None,
        pools: PagePools | None,
    ) -> None:
        rows = layout.max_num_reqs
        hosts = [
            HostRows(rows, w, num_pages, GroupConsts.build(g, w, rows))
            for g, w in enumerate(widths)
        ]
        super().__init__(hosts, page_sizes, max_num_batched_tokens, pools)
        self.layout = layout

    @property
    def hosts(self) -> list[HostRows]:
        return self._hosts

    def schedule(self, num_reqs: int, sched: object, done: object) -> Schedule | None:
        """A step's schedule checked against the live rows (see :func:`check_schedule`);
        None when the caller gave neither count."""
        if sched is None and done is None:
            return None
        step = step_config(self.page_sizes, self.max_num_batched_tokens, self.layout)
        if step is None:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} does not split into "
                f"equal token blocks over the {self.layout.num_blocks} devices of the row "
                "axis: this table cannot build step inputs"
            )
        counts = [host.counts for host in self._hosts]
        shards = self.layout.num_shards
        return check_schedule(
            counts, sched, done, num_reqs, self.page_sizes, shards, step.tokens_per_shard
        )

    # -- epochs --------------------------------------------------------------------------

    def stage(
        self,
        epoch: EpochId,
        num_reqs: int,
        schedule: Schedule | None,
        bases: np.ndarray,
        held: Schedule | None,
    ) -> EpochPlan | None:
        """Rows below ``num_reqs`` changed since they were published, as epoch ``epoch``: one
        batch for every shard it touches (changed rows; a part of ``schedule`` other than the
        one it holds, ``held``; KV copies), split once, built on the epoch each shard holds
        (``bases``). None when it would touch no shard. Changes nothing."""
        batches = tuple(host.batch(num_reqs) for host in self._hosts)
        if schedule is None and held is None and not any(b.size for b in batches):
            return None
        bounds = self.layout.bounds
        cuts = tuple(b.cuts(bounds) for b in batches)
        copies = tuple(host.copy_plan() for host in self._hosts)
        touched = touched_shards(cuts, schedule, held, copies, self.layout.num_shards)
        if not touched.size:
            return None
        messages = shard_messages(epoch, batches, cuts, bounds, schedule, copies, touched, bases)
        versions = tuple(host.cpu_version for host in self._hosts)
        return EpochPlan(
            epoch, num_reqs, batches, cuts, schedule, touched, messages, copies, versions
        )

    def check_current(self, plan: EpochPlan) -> None:
        """Refuse a plan staged before a later row change (it would publish stale rows)."""
        if plan.versions != tuple(host.cpu_version for host in self._hosts):
            raise ValueError(
                f"epoch {plan.id.epoch} was staged before later row changes; stage it again"
            )

    def publish(self, plan: EpochPlan, expected: Sequence[int]) -> Published:
        """Take ``plan`` as published: its rows are clean and their checksum terms are the
        new ones; returns each shard's checksum after it (from ``expected``, before it) and
        the undo. Rows may change again at once; :meth:`unpublish` steps back."""
        terms = [host.terms_after(b) for host, b in zip(self._hosts, plan.batches, strict=True)]
        after = expected_after(expected, plan.cuts, [delta for _, delta in terms], plan.touched)
        undo = [
            host.publish(b, t)
            for host, b, (t, _) in zip(self._hosts, plan.batches, terms, strict=True)
        ]
        return Published(after, undo)

    def unpublish(self, published: Published) -> None:
        """Step back over :meth:`publish`, keeping every change made since."""
        for host, undo in zip(reversed(self._hosts), reversed(published.undo), strict=True):
            host.unpublish(undo)

    # -- whole-table state ---------------------------------------------------------------

    def published_states(
        self, epoch: int, generation: int, schedule: Schedule | None = None
    ) -> list[ShardBatch | None]:
        """Full-state batches rebuilding each shard at the published ``epoch``, each with
        its rows' part of that epoch's step ``schedule`` (all rows), if given."""
        return published_states(self._hosts, self.layout, epoch, generation, schedule)

    def live_rows(self, shards: Sequence[int] | None = None) -> np.ndarray:
        """``i32[k]`` rows holding pages in any group as last published (of ``shards``
        only, when given)."""
        rows = live_rows(self._hosts)
        if shards is None:
            return rows
        owner = rows // self.layout.rows_per_shard
        return rows[np.isin(owner, np.asarray(list(shards), dtype=np.int64))]

    def pool_pages(self, shards: Sequence[int]) -> list[tuple[int, int]]:
        """``[lo, hi)`` page ids of each of ``shards``' pools (none without pools)."""
        if self._pools is None:
            return []
        return [(r.start, r.stop) for r in map(self._pools.pool, shards)]

    def rows_holding(self, pages: Sequence[np.ndarray]) -> np.ndarray:
        """``i32[k]`` sorted rows that hold any of ``pages[g]`` in group ``g`` as last
        published."""
        held = np.zeros(self.layout.max_num_reqs, bool)
        for host, want in zip(self._hosts, pages, strict=False):
            if want.size:
                table, _ = host.published_rows(0, host.num_rows)
                held |= np.isin(table, want).any(axis=1)
        return np.flatnonzero(held).astype(np.int32)

    def shard_sums(self) -> list[int]:
        """Each shard's checksum from the published rows."""
        return shard_sums(self._hosts, self.layout)

    def load(self, shard: int, state: ShardBatch) -> None:
        """Rows of ``shard`` from its full state, live and published (attach)."""
        start = self.layout.shard_rows(shard).start
        for host, group in zip(self._hosts, state.groups, strict=True):
            host.load(start, group)

    def reset(self) -> None:
        """Empty every row; what was published stays published until the next commit."""
        for host in self._hosts:
            host.reset()
