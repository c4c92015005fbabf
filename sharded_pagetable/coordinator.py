"""The coordinator: the scheduler's single entry point to a table sharded over processes.

It keeps a host mirror of every row, validates each call against it, and at ``commit`` turns
the rows that changed into one wire message per shard. Cross-shard moves and swaps are
resolved in the mirror and reach the shards as ordinary row replacements, so shards never
talk to each other.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from . import checksum, kernels
from .backends import Backend, LocalBackend
from .checksum import segment_index
from .config import RayOptions, TableConfig
from .constants import cdiv
from .errors import ShardFailedError
from .host import CLEAN, REWRITTEN, HostRows
from .layout import ShardLayout
from .mesh import build_mesh, row_sharding
from .page_table import check_page_sizes
from .receipt import CommitReceipt, ShardReceipt
from .row_ops import MultiGroupRowOps
from .shard import Ack, ShardSpec, apply_group
from .validation import check_count
from .wire import (
    OP_APPEND,
    OP_CLEAR,
    OP_SET,
    GroupBatch,
    ShardBatch,
    WireLimits,
    decode,
    encode,
    state_batch,
)

log = logging.getLogger(__name__)


def _synchronized(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(self: ShardedPageTable, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class GroupView:
    """``t[g]`` of a :class:`ShardedPageTable`: host reads come from the coordinator's mirror."""

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


class ShardedPageTable(MultiGroupRowOps):
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
      warmup: compile device-update buckets at start-up.
      ray: options of the Ray backend (address, devices per shard, timeout, placement).

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
        warmup: bool = True,
        recover: str = "manual",
        max_recoveries: int = 3,
        ray: RayOptions | Mapping[str, Any] | None = None,
        _attach: bool = False,
    ) -> None:
        page_sizes = check_page_sizes(page_sizes)
        if recover not in ("manual", "auto"):
            raise ValueError(f"recover must be 'manual' or 'auto', got {recover!r}")
        if check_count(max_recoveries, 1000, "max_recoveries") < 1:
            raise ValueError(f"max_recoveries must be positive, got {max_recoveries}")
        for name, value in (
            ("max_num_reqs", max_num_reqs),
            ("max_model_len", max_model_len),
            ("max_num_batched_tokens", max_num_batched_tokens),
        ):
            if check_count(value, 2**31 - 1, name) < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if backend not in ("local", "ray"):
            raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
        self.max_num_reqs = max_num_reqs
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.page_sizes = page_sizes
        self.backend_name = backend
        self.row_axis = row_axis
        self.recover_mode = recover
        self.max_recoveries = max_recoveries
        self.recoveries: list[float] = []  # seconds each recovery took
        self._lock = threading.RLock()
        widths = tuple(cdiv(max_model_len, s) for s in page_sizes)
        self.widths = widths
        self._hosts = [HostRows(max_num_reqs, w, num_pages) for w in widths]
        # What the shards hold: the tables and counts as of the last published epoch.
        self._published = [np.zeros((max_num_reqs, w), np.int32) for w in widths]
        self._published_counts = [np.zeros(max_num_reqs, np.int32) for _ in widths]
        self._inner = [np.zeros(max_num_reqs, np.uint64) for _ in widths]
        # Checksum tables for the compiled kernels: column weights per group, row mixes.
        self._col_w = [checksum.col_weights(np.arange(w)) for w in widths]
        self._mix = [
            checksum.row_mix_table(g, checksum.table_size(max_num_reqs)) for g in range(len(widths))
        ]
        if warmup:  # compile (or load from numba's cache) the kernels before the first commit
            empty = [self._group_updates(g, 0) for g in range(len(widths))]
            self._publish_host(empty)
            for g, b in enumerate(empty):
                kernels.preview_delta(
                    self._inner[g],
                    b.row,
                    b.start,
                    b.count,
                    b.pages,
                    self._col_w[g],
                    self._mix[g],
                    0,
                    checksum.C_COUNT,
                )
        self._views = [GroupView(self, g) for g in range(len(widths))]
        self.epoch = 0
        self._failed: ShardFailedError | None = None
        self._backend: Backend | None = None

        if backend == "local":
            if mesh is None or isinstance(mesh, Mapping):
                mesh = build_mesh(mesh, row_axis)
            sharding = row_sharding(mesh, row_axis)
            self.layout = ShardLayout(max_num_reqs, num_shards, mesh.shape[row_axis])
            self.mesh_axes = dict(mesh.shape)
            self._backend = LocalBackend(self.layout, sharding, self._published, warmup)
        else:
            from ray_actors.backend import RayBackend

            options = RayOptions.from_value(ray)
            if isinstance(mesh, Mesh):
                raise ValueError(
                    "backend='ray' builds its mesh inside the shard processes: pass mesh as a "
                    "mapping of axis sizes such as {'data': 8}, not a Mesh"
                )
            axes = dict(mesh) if mesh else {row_axis: num_shards * options.devices_per_shard}
            if row_axis not in axes:
                raise ValueError(f"row_axis {row_axis!r} is not an axis of the mesh {axes}")
            self.layout = ShardLayout(max_num_reqs, num_shards, axes[row_axis])
            self.mesh_axes = axes
            specs = [ShardSpec(s, self.layout, widths, warmup) for s in range(num_shards)]
            self._backend = RayBackend(specs, axes, row_axis, options, attach=_attach)
        self._expected = [0] * num_shards  # u64 checksum each shard must report
        if _attach:
            try:
                self._adopt()
            except BaseException:
                self._backend.detach()
                raise

    @classmethod
    def from_config(cls, path: str, **overrides: Any) -> ShardedPageTable:
        """Build a table from a YAML file of ``configs/`` (keys as in :class:`TableConfig`)."""
        return TableConfig.from_yaml(path, **overrides).build()

    @classmethod
    def attach(cls, config: TableConfig | str, **overrides: Any) -> ShardedPageTable:
        """A new coordinator for the running, detached shard actors of ``config``.

        The mirror is rebuilt from the shards at the newest epoch every shard can present:
        shards one epoch ahead (a commit the old coordinator never finished) step back.
        """
        if isinstance(config, str):
            config = TableConfig.from_yaml(config, **overrides)
        elif overrides:
            config = TableConfig.from_dict({**config.__dict__, **overrides})
        if config.backend != "ray" or not config.ray.detached:
            raise ValueError("attach needs backend: ray with ray.detached: true")
        return cls(
            config.max_num_reqs,
            config.max_model_len,
            config.max_num_batched_tokens,
            config.page_sizes,
            _attach=True,
            **config.kwargs(),
        )

    # -- reads ---------------------------------------------------------------------------

    def __getitem__(self, group: int) -> GroupView:
        return self._views[group]

    def __len__(self) -> int:
        return len(self._views)

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    def _live_backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError("this ShardedPageTable is closed")
        if self._failed is not None:
            raise ShardFailedError(
                self._failed.shard,
                self._failed.epoch,
                f"the table is fail-closed after an earlier failure ({self._failed.reason})",
            )
        return self._backend

    def _group_array(self, group: int) -> jax.Array:
        with self._lock:  # a commit in another thread would donate the buffers under us
            return self._group_array_unlocked(group)

    def _group_array_unlocked(self, group: int) -> jax.Array:
        backend = self._live_backend()
        if not isinstance(backend, LocalBackend):
            raise RuntimeError(
                "with backend='ray' each group's global array lives in the shard processes; "
                "use run_on_shards(fn) to compute on it or device_snapshot(g) to read it"
            )
        return backend.group_array(group)

    def device_snapshot(self, group: int) -> np.ndarray:
        """``i32[R, P]`` numpy copy of group ``group``'s committed device table."""
        if not 0 <= group < len(self._hosts):
            raise IndexError(f"group {group} is out of range: valid 0..{len(self._hosts) - 1}")
        return self._read(lambda backend: backend.device_snapshot(group))

    def run_on_shards(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run ``fn(list_of_group_arrays, *args)`` in every shard process at once.

        The arrays are the committed global arrays (each process sees its addressable part),
        so a jitted function over them is an SPMD program across the shard processes.
        ``fn`` is trusted driver code: it runs with the shard process's privileges.
        """
        return self._read(lambda backend: backend.run_on_shards(fn, *args))

    def shard_status(self) -> list[tuple[int, int]]:
        """``(epoch, checksum)`` each shard reports now; all equal to ``(t.epoch, receipt
        checksum)`` when the table is healthy."""
        if self._backend is not None and self._backend.in_process:
            with self._lock:
                self._live_backend()
                return [(self.epoch, c) for c in self._expected]
        return self._read(lambda backend: [(a.epoch, a.checksum) for a in backend.status()])

    def _read(self, fn: Callable[[Backend], Any]) -> Any:
        """Run a read on the shards; a lost shard fails the table closed, and with
        ``recover="auto"`` the shards are recovered and the read retried once."""
        with self._lock:
            if self._failed is not None and self.recover_mode == "auto":
                self.recover()
            try:
                return fn(self._live_backend())
            except ShardFailedError as exc:
                self._failed = exc
                if self.recover_mode != "auto":
                    raise
            self.recover()
            return fn(self._live_backend())

    # -- the side-effect point -------------------------------------------------------------

    def _group_updates(self, g: int, n: int) -> GroupBatch:
        """Group ``g``'s pending rows below ``n`` as one batch over global rows."""
        host = self._hosts[g]
        rows = host.pending(n)
        counts = host.counts[rows]
        starts = np.where(host.rewritten(rows), 0, self._published_counts[g][rows]).astype(np.int32)
        op = np.where(starts > 0, OP_APPEND, np.where(counts == 0, OP_CLEAR, OP_SET))
        r, c = segment_index(rows, starts, counts)
        return GroupBatch(op.astype(np.int32), rows, starts, counts, host.table[r, c])

    def commit(self, num_reqs: int) -> CommitReceipt:
        """Publish rows ``[0, num_reqs)`` on every shard as one new epoch.

        Returns a receipt with the epoch and, per shard, rows and bytes sent and the checksum
        the shard confirmed. If any shard fails, every shard steps back, nothing is
        published, the mirror keeps the pending changes, and :class:`ShardFailedError`
        names the shard. With ``recover="auto"`` a lost shard is replaced and the commit
        retried, up to ``max_recoveries`` times.
        """
        n = check_count(num_reqs, self.max_num_reqs, "num_reqs")
        with self._lock:
            attempts = 0
            while True:
                if self._failed is not None and self.recover_mode == "auto":
                    if attempts >= self.max_recoveries:
                        raise self._failed
                    attempts += 1
                    log.warning(
                        "shard %d lost at epoch %d (%s); recovering, attempt %d of %d",
                        self._failed.shard,
                        self._failed.epoch,
                        self._failed.reason,
                        attempts,
                        self.max_recoveries,
                    )
                    try:
                        self.recover()
                    except ShardFailedError:
                        continue
                try:
                    return self._commit_once(n)
                except ShardFailedError:
                    if self.recover_mode != "auto" or self._failed is None:
                        raise

    def _commit_once(self, n: int) -> CommitReceipt:
        backend = self._live_backend()
        updates = [self._group_updates(g, n) for g in range(len(self._hosts))]
        if not any(b.size for b in updates):
            return CommitReceipt(self.epoch, n, False, ())
        epoch = self.epoch + 1
        layout = self.layout
        bounds = np.arange(layout.num_shards + 1) * layout.rows_per_shard
        per_shard: list[list[GroupBatch]] = [[] for _ in range(layout.num_shards)]
        expected = list(self._expected)
        previews: list[tuple[int, ...]] = []  # shard, group, row and page slice bounds
        for g, batch in enumerate(updates):
            rows = batch.row
            cut = np.searchsorted(rows, bounds).tolist()
            written = batch.count.astype(np.int64) - batch.start
            page_cut = np.concatenate([[0], np.cumsum(written)])[cut].tolist()
            for s in range(layout.num_shards):
                i, j = cut[s], cut[s + 1]
                per_shard[s].append(
                    GroupBatch(
                        batch.op[i:j],
                        (rows[i:j] - bounds[s]).astype(np.int32),
                        batch.start[i:j],
                        batch.count[i:j],
                        batch.pages[page_cut[s] : page_cut[s + 1]],
                    )
                )
                if j > i:
                    previews.append((s, g, i, j, page_cut[s], page_cut[s + 1]))

        def expect() -> None:
            """Each shard's checksum after this epoch (no state changes; runs while the
            shards apply their batches)."""
            for s, g, i, j, p0, p1 in previews:
                batch = updates[g]
                delta = kernels.preview_delta(
                    self._inner[g],
                    batch.row[i:j],
                    batch.start[i:j],
                    batch.count[i:j],
                    batch.pages[p0:p1],
                    self._col_w[g],
                    self._mix[g],
                    0,
                    checksum.C_COUNT,
                )
                expected[s] = checksum.add(expected[s], int(delta))

        if backend.in_process:
            # In-process shards read the published tables: write them, then the devices.
            expect()
            sizes = [sum(_payload(b) for b in groups) for groups in per_shard]
            cells = [self._apply_published(g, batch) for g, batch in enumerate(updates)]
            for batch, host in zip(updates, self._hosts, strict=True):
                host.mark_published(batch.row)
            backend.publish(cells)
        else:
            messages = [
                encode(ShardBatch(epoch, self.epoch, s, tuple(groups)))
                for s, groups in enumerate(per_shard)
            ]
            sizes = [len(m) for m in messages]
            undo: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

            def meanwhile() -> None:
                # While the shards work: the expected checksums, and the published tables
                # written ahead (with their undo) so a settled commit only marks rows clean.
                expect()
                for g, batch in enumerate(updates):
                    rows = batch.row
                    undo.append(
                        (
                            rows,
                            self._published[g][rows],
                            self._published_counts[g][rows],
                            self._inner[g][rows],
                        )
                    )
                    self._apply_published(g, batch)

            try:
                self._settle(backend.apply(messages, meanwhile=meanwhile), expected, epoch)
            except BaseException:
                for g, (rows, table, counts, inner) in enumerate(undo):
                    self._published[g][rows] = table
                    self._published_counts[g][rows] = counts
                    self._inner[g][rows] = inner
                raise
            for batch, host in zip(updates, self._hosts, strict=True):
                host.mark_published(batch.row)
        self._expected = expected
        self.epoch = epoch
        return CommitReceipt(
            epoch,
            n,
            True,
            tuple(
                ShardReceipt(s, sum(b.size for b in per_shard[s]), sizes[s], expected[s])
                for s in range(layout.num_shards)
            ),
        )

    def _publish_host(self, updates: list[GroupBatch]) -> None:
        """Apply a settled epoch to the published tables and mark its rows clean."""
        for g, batch in enumerate(updates):
            self._apply_published(g, batch)
            self._hosts[g].mark_published(batch.row)

    def _apply_published(self, g: int, batch: GroupBatch) -> tuple[np.ndarray, np.ndarray]:
        """Write one group's batch into the published table and its checksum terms; returns
        the changed cells (global rows, columns)."""
        written = int(np.maximum(batch.count, self._published_counts[g][batch.row]).sum())
        cells_r = np.empty(written - int(batch.start.sum()), np.int64)
        cells_c = np.empty_like(cells_r)
        _, n = kernels.apply_batch(
            self._published[g],
            self._published_counts[g],
            self._inner[g],
            batch.row,
            batch.start,
            batch.count,
            batch.pages,
            self._col_w[g],
            self._mix[g],
            0,
            checksum.C_COUNT,
            cells_r,
            cells_c,
        )
        return cells_r[:n], cells_c[:n]

    def _settle(self, results: list[Ack | BaseException], expected: list[int], epoch: int) -> None:
        """Raise (after rolling back every shard that applied) unless every shard acked."""
        failures: list[tuple[int, str, bool]] = []  # shard, reason, shard lost
        for s, res in enumerate(results):
            if isinstance(res, BaseException):
                failures.append((s, f"{type(res).__name__}: {res}", _is_lost(res)))
            elif res.epoch != epoch or res.checksum != expected[s]:
                failures.append(
                    (
                        s,
                        f"acked epoch {res.epoch} checksum {res.checksum:#x}, expected epoch "
                        f"{epoch} checksum {expected[s]:#x}",
                        True,
                    )
                )
        if not failures:
            return
        applied = [s for s, r in enumerate(results) if isinstance(r, Ack) and r.epoch == epoch]
        rollback = self._backend.rollback(applied, epoch) if applied else []
        stuck = [s for s, r in zip(applied, rollback, strict=True) if isinstance(r, BaseException)]
        shard, reason, lost = failures[0]
        error = ShardFailedError(shard, epoch, reason + "; nothing was published")
        if lost or stuck:
            self._failed = error
        raise error

    # -- recovery --------------------------------------------------------------------------

    def _shard_states(self) -> list[bytes | None]:
        """Full-state messages rebuilding each shard at the published epoch."""
        if self.epoch == 0:
            return [None] * self.num_shards
        out = []
        for s in range(self.num_shards):
            rows = self.layout.shard_rows(s)
            lo, hi = rows.start, rows.stop
            batch = state_batch(
                self.epoch,
                s,
                [t[lo:hi] for t in self._published],
                [c[lo:hi] for c in self._published_counts],
            )
            out.append(encode(batch))
        return out

    def _rehash(self) -> None:
        """Recompute every row's checksum terms and each shard's expected checksum from the
        published tables."""
        expected = [0] * self.num_shards
        for g, (table, counts) in enumerate(
            zip(self._published, self._published_counts, strict=True)
        ):
            batch = state_batch(1, 0, [table], [counts]).groups[0]
            inner = np.zeros(self.max_num_reqs, np.uint64)
            inner[batch.row] = checksum.updated_inner(
                inner[batch.row], batch.start, batch.count, batch.pages
            )
            self._inner[g] = inner
            for s in range(self.num_shards):
                rows = np.arange(self.layout.shard_rows(s).start, self.layout.shard_rows(s).stop)
                delta = checksum.total_delta(g, rows, np.zeros(rows.size, np.uint64), inner[rows])
                expected[s] = checksum.add(expected[s], delta)
        self._expected = expected

    def recover(self) -> float:
        """Replace the shard processes and rebuild them at the last published epoch.

        Every shard is restarted (a JAX distributed job cannot continue without one of its
        processes), re-seeded from the coordinator's copy of the published tables and
        verified by checksum. Pending changes stay pending for the next commit. Returns the
        seconds it took; raises :class:`ShardFailedError` if a new shard fails too.
        """
        with self._lock:
            if self._backend is None:
                raise RuntimeError("this ShardedPageTable is closed")
            t0 = time.perf_counter()
            if self._backend.in_process:
                self._backend.restart()
                self._failed = None
                self.recoveries.append(time.perf_counter() - t0)
                return self.recoveries[-1]
            try:
                self._backend.restart()
                results = self._backend.reseed(self._shard_states())
            except ShardFailedError as exc:
                self._failed = exc
                raise
            except Exception as exc:
                self._failed = ShardFailedError(-1, self.epoch, f"restart failed: {exc}")
                raise self._failed from exc
            for s, res in enumerate(results):
                if isinstance(res, BaseException):
                    self._failed = ShardFailedError(s, self.epoch, f"re-seed failed: {res}")
                    raise self._failed
                if res.epoch != self.epoch or res.checksum != self._expected[s]:
                    self._failed = ShardFailedError(
                        s,
                        self.epoch,
                        f"re-seeded shard reports epoch {res.epoch} checksum "
                        f"{res.checksum:#x}, expected {self._expected[s]:#x}",
                    )
                    raise self._failed
            self._failed = None
            seconds = time.perf_counter() - t0
            self.recoveries.append(seconds)
            log.warning(
                "recovered %d shards at epoch %d in %.2fs", self.num_shards, self.epoch, seconds
            )
            return seconds

    def _adopt(self) -> None:
        """Rebuild the mirror from running shards (``attach``), settling on one epoch."""
        backend = self._backend
        epochs = [a.epoch for a in backend.status()]
        target = min(epochs)
        if max(epochs) - target > 1:
            raise RuntimeError(
                f"shards hold epochs {epochs}: more than one epoch apart, cannot settle"
            )
        ahead = [s for s, e in enumerate(epochs) if e > target]
        if ahead:
            for s, res in zip(ahead, backend.rollback(ahead, target + 1), strict=True):
                if isinstance(res, BaseException) or res.epoch != target:
                    raise RuntimeError(f"shard {s} cannot step back to epoch {target}: {res}")
            log.warning("shards %s stepped back to epoch %d to settle", ahead, target)
        limits = WireLimits(self.layout.rows_per_shard, self.widths)
        for s, message in enumerate(backend.export()):
            if message is None:
                continue
            batch = decode(message, limits)
            if batch.epoch != target or batch.shard != s:
                raise RuntimeError(f"shard {s} exported epoch {batch.epoch}, expected {target}")
            lo = self.layout.shard_rows(s).start
            for g, gb in enumerate(batch.groups):
                glob = GroupBatch(gb.op, gb.row + lo, gb.start, gb.count, gb.pages)
                apply_group(self._published[g], self._published_counts[g], glob)
        for g, host in enumerate(self._hosts):
            host.table[...] = self._published[g]
            host.counts[...] = self._published_counts[g]
            host.state.fill(CLEAN)
        self.epoch = target
        self._rehash()
        for s, ack in enumerate(backend.status()):
            if ack.epoch != target or ack.checksum != self._expected[s]:
                raise RuntimeError(
                    f"shard {s} reports epoch {ack.epoch} checksum {ack.checksum:#x} after "
                    f"attach, expected epoch {target} checksum {self._expected[s]:#x}"
                )

    # -- whole-table operations ----------------------------------------------------------

    def clear(self) -> None:
        """Empty every row of every group, on the host and on every shard's devices."""
        with self._lock:
            self._live_backend()
            for host, published in zip(self._hosts, self._published_counts, strict=True):
                host.reset()
                host.state[:] = np.where(published > 0, REWRITTEN, CLEAN)
            self.commit(self.max_num_reqs)

    def close(self) -> None:
        """Release the shards (actors and devices). Safe to call twice."""
        with self._lock:
            backend, self._backend = self._backend, None
            if backend is not None:
                backend.close(clean=self._failed is None)

    def __enter__(self) -> ShardedPageTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Row operations and reads are serialised, so several scheduler threads may share a table.
    append_row = _synchronized(MultiGroupRowOps.append_row)
    add_row = _synchronized(MultiGroupRowOps.add_row)
    clear_row = _synchronized(MultiGroupRowOps.clear_row)
    move_row = _synchronized(MultiGroupRowOps.move_row)
    swap_row = _synchronized(MultiGroupRowOps.swap_row)
    append_rows_batch = _synchronized(MultiGroupRowOps.append_rows_batch)
    compute_slot_mapping = _synchronized(MultiGroupRowOps.compute_slot_mapping)


def _payload(batch: GroupBatch) -> int:
    """Bytes of a group batch's columns (what an in-process shard is handed)."""
    return sum(a.nbytes for a in (batch.op, batch.row, batch.start, batch.count, batch.pages))


def _is_lost(exc: BaseException) -> bool:
    """True when a failure may have left the shard dead or in an unknown state."""
    from .errors import WireFormatError

    return not isinstance(exc, WireFormatError)
