"""The coordinator: the scheduler's single entry point to a table sharded over processes.

It keeps a host mirror of every row, validates each call against it, and at ``commit`` turns
the rows that changed into one wire message per shard. Cross-shard moves and swaps are
resolved in the mirror and reach the shards as ordinary row replacements, so shards never
talk to each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from . import checksum
from .backends import Backend, LocalBackend
from .checksum import segment_index
from .config import RayOptions, TableConfig
from .constants import cdiv
from .errors import ShardFailedError
from .host import HostRows
from .layout import ShardLayout
from .mesh import build_mesh, row_sharding
from .page_table import check_page_sizes
from .receipt import CommitReceipt, ShardReceipt
from .row_ops import MultiGroupRowOps
from .shard import Ack, ShardSpec
from .validation import check_count
from .wire import OP_APPEND, OP_CLEAR, OP_SET, GroupBatch, ShardBatch, encode


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
        ray: RayOptions | Mapping[str, Any] | None = None,
    ) -> None:
        page_sizes = check_page_sizes(page_sizes)
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
        widths = tuple(cdiv(max_model_len, s) for s in page_sizes)
        self._hosts = [HostRows(max_num_reqs, w, num_pages) for w in widths]
        self._published_counts = [np.zeros(max_num_reqs, np.int32) for _ in widths]
        self._inner = [np.zeros(max_num_reqs, np.uint64) for _ in widths]
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
            specs = [ShardSpec(s, self.layout, widths, warmup) for s in range(num_shards)]
            self._backend = LocalBackend(specs, sharding)
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
            self._backend = RayBackend(specs, axes, row_axis, options)
        self._expected = [0] * num_shards  # u64 checksum each shard must report

    @classmethod
    def from_config(cls, path: str, **overrides: Any) -> ShardedPageTable:
        """Build a table from a YAML file of ``configs/`` (keys as in :class:`TableConfig`)."""
        return TableConfig.from_yaml(path, **overrides).build()

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
        return self._live_backend().device_snapshot(group)

    def run_on_shards(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run ``fn(list_of_group_arrays, *args)`` in every shard process at once.

        The arrays are the committed global arrays (each process sees its addressable part),
        so a jitted function over them is an SPMD program across the shard processes.
        ``fn`` is trusted driver code: it runs with the shard process's privileges.
        """
        return self._live_backend().run_on_shards(fn, *args)

    # -- the side-effect point -------------------------------------------------------------

    def _group_updates(self, g: int, n: int):
        host = self._hosts[g]
        rows = host.pending(n)
        counts = host.counts[rows]
        starts = np.where(host.rewritten[rows], 0, self._published_counts[g][rows]).astype(np.int32)
        op = np.where(starts > 0, OP_APPEND, np.where(counts == 0, OP_CLEAR, OP_SET))
        r, c = segment_index(rows, starts, counts)
        pages = host.table[r, c]
        new_inner = checksum.updated_inner(self._inner[g][rows], starts, counts, pages)
        return rows, op.astype(np.int32), starts, counts, pages, new_inner

    def commit(self, num_reqs: int) -> CommitReceipt:
        """Publish rows ``[0, num_reqs)`` on every shard as one new epoch.

        Returns a receipt with the epoch and, per shard, rows and bytes sent and the checksum
        the shard confirmed. If any shard fails, every shard steps back, nothing is
        published, the mirror keeps the pending changes, and :class:`ShardFailedError`
        names the shard.
        """
        n = check_count(num_reqs, self.max_num_reqs, "num_reqs")
        backend = self._live_backend()
        updates = [self._group_updates(g, n) for g in range(len(self._hosts))]
        if not any(u[0].size for u in updates):
            return CommitReceipt(self.epoch, n, False, ())
        epoch = self.epoch + 1
        layout = self.layout
        bounds = np.arange(layout.num_shards + 1) * layout.rows_per_shard
        per_shard: list[list[GroupBatch]] = [[] for _ in range(layout.num_shards)]
        expected = list(self._expected)
        for g, (rows, op, starts, counts, pages, new_inner) in enumerate(updates):
            cut = np.searchsorted(rows, bounds)
            page_cut = np.concatenate([[0], np.cumsum(counts.astype(np.int64) - starts)])[cut]
            for s in range(layout.num_shards):
                i, j = cut[s], cut[s + 1]
                per_shard[s].append(
                    GroupBatch(
                        op[i:j],
                        (rows[i:j] - bounds[s]).astype(np.int32),
                        starts[i:j],
                        counts[i:j],
                        pages[page_cut[s] : page_cut[s + 1]],
                    )
                )
                delta = checksum.total_delta(
                    g, rows[i:j], self._inner[g][rows[i:j]], new_inner[i:j]
                )
                expected[s] = checksum.add(expected[s], delta)
        messages = [
            encode(ShardBatch(epoch, self.epoch, s, tuple(groups)))
            for s, groups in enumerate(per_shard)
        ]
        results = backend.apply(messages)
        self._settle(results, expected, epoch)
        for g, (rows, _, _, counts, _, new_inner) in enumerate(updates):
            self._inner[g][rows] = new_inner
            self._published_counts[g][rows] = counts
            self._hosts[g].mark_published(rows)
        self._expected = expected
        self.epoch = epoch
        return CommitReceipt(
            epoch,
            n,
            True,
            tuple(
                ShardReceipt(s, sum(b.size for b in per_shard[s]), len(messages[s]), expected[s])
                for s in range(layout.num_shards)
            ),
        )

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

    # -- whole-table operations ----------------------------------------------------------

    def clear(self) -> None:
        """Empty every row of every group, on the host and on every shard's devices."""
        self._live_backend()
        for host, published in zip(self._hosts, self._published_counts, strict=True):
            host.reset()
            host.dirty[:] = published > 0
            host.rewritten[:] = host.dirty
        self.commit(self.max_num_reqs)

    def close(self) -> None:
        """Release the shards (actors and devices). Safe to call twice."""
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.close(clean=self._failed is None)

    def __enter__(self) -> ShardedPageTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_lost(exc: BaseException) -> bool:
    """True when a failure may have left the shard dead or in an unknown state."""
    from .errors import WireFormatError

    return not isinstance(exc, WireFormatError)
