"""The side-effect point of a sharded table: commit, pipelined or not, and its confirmation.

A commit builds one batch per shard from the mirror, sends it, and takes it as published in
the mirror at once (``HostRows.publish``), so the scheduler may change rows for the next
step while the shards apply this one. :meth:`Commits.wait` (or the commit itself, unless
``wait=False``) collects every shard's answer; if any failed, the shards that applied step
back, the mirror steps back too (keeping every change made since) and the failure is
raised. At most one epoch is in flight: every later call settles it first.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import FencedError, ShardFailedError
from ..rows.messages import Ack, Schedule, ShardBatch
from ..shard.wire import WireLimits
from ..table.host import Unpublish
from ..table.schedule import check_schedule
from ..table.validation import check_count
from .backend import Backend, Result
from .epochs import expected_after, failures, shard_messages
from .metrics import TableMetrics
from .receipt import CommitReceipt, ShardReceipt
from .start import step_config


@dataclass(eq=False)
class InFlight:
    """An epoch sent and not yet confirmed."""

    receipt: CommitReceipt
    messages: list[ShardBatch]
    expected: list[int]
    undo: list[Unpublish]
    started: float  # perf_counter() when the commit began


class Commits:
    """Mixed into ``ShardedPageTable`` (it provides the mirror, the lock, the backend and
    the epoch state)."""

    _in_flight: InFlight | None = None
    metrics: TableMetrics | None = None
    wire_limits: WireLimits

    def commit(
        self,
        num_reqs: int,
        num_scheduled_tokens: object = None,
        num_computed_tokens: object = None,
        *,
        wait: bool = True,
    ) -> CommitReceipt:
        """Publish rows ``[0, num_reqs)`` on every shard as one new epoch; returns a receipt
        (the epoch; per shard the rows and bytes sent and the checksum it confirmed; the KV
        copies the model step must make).

        With ``num_scheduled_tokens`` and ``num_computed_tokens`` (one int per row below
        ``num_reqs``) the epoch also carries the step's schedule: every shard builds the
        step's inputs (:meth:`step_snapshot`) on its own devices. A schedule that does not
        fit is refused before anything is sent. If any shard fails, every shard steps back,
        nothing is published, the mirror keeps the pending changes, and
        :class:`ShardFailedError` names the shard; with ``recover="auto"`` a lost shard is
        replaced and the commit retried.

        With ``wait=False`` it returns as soon as every shard's message is on its way (the
        receipt's ``confirmed`` is False); :meth:`wait` returns the confirmed receipt, and
        any later call settles the epoch first: if it failed, that call raises
        :class:`ShardFailedError` naming it, and neither it nor a later epoch is published.
        """
        n = check_count(num_reqs, self.max_num_reqs, "num_reqs")
        with self._lock:
            self._settle_in_flight()
            schedule = None
            if num_scheduled_tokens is not None or num_computed_tokens is not None:
                schedule = self._check_schedule(n, num_scheduled_tokens, num_computed_tokens)

            def attempt(backend: Backend) -> CommitReceipt:
                receipt = self._send_epoch(backend, n, schedule)
                return receipt if not wait else self._settle_in_flight() or receipt

            return self._retrying(attempt)

    def wait(self) -> CommitReceipt | None:
        """The confirmed receipt of the last ``commit(..., wait=False)`` (None if nothing is
        in flight); raises :class:`ShardFailedError` if that epoch failed."""
        with self._lock:
            self._open()
            return self._settle_in_flight()

    def _check_schedule(self, n: int, sched: object, done: object) -> Schedule:
        step = step_config(self.page_sizes, self.max_num_batched_tokens, self.layout)
        if step is None:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} does not split into "
                f"equal token blocks over the {self.layout.num_blocks} devices of the row "
                "axis: this table cannot build step inputs"
            )
        counts = [host.counts for host in self._hosts]
        return check_schedule(
            counts, sched, done, n, self.page_sizes, self.num_shards, step.tokens_per_shard
        )

    def _send_epoch(self, backend: Backend, n: int, schedule: Schedule | None) -> CommitReceipt:
        """Send the next epoch and take it as published in the mirror (unconfirmed)."""
        started = time.perf_counter()
        batches = [host.batch(n) for host in self._hosts]
        if schedule is None and not any(b.size for b in batches):
            return CommitReceipt(self.epoch, n, False, ())
        epoch = self.epoch + 1
        plans = tuple(host.copy_plan() for host in self._hosts)
        messages = shard_messages(
            epoch, self.epoch, self.generation, batches, self.layout, schedule, plans
        )
        for message in messages:  # an oversized epoch is the caller's error, not a shard's
            self.wire_limits.check(message)
        backend.send(messages)
        # While the shards apply: the terms each row will have and what each shard must report.
        terms = [host.terms_after(b) for host, b in zip(self._hosts, batches, strict=True)]
        expected = expected_after(
            self._expected, batches, [delta for _, delta in terms], self.layout.bounds
        )
        undo = [
            host.publish(b, t) for host, b, (t, _) in zip(self._hosts, batches, terms, strict=True)
        ]
        receipts = tuple(
            ShardReceipt(s, m.rows, m.nbytes, expected[s]) for s, m in enumerate(messages)
        )
        receipt = CommitReceipt(epoch, n, True, receipts, plans, confirmed=False)
        self._in_flight = InFlight(receipt, messages, expected, undo, started)
        if self.metrics is not None:
            self.metrics.sent(receipt)
        return receipt

    def _settle_in_flight(self) -> CommitReceipt | None:
        """Confirm the epoch in flight, or step everything back and raise."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return None
        backend = self._open()
        epoch = flight.receipt.epoch
        try:
            acks = backend.collect()
            self._confirm(backend, acks, flight.expected, epoch)
        except BaseException:
            for host, undo in zip(reversed(self._hosts), reversed(flight.undo), strict=True):
                host.unpublish(undo)
            if self.metrics is not None:
                self.metrics.failed()
            raise
        self._expected = flight.expected
        self.epoch = epoch
        if self.metrics is not None:
            self.metrics.confirmed(epoch, time.perf_counter() - flight.started, acks)
        return flight.receipt.confirm()

    def _confirm(self, backend: Backend, results: list[Result], expected: list[int], epoch: int):
        """Raise (after rolling back every shard that applied) unless every shard confirmed
        ``epoch`` with the checksum expected of it."""
        failed = failures(results, expected, epoch, "acked")
        if not failed:
            return
        self._check_fenced(results)
        applied = [s for s, r in enumerate(results) if isinstance(r, Ack) and r.epoch == epoch]
        rollback = backend.rollback(applied, epoch, self.generation) if applied else []
        self._check_fenced(rollback)
        shard, reason = failed[0]
        self._failed = ShardFailedError(shard, epoch, reason + "; nothing was published")
        raise self._failed

    def _check_fenced(self, results: Sequence[Result]) -> None:
        """A newer coordinator owns the shards: refuse everything from now on."""
        for res in results:
            if isinstance(res, FencedError):
                self._fenced = FencedError(self.generation, res.holder)
                raise self._fenced

    def _fence(self, backend: Backend) -> None:
        results = backend.fence(self.generation)
        self._check_fenced(results)
        for s, res in enumerate(results):
            if isinstance(res, BaseException):
                raise ShardFailedError(s, self.epoch, f"fence: {type(res).__name__}: {res}")
