"""The coordinator: the scheduler's single entry point to a table sharded over processes.

It keeps a host mirror of every row (one :class:`HostRows` per group, which also owns what
is published of it), validates each call against it, and at ``commit`` turns the rows that
changed into one batch per shard. Cross-shard moves and swaps are resolved in the mirror
and reach the shards as ordinary row replacements, so shards never talk to each other.
Commit, recovery and attach are one path for every backend (:mod:`.backend`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from ..config import RayOptions, TableConfig
from ..constants import cdiv
from ..errors import FencedError, ShardFailedError
from ..routing.pools import PagePools
from ..rows.checksum import GroupConsts
from ..shard.wire import WireLimits
from ..table.host import HostRows
from ..table.page_table import check_page_sizes
from .attach import take_over
from .backend import Backend
from .commit import Commits
from .epochs import (
    failures,
    live_rows,
    new_generation,
    published_states,
)
from .metrics import TableMetrics
from .pooled import GuardedRowOps
from .reads import ShardReads
from .start import check_args, check_pool_pages, start_backend
from .view import GroupView

log = logging.getLogger(__name__)


class ShardedPageTable(GuardedRowOps, ShardReads, Commits):
    """``MultiGroupPageTable`` semantics with rows sharded over ``num_shards`` shards.

    Args:
      max_num_reqs, max_model_len, max_num_batched_tokens, page_sizes: as in
        ``MultiGroupPageTable``.
      num_shards: shard processes (``backend="ray"``) or in-process shards (``"local"``).
      backend: ``"local"`` (default, embedded) or ``"ray"``.
      mesh: a ``Mesh`` (local backend), a mapping of axis sizes such as
        ``{"data": 4, "model": 2}``, or None for a 1-D mesh over every device named
        ``row_axis``.
      row_axis: mesh axis the rows are split along.
      num_pages: if given, page ids must be below it.
      pages_per_shard: KV-local page pools: shard ``s`` owns page ids ``[s*P, (s+1)*P)``
        and a row may only hold pages of its own shard's pool.
      warmup: compile device-update buckets and kernels at start-up.
      recover: ``"manual"`` (a lost shard fails the table closed until ``recover()``) or
        ``"auto"`` (recovered inside the failing call, up to ``max_recoveries`` times).
      ray: options of the Ray backend (address, devices per shard, timeout, placement).
      metrics: True (or a :class:`TableMetrics`) to record Prometheus metrics in
        ``t.metrics`` (off by default: no cost).

    Example::

      with ShardedPageTable(1024, 32768, 8192, [16, 64], num_shards=4) as t:
          t.add_row([[1, 2], [9]], row_idx=0)
          t.move_row(0, 700)          # rows 0 and 700 live on different shards
          receipt = t.commit(1024)
    """

    def __init__(
        self,
        max_num_reqs: int,
        max_model_len: int,
        max_num_batched_tokens: int,
        page_sizes: Sequence[int],
        *,
        num_shards: int,
        backend: str = "local",
        mesh: Mesh | Mapping[str, int] | None = None,
        row_axis: str = "data",
        num_pages: int | None = None,
        pages_per_shard: int | None = None,
        warmup: bool = True,
        recover: str = "manual",
        max_recoveries: int = 3,
        ray: RayOptions | Mapping[str, Any] | None = None,
        metrics: bool | TableMetrics = False,
        _attach: bool = False,
    ) -> None:
        page_sizes = check_page_sizes(page_sizes)
        check_args(
            max_num_reqs=max_num_reqs,
            max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens,
            num_shards=num_shards,
            backend=backend,
            recover=recover,
            max_recoveries=max_recoveries,
        )
        self.max_num_reqs = max_num_reqs
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.page_sizes = page_sizes
        self.backend_name = backend
        self.row_axis = row_axis
        self.recover_mode = recover
        self.max_recoveries = max_recoveries
        self.recoveries: list[float] = []  # seconds each recovery took
        self.lost_kv_rows = np.empty(0, np.int32)  # i32[k] live rows the last recovery lost
        self._lock = threading.RLock()
        self.metrics = metrics if isinstance(metrics, TableMetrics) else None
        if metrics is True:
            self.metrics = TableMetrics()
        self.widths = widths = tuple(cdiv(max_model_len, s) for s in page_sizes)
        if pages_per_shard is not None:
            self._pools = PagePools(num_shards, max_num_reqs // num_shards, pages_per_shard)
            num_pages = check_pool_pages(num_pages, self._pools)
        self._hosts = [
            HostRows(max_num_reqs, w, num_pages, GroupConsts.build(g, w, max_num_reqs))
            for g, w in enumerate(widths)
        ]
        self._views = [
            GroupView(host, max_num_batched_tokens, functools.partial(self._group_array, g))
            for g, host in enumerate(self._hosts)
        ]
        self.epoch = 0
        self._failed: ShardFailedError | None = None
        self._fenced: FencedError | None = None
        self.layout, self.mesh_axes, self._backend = start_backend(
            backend,
            mesh,
            row_axis=row_axis,
            max_num_reqs=max_num_reqs,
            num_shards=num_shards,
            widths=widths,
            page_sizes=page_sizes,
            max_num_batched_tokens=max_num_batched_tokens,
            warmup=warmup,
            ray=ray,
            attach=_attach,
        )
        self._expected = [0] * num_shards  # u64 checksum each shard must report
        layout = self.layout
        self.wire_limits = WireLimits.for_shard(
            layout.rows_per_shard, widths, layout.max_num_reqs
        )  # what a shard accepts: every epoch is checked against it before it is sent
        try:
            if _attach:  # the previous coordinator stays in charge unless this completes
                taken = take_over(self._backend, self._hosts, self.layout)
                self.generation, self.epoch = taken.generation, taken.epoch
                self._expected, self._failed = taken.expected, taken.lost
            else:
                # A generation above every one the shards obeyed.
                status = self._backend.status()
                self.generation = new_generation(max(a.generation for a in status))
                self._fence(self._backend)
        except BaseException:
            backend, self._backend = self._backend, None
            if _attach:  # only shards this coordinator created may be stopped
                backend.detach()
            else:
                backend.close(clean=False)
            raise

    @classmethod
    def from_config(cls, config: TableConfig | str, **overrides: Any) -> ShardedPageTable:
        """Build a table from a :class:`TableConfig` or a YAML file of ``configs/``."""
        config = TableConfig.resolve(config, **overrides)
        return cls(*config.shape(), **config.kwargs())

    @classmethod
    def attach(cls, config: TableConfig | str, **overrides: Any) -> ShardedPageTable:
        """A new coordinator for the running, detached shard actors of ``config``.

        The mirror is rebuilt from the shards at the newest epoch every shard can present:
        shards one epoch ahead (a commit the old coordinator never finished) step back.
        """
        config = TableConfig.resolve(config, **overrides)
        if config.backend != "ray" or not config.ray.detached:
            raise ValueError("attach needs backend: ray with ray.detached: true")
        return cls(*config.shape(), _attach=True, **config.kwargs())

    # -- reads ---------------------------------------------------------------------------

    def __getitem__(self, group: int) -> GroupView:
        return self._views[group]

    def __len__(self) -> int:
        return len(self._views)

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    def _open(self) -> Backend:
        if self._backend is None:
            raise RuntimeError("this ShardedPageTable is closed")
        return self._backend

    def _live_backend(self) -> Backend:
        backend = self._open()
        if self._fenced is not None:
            raise self._fenced
        if self._failed is not None:
            why = f"the table is fail-closed after an earlier failure ({self._failed.reason})"
            raise ShardFailedError(self._failed.shard, self._failed.epoch, why)
        return backend

    def _retrying(self, fn: Callable[[Backend], Any]) -> Any:
        """``fn(backend)``; with ``recover="auto"`` a failed table is recovered first, and a
        call that fails it is retried, up to ``max_recoveries`` recoveries."""
        attempts = 0
        while True:
            if self._failed is not None and self.recover_mode == "auto":
                if attempts >= self.max_recoveries:
                    raise self._failed
                attempts += 1
                log.warning(
                    "%s; recovering, attempt %d of %d", self._failed, attempts, self.max_recoveries
                )
                try:
                    self.recover()
                except ShardFailedError:
                    continue
            try:
                return fn(self._live_backend())
            except ShardFailedError:
                if self.recover_mode != "auto" or self._failed is None:
                    raise

    # -- recovery --------------------------------------------------------------------------

    def recover(self) -> float:
        """Replace the shards and rebuild them at the last published epoch.

        Every shard is restarted (a JAX distributed job cannot continue without one of its
        processes), re-seeded from the coordinator's published rows and verified by
        checksum. Pending changes stay pending for the next commit. The page table survives;
        what the shard processes computed does not: ``lost_kv_rows`` then names every row
        that was live, whose KV the scheduler must recompute. Returns the seconds it took;
        raises :class:`ShardFailedError` if a new shard fails too.
        """
        with self._lock:
            backend = self._open()
            with contextlib.suppress(ShardFailedError):
                self._settle_in_flight()  # a failure it finds is what is being recovered
            if self._fenced is not None:
                raise self._fenced  # the shards belong to a newer coordinator: never restart them
            t0 = time.perf_counter()
            self.lost_kv_rows = live_rows(self._hosts)
            try:
                backend.restart()
                self._fence(backend)
                states = published_states(self._hosts, self.layout, self.epoch, self.generation)
                results = backend.reseed(states, self.generation)
            except ShardFailedError as exc:
                self._failed = exc
                raise
            except Exception as exc:
                self._failed = ShardFailedError(-1, self.epoch, f"restart failed: {exc}")
                raise self._failed from exc
            failed = failures(results, self._expected, self.epoch, "re-seeded to")
            if failed:
                shard, reason = failed[0]
                self._failed = ShardFailedError(shard, self.epoch, reason)
                raise self._failed
            self._failed = None
            seconds = time.perf_counter() - t0
            self.recoveries.append(seconds)
            if self.metrics is not None:
                self.metrics.recovered()
            log.warning(
                "recovered %d shards at epoch %d in %.2fs", self.num_shards, self.epoch, seconds
            )
            return seconds

    # -- whole-table operations ----------------------------------------------------------

    def clear(self) -> None:
        """Empty every row of every group, on the host and on every shard's devices."""
        with self._lock:
            self._live_backend()
            for host in self._hosts:
                host.reset()
            self.commit(self.max_num_reqs)

    def close(self, stop_shards: bool | None = None) -> None:
        """Release the shards (actors and devices). Safe to call twice.

        Only the coordinator that started the shards stops them (``stop_shards=None``); one
        that attached to running shards, or that a newer one took over, lets go of them and
        leaves them running. ``stop_shards=True`` stops shards this coordinator attached to
        (a detached table's final shutdown); ``False`` leaves even its own running.
        """
        with self._lock:
            if self._backend is not None:
                with contextlib.suppress(ShardFailedError, FencedError):
                    self._settle_in_flight()
            backend, self._backend = self._backend, None
            if backend is None:
                return
            stop = backend.started_shards if stop_shards is None else stop_shards
            if self._fenced is not None or not stop:
                backend.detach()
            else:
                backend.close(clean=self._failed is None)

    def __enter__(self) -> ShardedPageTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
