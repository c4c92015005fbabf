"""The side-effect point of a sharded table: sending an epoch and confirming it.

The committer owns the epoch state: the last confirmed epoch, this coordinator's
generation, the checksum every shard must report, and the epoch in flight. A commit stages
an epoch from the mirror, checks it against what a shard accepts, sends it and takes it as
published in the mirror at once (so the scheduler may change rows for the next step while
the shards apply this one). Only the shards the epoch touches are sent a message and waited
on (:func:`~.epochs.touched_shards`); the others keep the epoch they hold, which the
committer tracks per shard. :meth:`EpochCommitter.settle` collects the touched shards'
answers; if any failed, the shards that applied step back, the mirror steps back too
(keeping every change made since) and the failure is raised. At most one epoch is in flight: the next
commit, every read, ``recover()`` and ``close()`` settle it first; row operations do not
(they only change the mirror).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import FencedError, ShardFailedError
from ..rows.messages import Ack, Schedule
from ..shard.wire import WireLimits
from .backend import Backend, Result
from .epochs import EpochId, EpochPlan, failures
from .metrics import TableMetrics
from .mirror import Mirror, Published
from .receipt import CommitReceipt, ShardReceipt


@dataclass(eq=False)
class InFlight:
    """An epoch sent and not yet confirmed."""

    receipt: CommitReceipt
    published: Published
    started: float  # perf_counter() when the commit began
    schedule: Schedule | None  # the epoch's step schedule (all rows), if it carried one
    touched: np.ndarray  # i64[k] the shards it was sent to, in send order


class EpochCommitter:
    """Sends epochs staged by a :class:`Mirror` and confirms them with every shard.

    Args:
      mirror: the rows epochs are staged from and published in.
      wire_limits: what a shard accepts; a larger epoch is refused before it is sent.
      metrics: where commits are recorded, or None.
    """

    def __init__(
        self, mirror: Mirror, wire_limits: WireLimits, metrics: TableMetrics | None
    ) -> None:
        self.mirror = mirror
        self.wire_limits = wire_limits
        self.metrics = metrics
        shards = mirror.layout.num_shards
        self.epoch = 0  # the last confirmed epoch
        self.generation = 0  # this coordinator's (see fence)
        self.expected = [0] * shards  # u64 checksum each shard must report
        self.held = np.zeros(shards, np.int64)  # the epoch each shard holds (<= self.epoch)
        # The step schedule every shard holds (all rows: a shard an epoch did not touch held
        # that epoch's part already), or None.
        self.schedule: Schedule | None = None
        # Shards given new processes, and rows whose KV copies died, by recovery attempts
        # that have not succeeded yet (reported by the one that does).
        self._fresh: set[int] = set()
        self._orphans: set[int] = set()
        self._in_flight: InFlight | None = None

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    def stage(self, num_reqs: int, schedule: Schedule | None) -> EpochPlan | None:
        """The next epoch as the mirror stages it (None if nothing would change)."""
        epoch = EpochId(self.epoch + 1, self.epoch, self.generation)
        return self.mirror.stage(epoch, num_reqs, schedule, self.held, self.schedule)

    def check_current(self, plan: EpochPlan) -> None:
        """Refuse a plan staged before a later commit, recovery or row change."""
        if plan.id != EpochId(self.epoch + 1, self.epoch, self.generation):
            raise ValueError(f"epoch {plan.id} is not the next one; stage it again")
        self.mirror.check_current(plan)

    def send(
        self,
        backend: Backend,
        plan: EpochPlan | None,
        num_reqs: int,
        started: float | None = None,
    ) -> CommitReceipt:
        """Send ``plan`` (the current one: :meth:`check_current`) and take it as published in
        the mirror (unconfirmed); an oversized epoch raises ``BatchTooLargeError`` before
        anything is sent. ``started``: ``perf_counter()`` when the commit began (metrics)."""
        started = time.perf_counter() if started is None else started
        if plan is None:
            return CommitReceipt(self.epoch, num_reqs, False, ())
        for message in plan.messages:  # an oversized epoch is the caller's error
            self.wire_limits.check(message)
        backend.send(plan.messages)
        # While the shards apply: what each shard must report, and the mirror's new state.
        published = self.mirror.publish(plan, self.expected)
        receipts = tuple(
            ShardReceipt(m.shard, m.rows, m.nbytes, published.expected[m.shard])
            for m in plan.messages
        )
        receipt = CommitReceipt(
            plan.id.epoch, num_reqs, True, receipts, plan.kv_copies, confirmed=False
        )
        self._in_flight = InFlight(receipt, published, started, plan.schedule, plan.touched)
        if self.metrics is not None:
            self.metrics.sent(receipt)
        return receipt

    def settle(self, backend: Backend) -> CommitReceipt | None:
        """Confirm the epoch in flight (None if there is none) with the shards it touched, or
        step everything back and raise :class:`ShardFailedError` / :class:`FencedError`."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return None
        epoch = flight.receipt.epoch
        try:
            acks = backend.collect()
            self._confirm(backend, acks, flight.touched, flight.published.expected, epoch)
        except BaseException:
            self.mirror.unpublish(flight.published)
            if self.metrics is not None:
                self.metrics.failed()
            raise
        self.expected = flight.published.expected
        self.epoch = epoch
        self.held[flight.touched] = epoch
        self.schedule = flight.schedule
        if self.metrics is not None:
            self.metrics.confirmed(epoch, time.perf_counter() - flight.started, acks)
        return flight.receipt.confirm([a.apply_us for a in acks])

    def _confirm(
        self,
        backend: Backend,
        results: list[Result],
        shards: np.ndarray,
        expected: list[int],
        epoch: int,
    ) -> None:
        """Raise (after rolling back every shard that applied) unless every one of
        ``shards`` (whose answers ``results`` are) confirmed ``epoch`` with the checksum
        expected of it."""
        shards = shards.tolist()
        failed = failures(results, shards, expected, epoch, "acked")
        if not failed:
            return
        self.check_fenced(results)
        applied = [
            s
            for s, r in zip(shards, results, strict=True)
            if isinstance(r, Ack) and r.epoch == epoch
        ]
        if applied:
            self.check_fenced(backend.rollback(applied, epoch, self.generation))
        shard, reason = failed[0]
        raise ShardFailedError(shard, epoch, reason + "; nothing was published")

    def check_fenced(self, results: Sequence[Result]) -> None:
        """A newer coordinator owns the shards: raise the :class:`FencedError` saying so."""
        for res in results:
            if isinstance(res, FencedError):
                raise FencedError(self.generation, res.holder)

    def fence(self, backend: Backend) -> None:
        """Make every shard obey this coordinator's generation."""
        results = backend.fence(self.generation)
        self.check_fenced(results)
        for s, res in enumerate(results):
            if isinstance(res, BaseException):
                raise ShardFailedError(s, self.epoch, f"fence: {type(res).__name__}: {res}")

    def rebuild(self, backend: Backend) -> tuple[list[int], np.ndarray]:
        """Bring every shard back to the confirmed epoch (the caller settled the epoch in
        flight): shards whose process is gone get new ones (:meth:`Backend.replace_dead`),
        and those plus any live shard that does not hold what the mirror published are
        re-seeded from the mirror (with the confirmed epoch's step schedule, so a model step
        can run at once); the others keep everything, except pending KV copies
        from or into a replaced shard's pool. Returns the shards that got new processes and
        the live rows of other shards whose KV died with them (``i32[k]``: rows a pending or
        torn KV copy from a replaced pool was to fill); raises if a shard fails again.

        What an attempt that failed half-way had already replaced, or found lost, is kept
        and returned by the next attempt that succeeds: a process started by a failed
        recovery holds no KV either."""
        try:
            self._fresh.update(backend.replace_dead())
            fresh = sorted(self._fresh)
            self.fence(backend)
            pools = self.mirror.pool_pages(fresh)
            if pools and len(fresh) < len(self.expected):
                lost = backend.drop_kv_copies(pools)
                pages = [
                    np.unique(np.concatenate([np.asarray(p[g], np.int64) for p in lost if p]))
                    for g in range(len(self.mirror.hosts))
                ]
                self._orphans.update(self.mirror.rows_holding(pages).tolist())
            held = backend.status()
            stale = sorted(
                set(fresh)
                | {s for s, a in enumerate(held) if (a.epoch, a.checksum) != self.holds(s)}
            )
            states = self.mirror.published_states(self.epoch, self.generation, self.schedule)
            results = backend.reseed(stale, [states[s] for s in stale], self.generation)
        except ShardFailedError:
            raise
        except Exception as exc:
            raise ShardFailedError(-1, self.epoch, f"restart failed: {exc}") from exc
        failed = failures(results, stale, self.expected, self.epoch, "re-seeded to")
        if failed:
            shard, reason = failed[0]
            raise ShardFailedError(shard, self.epoch, reason)
        self.held[stale] = self.epoch
        orphans = np.array(sorted(self._orphans), np.int32)
        orphans = orphans[~np.isin(orphans, self.mirror.live_rows(fresh))]
        self._fresh, self._orphans = set(), set()
        return fresh, orphans

    def holds(self, shard: int) -> tuple[int, int]:
        """``(epoch, checksum)`` shard ``shard`` must report: the epoch that last touched it
        (or rebuilt it), which may be older than the table's."""
        return int(self.held[shard]), self.expected[shard]
