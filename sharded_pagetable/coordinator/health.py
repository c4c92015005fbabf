"""Whether a sharded table may touch its shards, and what it does when they fail.

Every call that reaches the shards runs through :meth:`Health.call`: a
:class:`ShardFailedError` that escapes it fails the table closed, a :class:`FencedError`
fences it off for good (a newer coordinator owns the shards), and with ``recover="auto"``
a failed table is recovered and the call retried. This is the one place that decides what
a failure means; the parts that meet failures only raise them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import FencedError, ShardFailedError
from ..table.validation import check_count

log = logging.getLogger(__name__)

T = TypeVar("T")
RECOVER_MODES = ("manual", "auto")


class Health:
    """The failed / fenced state of a table and its recovery policy.

    Args:
      mode: ``"manual"`` (a failed table raises until ``recover()``) or ``"auto"``
        (recovered inside the failing call, up to ``max_recoveries`` times).
      max_recoveries: recoveries one call may make.
    """

    def __init__(self, mode: str, max_recoveries: int) -> None:
        if mode not in RECOVER_MODES:
            raise ValueError(f"recover must be 'manual' or 'auto', got {mode!r}")
        if check_count(max_recoveries, 1000, "max_recoveries") < 1:
            raise ValueError(f"max_recoveries must be positive, got {max_recoveries}")
        self.mode = mode
        self.max_recoveries = max_recoveries
        self.failed: ShardFailedError | None = None  # why the table is fail-closed
        self.fenced: FencedError | None = None  # the newer coordinator that holds the shards

    def check(self) -> None:
        """Raise unless the table may use its shards now."""
        if self.fenced is not None:
            raise self.fenced
        if self.failed is not None:
            why = f"the table is fail-closed after an earlier failure ({self.failed.reason})"
            raise ShardFailedError(self.failed.shard, self.failed.epoch, why)

    def watch(self, fn: Callable[[], T]) -> T:
        """``fn()``, recording the failure it raises (the table then stays failed or fenced
        until it is recovered or closed)."""
        try:
            return fn()
        except FencedError as exc:
            self.fenced = exc
            raise
        except ShardFailedError as exc:
            self.failed = exc
            raise

    def call(self, fn: Callable[[], T], recover: Callable[[], Any]) -> T:
        """``fn()`` on a healthy table; with ``recover="auto"`` a failed table is recovered
        first (``recover()``), and a call that fails it is retried, up to
        ``max_recoveries`` recoveries."""
        attempts = 0
        while True:
            if self.failed is not None and self.mode == "auto" and self.fenced is None:
                if attempts >= self.max_recoveries:
                    raise self.failed
                attempts += 1
                log.warning(
                    "%s; recovering, attempt %d of %d", self.failed, attempts, self.max_recoveries
                )
                try:
                    recover()
                except ShardFailedError:
                    continue
            self.check()
            try:
                return self.watch(fn)
            except ShardFailedError:
                if self.mode != "auto":
                    raise

    def recovered(self) -> None:
        self.failed = None
